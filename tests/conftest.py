"""Shared fixtures. Tests run from the repository root (params/ and results/ are cwd-relative)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
COPIED = ["Snakefile", "dvc.yaml", "params", "rules", "pipeline", "pyproject.toml"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A copy of the repository's DAG files in tmp_path, as the working directory (results land there)."""
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def run_cli(*args, cwd=None, check=True, env=None, timeout=600):
    """Run a command with this interpreter's environment (python/snakemake/dvc of the venv on PATH)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
