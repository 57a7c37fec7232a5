"""What every stage CLI shares: --preset/--set, strict params, fail-fast checks, one-line errors.

A stage module defines `add_args(parser)`, `check(params, args)` (fast validation of its inputs, before
any work) and `work(params, args)` (the node itself), then calls `stage_main(...)`. Nodes that run once
per seed of the study (all but prepare_data and report) take `--seed S` (default: the first of params
seeds); their params hold it as params["seed"]. Training nodes pass `distributed=True`: they run in launch.tasks
processes (pipeline.train.distributed); every other node in one.

Start-up: this module and the stage modules import only light modules (argparse, yaml, the params and layout
helpers); torch, timm, mlflow and the rest are imported by the work that uses them. A node's "first own work"
is the moment stage_main has parsed its arguments, loaded and validated its params, and is about to call its
check(): with $MIM_STARTUP_MARK naming a file, stage_main writes time.time() into it then
(python -m pipeline.bench.startup measures it for every node type).
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager

import yaml

from pipeline import checkpoint, config, layout
from pipeline.dag import stage_module
from pipeline.errors import PipelineError
from pipeline.orchestration import params_reads

CODE_READS = "MIM_CODE_READS"
BENCHMARK = ("benchmarks", ".tsv")     # Snakemake's benchmark of a node's job (rules/nodes.smk): dag.Node.job_file


def stage_main(name: str, doc: str, add_args: Callable, check: Callable, work: Callable,
               node_id: Callable, argv: list[str] | None = None, compute: bool = True, per_seed: bool = True,
               distributed: bool = False) -> None:
    warm_exit = delegate_to_forkserver()       # a node process: a fork server, if one runs, starts it warm
    if warm_exit is not None:
        sys.exit(warm_exit)
    parser = argparse.ArgumentParser(prog=f"python -m {stage_module(name)}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="params/presets/<name>.yaml (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param, e.g. --set pretrain.epochs=3 (repeatable)")
    parser.add_argument("--params", dest="files", action="append", default=[], metavar="FILE",
                        help="a YAML file of overrides, merged after the preset (repeatable)")
    if per_seed:
        parser.add_argument("--seed", type=int, default=None,
                            help="which of the study's seeds (params seeds) this node runs for (default: the first)")
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        params = config.load(args.preset, args.overrides, args.files)
        if per_seed and args.seed is not None:
            params = config.with_seed(params, args.seed)
        if not per_seed:                       # a node of the whole study (prepare_data, report)
            params = {k: v for k, v in params.items() if k != "seed"}
        args.seed = params.get("seed")
        params, reads = params_reads.recording(params)   # $MIM_PARAMS_READS: which keys the node reads
        mark_startup()
        try:
            check(params, args)
            if reads:
                reads.phase = "work"
            forget_benchmark(node_id(args))
            with exclusive(node_id(args)):
                if compute:
                    from pipeline.orchestration import launch  # submitit and torch: only for the work itself

                    launch.run(work, params, args, node_id(args), distributed_ok=distributed)
                else:
                    work(params, args)
        finally:
            params_reads.save(reads, node_id(args))
            record_imports(node_id(args))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:                       # e.g. a full disk: atomic writes left every earlier output as it was
        print(f"error: {node_id(args)}: {e.strerror or e} ({e.filename or type(e).__name__}); "
              "no output was replaced", file=sys.stderr)
        sys.exit(2)


def forget_benchmark(node: str) -> None:
    """Remove the Snakemake benchmark of this node's last job, if any: it timed outputs this run replaces (Snakemake
    writes a new one when it ran the job; after `dvc repro` an old one would count, for Snakemake, as an output
    older than the node's fingerprint and make it rerun the node)."""
    from pipeline import dag

    try:
        found, values = dag.parse_node_id(node)
    except KeyError:                      # a node run by hand outside the DAG (import_weights)
        return
    try:
        os.unlink(found.job_file(*BENCHMARK).format(**values))
    except FileNotFoundError:
        pass


def record_imports(node: str) -> None:
    """With $MIM_CODE_READS naming a folder: write the modules of the pipeline package this process imported to
    <folder>/<node id>.json (merged with an earlier run's). tests/test_fingerprints.py compares them with the
    code each node declares (its import closure, pipeline.orchestration.fingerprints)."""
    folder = os.environ.get(CODE_READS)
    if not folder:
        return
    import json
    from pathlib import Path

    spec = getattr(sys.modules["__main__"], "__spec__", None)       # the node's own CLI runs as __main__
    names = {m for m in sys.modules if m.split(".")[0] == "pipeline"} | ({spec.name} if spec else set())
    path = Path(folder) / f"{node}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    before = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(sorted(set(before) | {n for n in names if n.split(".")[0] == "pipeline"})))


def delegate_to_forkserver() -> int | None:
    """Run this node process (`python -m pipeline.stages.<group>.<stage> ...`) in a child of the fork server at
    $MIM_FORKSERVER (pipeline.orchestration.forkserver): its exit status, or None to run here."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if not os.environ.get("MIM_FORKSERVER") or spec is None or not spec.name.startswith("pipeline.stages."):
        return None
    from pipeline.orchestration import forkserver

    return forkserver.delegate(spec.name, sys.argv[1:])


def mark_startup() -> None:
    """The node's first own work begins: write time.time() into the file $MIM_STARTUP_MARK names, if it is set."""
    path = os.environ.get("MIM_STARTUP_MARK")
    if path:
        with open(path, "w") as f:
            f.write(repr(time.time()))


@contextmanager
def exclusive(node: str):
    """Hold results/.locks/<node>.lock while the node runs: a second run of the same node at once (two
    shells, two DAG tools) fails at once with a one-line error instead of writing over the first's files.
    The lock is the kernel's (flock), so it goes away with its process, even after SIGKILL."""
    path = layout.RESULTS / ".locks" / f"{node}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        for attempt in range(5):           # a moment's grace: a tracking sync may probe it (tracking._running)
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == 4:
                    f.seek(0)
                    raise PipelineError(f"{node} is already running (pid {f.read().strip() or '?'}); "
                                        "wait for it to finish or stop it, then run it again") from None
                time.sleep(0.05)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_params(path, params: dict, sections: list[str]) -> None:
    """The resolved params a node used, written beside its outputs."""
    text = yaml.safe_dump({s: params[s] for s in sections}, sort_keys=False)
    checkpoint.atomic_write(path, lambda p: p.write_text(text))


def dbot_key(text: str) -> str:
    """--stage value of the dBOT nodes: '<chain>_stage<k>', e.g. random_stage1 (their Snakemake/DVC key)."""
    from pipeline.layout import parse_dbot_key

    try:
        parse_dbot_key(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
