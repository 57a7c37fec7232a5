"""Which params keys each node reads, recorded while it runs, to check what it declares.

A node declares its params in the node table (pipeline/dag.py, Node.params): they are part of its fingerprint
(both DAGs) and dvc.yaml's per-stage `params:` of the resolved params file. A key is a dotted path; `{method}`,
`{chain}` and `{stage}` are the node's own (wildcards in Snakemake, foreach items in DVC).

The declaration is checked against what the nodes really read: with $MIM_PARAMS_READS naming a folder, every
stage CLI (pipeline.orchestration.cli.stage_main) wraps its resolved params in a `Recorder` and writes the dotted
key paths its check and its work read to <folder>/<node id>.json (tests/test_e2e_dvc.py and
tests/test_e2e_snakemake.py compare them with both DAGs). A read of a mapping as a whole (iterating it,
copying it, writing it to a file) counts as a read of its path.

Reads are recorded in two phases, the node's check (fast validation before any work) and its work, and equal the
declaration: every read is under a declared key, every declared key is read. Besides, a node may read the DAG's
shape (DAG_SHAPE: which nodes and files exist, e.g. whether --weights is an encoder of the study, or which dBOT
keys there are; teacher_swap checks again in its work): an edit of those changes the DAG itself (regenerate
dvc.yaml), and the nodes whose inputs change rerun by their deps.

Not declared, on purpose (NOT_RESULTS): keys that say where and how a node runs or is logged, not what it
computes: launch.* (executor, device, processes, compile), tracking.* and study (the MLflow experiment), and
seed (each node's own seed is in its command line, --seed). An edit of them reruns nothing.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from pipeline import methods

ENV = "MIM_PARAMS_READS"
NOT_RESULTS = ("launch", "tracking", "study", "seed")
DAG_SHAPE = ("seeds", "dbot.chains", "dbot.stages", "data.format", "data.dataset", "pretrain.epochs",
             "pretrain.keep_every_epochs", "finetune.weights", "robustness.enabled") + tuple(
    f"{m}.pretrain.{k}" for m in methods.with_node("pretrain") for k in ("epochs", "keep_every_epochs"))
# (a single-stage method's own epochs and keep_every_epochs, <method>.pretrain: its kept encoders, layout.kept_epochs)

class Reads:
    """The recorded key paths of one node, by phase ("check", then "work")."""

    def __init__(self):
        self.phase, self.paths = "check", {"check": set(), "work": set()}

    def add(self, path: str) -> None:
        self.paths[self.phase].add(path)


class Recorder(dict):
    """A params mapping that adds the dotted path of every key read to `reads` (nested mappings are Recorders
    too). Iterating or copying a mapping reads it whole: its own path."""

    def __init__(self, data: dict, reads: Reads, prefix: str = ""):
        super().__init__(data)
        self._reads, self._prefix = reads, prefix

    def _path(self, key) -> str:
        return f"{self._prefix}.{key}" if self._prefix else str(key)

    def _whole(self) -> None:
        self._reads.add(self._prefix or "*")

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, dict) and not isinstance(value, Recorder):
            return Recorder(value, self._reads, self._path(key))
        self._reads.add(self._path(key))
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        self._whole()
        return super().__iter__()

    def keys(self):
        self._whole()
        return super().keys()

    def values(self):
        self._whole()
        return super().values()

    def items(self):
        self._whole()
        return super().items()

    def copy(self):
        self._whole()
        return dict(super().items())

    def with_section(self, key, value) -> Recorder:
        """A copy with `key` set to `value`, recording into the same reads (a node's view of its params:
        pipeline.config.method_params)."""
        out = Recorder(dict(dict.items(self)), self._reads, self._prefix)
        dict.__setitem__(out, key, value)
        return out

    def __reduce_ex__(self, protocol):            # pickle/deepcopy (a submitit job): a plain dict, read whole
        self._whole()
        return dict, (dict(super().items()),)


for _dumper in (yaml.SafeDumper, yaml.Dumper):           # yaml.safe_dump of a Recorder: a mapping, read whole
    _dumper.add_representer(Recorder, lambda dumper, data: dumper.represent_dict(data.items()))


def recording(params: dict) -> tuple[dict, Reads | None]:
    """(params wrapped in a Recorder, its Reads) when $MIM_PARAMS_READS is set, else (params, None)."""
    if not os.environ.get(ENV):
        return params, None
    reads = Reads()
    return Recorder(params, reads), reads


def save(reads: Reads | None, node_id: str) -> None:
    """Write the recorded reads of node `node_id` to $MIM_PARAMS_READS/<node id>.json, {"check": [..], "work":
    [..]} (merged with an earlier run's)."""
    if reads is None:
        return
    path = Path(os.environ[ENV]) / f"{node_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({phase: sorted(set(before.get(phase, [])) | paths)
                                for phase, paths in reads.paths.items()}))


def view(params: dict, keys) -> dict:
    """A plain nested dict of just the dotted `keys` of params (and NOT_RESULTS): what a node records as its
    params (params.yaml, its params hash) when it reads only part of a section."""
    out: dict = {k: params[k] for k in NOT_RESULTS if k in params}
    for key in keys:
        *parents, last = key.split(".")
        src, dst = params, out
        for part in parents:
            src, dst = src[part], dst.setdefault(part, {})
        dst[last] = src[last]
    return out


def _under(path: str, key: str) -> bool:
    return path == key or path.startswith(key + ".")


def problems(reads: dict, declared_keys) -> list[str]:
    """What differs between the keys a node read ({"check": [..], "work": [..]}, as saved) and those it declares:
    a read that no declared key covers (a declared key is the read path or one of its parents) nor DAG_SHAPE, a
    declared key nothing was read under. NOT_RESULTS are left out."""
    kept = {phase: [r for r in paths if r.split(".")[0] not in NOT_RESULTS] for phase, paths in reads.items()}
    out = [f"{phase} reads {r}, undeclared" for phase, paths in kept.items() for r in sorted(paths)
           if not any(_under(r, d) for d in (*declared_keys, *DAG_SHAPE))]
    every = kept["work"] + kept["check"]
    out += [f"declares {d}, never read" for d in declared_keys if not any(_under(r, d) or _under(d, r) for r in every)]
    return out
