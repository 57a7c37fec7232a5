"""sha256 of every result a node computes under a results folder, timings left out: the tensors of each
.safetensors file (names, dtypes, shapes, bytes) and each metrics.json / analysis.json / cka.json without its
timing and provenance fields. A refactor that must not change any number compares two runs' digests:

    python scripts/output_digests.py results > before.json     # ... change the code, rerun the same nodes ...
    python scripts/output_digests.py results | diff before.json -
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from safetensors.numpy import load_file

VOLATILE = ("time", "second", "wall", "_s", "date", "host", "fingerprint", "run_id", "sha256", "path", "version",
            "images_per_s", "mlflow", "code", "git")     # a key containing one of these is left out


def kept(value):
    if isinstance(value, dict):
        return {k: kept(v) for k, v in value.items() if not any(word in k for word in VOLATILE)}
    if isinstance(value, list):
        return [kept(v) for v in value]
    return value


def digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.suffix == ".safetensors":
        for name, array in sorted(load_file(str(path)).items()):
            h.update(f"{name} {array.dtype} {array.shape}".encode())
            h.update(array.tobytes())
    else:
        h.update(json.dumps(kept(json.loads(path.read_text())), sort_keys=True).encode())
    return h.hexdigest()


def main(root: str) -> None:
    base = Path(root)
    files = sorted(p for p in base.rglob("*") if p.is_file() and (
        p.suffix == ".safetensors" or p.name in ("metrics.json", "analysis.json", "cka.json")))
    json.dump({str(p.relative_to(base)): digest(p) for p in files}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
