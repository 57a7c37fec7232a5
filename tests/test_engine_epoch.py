"""The engine's end of an epoch (pipeline/train/engine.py _end_epoch) by its record: the epoch's mean loss (the
summed step losses over the steps per epoch), the lr, the seconds and the images per second, appended to the
history; the counters advanced and the loss sum reset; a non-finite loss is a one-line error naming the epoch."""
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.train import engine


def state(loss_sum: float) -> dict:
    return {"loss_sum": torch.tensor(loss_sum), "history": [{"epoch": 0}], "images_seen": 100, "wall_s": 5.0}


def test_an_epoch_records_its_mean_loss_lr_seconds_and_throughput():
    st = state(6.0)
    engine._end_epoch(st, epoch=1, spe=3, bs=4, lr=0.1, seconds=2.0, state_path=None, model=None, opt=None,
                      scaler=None, on_epoch=None)
    assert st["history"] == [{"epoch": 0}, {"epoch": 1, "loss": 2.0, "lr": 0.1, "seconds": 2.0, "images_per_s": 6.0}]
    assert st["images_seen"] == 112 and st["wall_s"] == 7.0
    assert torch.equal(st["loss_sum"], torch.tensor(0.0))


def test_the_epochs_metrics_reach_the_callback(tmp_path, monkeypatch):
    seen, saved = [], []
    monkeypatch.setattr(engine, "_save", lambda st, *args: saved.append(len(st["history"])))
    st = state(1.0)
    engine._end_epoch(st, 2, 1, 8, 0.5, 4.0, tmp_path / "state.pt", None, None, None, seen.append)
    assert seen == [st["history"][-1]] and seen[0]["images_per_s"] == 2.0 and saved == [2]


def test_a_non_finite_loss_names_the_epoch_and_keeps_the_last_good_state():
    with pytest.raises(PipelineError, match=r"^non-finite loss \(nan\) in epoch 3; the last good state is kept in "
                                            r"s\.pt; lower the lr or train in another precision$"):
        engine._end_epoch(state(float("nan")), 3, 1, 1, 0.1, 1.0, "s.pt", None, None, None, None)
