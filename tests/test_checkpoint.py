"""Atomic writes, verified loads, resumable state."""
import pytest
import torch

from pipeline import checkpoint
from pipeline.errors import PipelineError


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fails(p):
        p.write_text("partial")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        checkpoint.atomic_write(target, fails)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_tensors_roundtrip_with_sidecar_and_corruption_detected(tmp_path):
    path = tmp_path / "w.safetensors"
    meta = checkpoint.save_tensors(path, {"a": torch.arange(10.0)}, {"node": "x"})
    tensors, loaded = checkpoint.load_tensors(path)
    assert torch.equal(tensors["a"], torch.arange(10.0)) and loaded == meta and len(meta["sha256"]) == 64
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="is corrupt: its sha256 does not match"):
        checkpoint.load_tensors(path)
    path.write_bytes(bytes(data[:20]))
    (tmp_path / "w.json").unlink()
    with pytest.raises(PipelineError, match="not a readable safetensors file"):
        checkpoint.load_tensors(path)
    with pytest.raises(PipelineError, match="missing file"):
        checkpoint.load_tensors(tmp_path / "nope.safetensors")


def test_state_is_loaded_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    assert checkpoint.load_state(tmp_path / "evil.pt") is None           # refused, not executed
    checkpoint.save_state(tmp_path / "ok.pt", {"step": 3, "t": torch.ones(2), "extra": {"run_id": "r"}})
    assert checkpoint.load_state(tmp_path / "ok.pt")["extra"] == {"run_id": "r"}
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:30])
    assert checkpoint.load_state(tmp_path / "trunc.pt") is None


def test_atomic_writes_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    checkpoint.write_json(tmp_path / "out.json", {"a": 1})
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~checkpoint._UMASK


def test_a_temporary_file_left_by_a_kill_is_removed_by_the_next_write(tmp_path):
    from pipeline.checkpoint import write_json
    stale = tmp_path / ".metrics.json.abc123.tmp"              # what a SIGKILL during atomic_write leaves
    other = tmp_path / ".other.json.abc123.tmp"                # another file's: not touched
    stale.write_text("{partial")
    other.write_text("{partial")
    write_json(tmp_path / "metrics.json", {"a": 1})
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.json.abc123.tmp", "metrics.json"]
