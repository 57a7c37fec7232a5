"""Running nodes: the stage CLI, launchers, MLflow tracking, the fork server, dvc.yaml."""
