"""Corruptions (ImageNet-C-like levels, deterministic, stronger with severity) and the robustness node."""
import json

import pytest
import test_finetune
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from test_finetune import PNG

from pipeline import layout
from pipeline.evaluation import robustness

one_thread, study = test_finetune.one_thread, test_finetune.study   # fixtures: one thread, the tiny study


def images(n=4, channels=1, size=98):
    """uint8 images of the default study's size with edges (a random 2x2-pixel pattern), away from 0 and 255."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, channels, size // 2, size // 2, generator=g)
    return (40 + 170 * F.interpolate(low, size=(size, size), mode="nearest")).round().to(torch.uint8)


@pytest.mark.parametrize("name", robustness.CORRUPTIONS)
@pytest.mark.parametrize("channels", [1, 3])
def test_corruptions_grow_with_severity_and_are_deterministic(name, channels):
    x = images(channels=channels)
    dist = []
    for severity in range(1, 6):
        y = robustness.corrupt(x, name, severity, seed=0)
        assert y.dtype == torch.uint8 and y.shape == x.shape
        assert torch.equal(y, robustness.corrupt(x, name, severity, seed=0))
        dist.append((y.float() - x.float()).abs().mean().item())
    assert all(a < b for a, b in zip(dist, dist[1:])), dist
    assert dist[0] > 0


def test_noise_is_seeded_and_levels_are_imagenet_c():
    x = images()
    assert not torch.equal(robustness.corrupt(x, "gaussian_noise", 3, seed=0),
                           robustness.corrupt(x, "gaussian_noise", 3, seed=1))
    assert robustness.blur_sigma(1, 224) == 1.0 and robustness.blur_sigma(5, 98) == pytest.approx(6 * 98 / 224)
    flat = torch.full((1, 1, 16, 16), 100, dtype=torch.uint8)
    assert torch.equal(robustness.corrupt(flat, "gaussian_blur", 5, 0), flat)     # blur and contrast keep a
    assert torch.equal(robustness.corrupt(flat, "contrast", 5, 0), flat)          # constant image as it is
    with pytest.raises(ValueError, match="unknown corruption"):
        robustness.corrupt(x, "fog", 1, 0)


def test_robustness_node_after_finetune(study):
    from pipeline.stages.evaluation import finetune as finetune_stage
    from pipeline.stages.evaluation import robustness as stage

    finetune_stage.main(["--preset", "tiny", "--weights", "mae"])
    stage.main(["--preset", "tiny", "--weights", "mae"])
    out = layout.eval_metrics("robustness", "mae", 0)
    doc = json.loads(out.read_text())
    assert doc["protocol"] == "robustness" and doc["settings"]["severities"] == [1, 3]
    assert set(doc["corruptions"]) == {"gaussian_noise", "gaussian_blur", "contrast"}
    assert all(set(v) == {"1", "3"} for v in doc["corruptions"].values())
    values = [v for t in doc["corruptions"].values() for v in t.values()]
    assert doc["metrics"]["mean_corrupted_top1"] == pytest.approx(sum(values) / len(values))
    finetuned = json.loads(layout.eval_metrics("finetune", "mae", 0).read_text())
    assert doc["metrics"]["clean_top1"] == pytest.approx(finetuned["metrics"]["top1"])
    assert doc["weights"]["id"] == "mae" and doc["weights"]["finetuned"]["sha256"]
    assert (out.parent / "robustness.png").read_bytes()[:8] == PNG
    client = MlflowClient(f"sqlite:///{study}/mlflow.db")
    run, = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "attributes.run_name = 'robustness@seed0-mae'")
    assert run.info.status == "FINISHED" and "clean_top1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "contrast_top1")] == [1, 3]


def test_missing_or_corrupt_finetuned_model_is_a_one_line_error(study, capsys):
    from pipeline.stages.evaluation import robustness as stage

    with pytest.raises(SystemExit) as e:
        stage.main(["--preset", "tiny", "--weights", "supervised"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert err.startswith("error: missing input results/seed0/finetune/supervised/model.safetensors")
    assert "finetune@seed0-supervised" in err
    with pytest.raises(SystemExit):
        stage.main(["--preset", "tiny", "--weights", "nope"])
    assert capsys.readouterr().err.startswith("error: unknown weights 'nope'")

    model = layout.finetuned_path("mae", 0)
    if not model.exists():
        from pipeline.stages.evaluation import finetune as finetune_stage
        finetune_stage.main(["--preset", "tiny", "--weights", "mae"])
    model.write_bytes(model.read_bytes()[:-4] + b"oops")
    with pytest.raises(SystemExit):
        stage.main(["--preset", "tiny", "--weights", "mae"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "corrupt" in err
