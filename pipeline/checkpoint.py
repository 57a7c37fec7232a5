"""Checkpoint files: safetensors weights with a provenance sidecar, atomic writes, verified loads.

- Weights (and the prepared dataset) are safetensors files, never pickles. Beside each one lies
  `<name>.json`: what made it (node, method, stage, params hash, code version, model config) and the
  sha256 of the weights file, so provenance survives copying and corruption is detected before use.
- Resumable training state (optimiser, RNG, schedule position, ...) is a torch file loaded with
  weights_only=True; it holds only tensors and plain Python values.
- Weights are read and written as torch tensors (load_tensors, save_tensors) or, by nodes that only copy them,
  as numpy arrays (load_arrays, save_arrays: the same files, without importing torch). torch and numpy are
  imported by the functions that use them, so a node importing this module starts fast.
- Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target:
  a killed or failing write never leaves a partial file under the final name (a SIGKILL can leave the hidden
  temporary file; the next write of the same file removes it). A write the system refuses (a full disk, a quota,
  the file size limit) is an OSError naming the final path, whatever library wrote (torch and safetensors raise
  their own types): the node's one error line (pipeline.orchestration.cli) and the file's last good version stays.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from pipeline.errors import PipelineError
from pipeline.layout import sidecar

if TYPE_CHECKING:
    import numpy as np
    import torch


_UMASK = os.umask(0)
os.umask(_UMASK)                         # read once: os.umask can only be read by setting it


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """Call write(tmp_path), fsync, then rename tmp_path to path. The temp file is removed on failure; one that a
    SIGKILL left (hidden, `.<name>.<random>.tmp`) is removed by the next write of the same path (a node runs
    once at a time: pipeline.orchestration.cli.exclusive)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(Path(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        except Exception as e:               # a library's own error for a refused write: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        os.chmod(tmp, 0o666 & ~_UMASK)       # mkstemp makes 0600; outputs get the usual umask permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path | str, obj: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def read_json(path: Path | str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid JSON: {e}") from None


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: Path | str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Write tensors as safetensors and meta (+ sha256) as the sidecar JSON. Returns the sidecar dict."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _save(path, lambda p: save_file(tensors, str(p)), meta)


def save_arrays(path: Path | str, arrays: dict[str, np.ndarray], meta: dict) -> dict:
    """save_tensors for numpy arrays: the same file as save_tensors writes for tensors of the same values."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return _save(path, lambda p: save_file(arrays, str(p)), meta)


def _save(path: Path | str, write: Callable[[Path], None], meta: dict) -> dict:
    path = Path(path)
    atomic_write(path, write)
    meta = dict(meta, sha256=sha256_file(path), file=path.name)
    write_json(sidecar(path), meta)
    return meta


def load_tensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a safetensors file and its sidecar; a hash mismatch or unreadable file is a PipelineError.

    A file without a sidecar (an external checkpoint) is loaded unverified, with empty metadata; a sidecar
    that is there must hold the file's sha256 (a sidecar cannot switch the check off).
    """
    from safetensors.torch import load_file

    return _load(path, load_file)


def load_arrays(path: Path | str) -> tuple[dict[str, np.ndarray], dict]:
    """load_tensors as numpy arrays, verified the same way. Tensors of a type numpy lacks (bf16, fp8) are read
    by torch and widened to float32, as loading them into float32 parameters does."""
    return _load(path, _numpy_load)


_NUMPY_TYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}


def _numpy_load(path: str) -> dict[str, np.ndarray]:
    with safe_open(path, framework="numpy") as f:
        if all(f.get_slice(k).get_dtype() in _NUMPY_TYPES for k in f.keys()):
            return {k: f.get_tensor(k) for k in f.keys()}
    import torch
    from safetensors.torch import load_file

    exact = (torch.float16, torch.float32, torch.float64)
    return {k: (v.float() if v.is_floating_point() and v.dtype not in exact else v).numpy()
            for k, v in load_file(path).items()}


def _load(path: Path | str, load: Callable[[str], dict]) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    if not sidecar(path).is_file():
        meta = {}
    elif not isinstance(meta := read_json(sidecar(path)), dict) or not isinstance(meta.get("sha256"), str):
        raise PipelineError(f"{sidecar(path)} is not the sidecar of {path}: it records no sha256 "
                            f"(move it away to load {path.name} unverified)")
    if meta and meta["sha256"] != sha256_file(path):
        raise PipelineError(f"{path} is corrupt: its sha256 does not match {sidecar(path)}")
    try:
        return load(str(path)), meta
    except (SafetensorError, OSError, ValueError) as e:
        raise PipelineError(f"{path} is not a readable safetensors file ({e})") from None


def save_state(path: Path | str, state: dict) -> None:
    """Resumable training state (tensors, numbers, strings, lists, dicts only)."""
    atomic_write(path, lambda p: _torch_save(state, p))


def _torch_save(obj, path: Path) -> None:
    """torch.save through a Python file, so that a refused write is the system's OSError (torch.save to a path
    raises a RuntimeError without the cause)."""
    import torch

    class Recording(io.RawIOBase):
        error = None

        def writable(self):
            return True

        def write(self, b):
            try:
                return f.write(b)
            except OSError as e:
                Recording.error = e
                raise

    with open(path, "wb", buffering=0) as f:
        try:
            buffered = io.BufferedWriter(Recording(), 1 << 20)
            torch.save(obj, buffered)
            buffered.flush()
        except Exception:
            if Recording.error is not None:
                raise Recording.error from None
            raise


def load_plain(path: Path | str) -> dict:
    """A declared input saved with save_state (e.g. dBOT's carried optimizer.pt), loaded with weights_only=True;
    a missing or unreadable file is a PipelineError (unlike a resume state, it is never silently skipped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"missing file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(f"{path} is not a readable torch file of plain tensors "
                            f"({str(e).splitlines()[0]})") from None


def load_state(path: Path | str) -> dict | None:
    """The saved state, or None when there is none or it cannot be read (the caller starts fresh)."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: never trust it, start fresh
        print(f"warning: ignoring unreadable resume state {path}: {e}", flush=True)
        return None
