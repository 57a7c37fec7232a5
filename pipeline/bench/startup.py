"""Start-up benchmark: how long each node type takes from process start to its first own work, and in all.

    python -m pipeline.bench.startup [--repeats 3] [--out results/bench]

In a temporary copy of the DAG files (tracking to an SQLite store there), Snakemake builds the tiny study once
(`snakemake --cores 2 --config preset=tiny`: the report needs every node's outputs). Then one node of every node
type (NODES) runs again, --repeats times, each time in a fresh process started as Snakemake starts it
(`python -m pipeline.stages.<stage> --preset tiny ...`), with $MIM_STARTUP_MARK set:

- to_first_work_s: from just before the process is started to the node's first own work, the moment
  pipeline.orchestration.cli.stage_main has parsed the arguments, loaded and validated the params and is about to call
  the node's check() (stage_main writes time.time() into $MIM_STARTUP_MARK then);
- total_s: from the same moment to the process's exit;
- tiny_study_s: the Snakemake build of the tiny study (from an empty results/, with its fork server).

Then the same runs with a fork server (pipeline.orchestration.forkserver, as Snakemake's local runs start one): warm_*.
The medians are the node's numbers. One node (IMPORTS_NODE) then runs under `python -X importtime`: its import
costs by top-level package (import_costs). Written: <out>/startup.json and startup.md, with the targets (TARGETS)
and whether they are met. Timings are only meaningful on an idle machine (the load average before the runs is
recorded beside them).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import config, dag
from pipeline.bench import REPOSITORY
from pipeline.checkpoint import atomic_write, write_json
from pipeline.dag import stage_module
from pipeline.reporting.tables import markdown_table

DAG_FILES = ["Snakefile", "dvc.yaml", "params", "rules", "pipeline", "pyproject.toml"]
PRESET = "tiny"


def _example(node: dag.Node) -> list[str]:
    """One node of the tiny study of this type (on MAE's weights, or MAE's chain, where it has them): its CLI and
    arguments, as its rule runs it."""
    insts = node.instances(config.load(PRESET, check_paths=False))
    inst = next((i for i in insts if {i.get("weights"), i.get("method"), i.get("key")} & {"mae", "random_stage0"}),
                insts[0])
    return [node.name, *node.args(inst)]


NODES = {name: _example(node) for name, node in dag.NODES.items()}   # node type -> its stage CLI and arguments
IMPORTS_NODE = "knn"          # a representative compute node: torch, timm and mlflow
TARGETS = {"to_first_work_s": 2.0, "teacher_swap_total_s": 3.0, "tiny_study_s": 120.0}
DEFINITION = ("to first work: from just before the process starts to the moment pipeline.orchestration.cli.stage_main "
              "has parsed the node's arguments, loaded and validated its params and is about to call its check() "
              "($MIM_STARTUP_MARK); in all: to the process's exit")


def command(node: str) -> list[str]:
    stage, *args = NODES[node]
    return [sys.executable, "-m", stage_module(stage), "--preset", PRESET, *args]


def run(cmd: list[str], root: Path, env: dict, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def build_study(root: Path, env: dict) -> None:
    """Copy the DAG files into root and let Snakemake make the whole tiny study there."""
    for name in DAG_FILES:
        src = REPOSITORY / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).write_bytes(src.read_bytes())
    run(["snakemake", "--cores", "2", "--config", f"preset={PRESET}"], root, env, timeout=3600)


def time_node(node: str, root: Path, env: dict) -> dict:
    """One run of the node in a fresh process (a fork server's child if env names one):
    {"to_first_work_s", "total_s"}."""
    mark = root / "startup.mark"
    mark.unlink(missing_ok=True)
    start = time.time()
    run(command(node), root, dict(env, MIM_STARTUP_MARK=str(mark)))
    end = time.time()
    return {"to_first_work_s": float(mark.read_text()) - start, "total_s": end - start}


def median_times(runs: list[dict], prefix: str = "") -> dict:
    return {prefix + k: statistics.median(r[k] for r in runs) for k in ("to_first_work_s", "total_s")}


def warm_times(root: Path, env: dict, repeats: int) -> dict[str, dict]:
    """Node type -> its median warm_to_first_work_s and warm_total_s, with a fork server in root."""
    from pipeline.orchestration import forkserver

    proc, path = forkserver.start(parent=os.getpid(), cwd=str(root), env=env)
    try:
        env = dict(env, **{forkserver.ENV: path})
        return {node: median_times([time_node(node, root, env) for _ in range(repeats)], "warm_") for node in NODES}
    finally:
        forkserver.stop(proc, path)


def import_costs(importtime: str, top: int = 15) -> list[dict]:
    """`python -X importtime` output -> the costliest top-level packages: for each, cumulative_us, the time of its
    outermost imports (where another package, or the script, imports it: what importing it cost, with whatever
    it imported that was not loaded yet), and self_us, the time spent in its own modules only."""
    stack = []                                        # (level, name, self, cumulative, children): children print first
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|", 2)
        level = (len(name) - len(name.lstrip(" ")) - 1) // 2
        children = []
        while stack and stack[-1][0] > level:
            children.insert(0, stack.pop())
        stack.append((level, name.strip(), int(own), int(cumulative), children))
    costs: dict[str, dict] = {}

    def walk(entry, outer: tuple[str, ...]) -> None:
        _, name, own, cumulative, children = entry
        package = name.split(".")[0]
        cost = costs.setdefault(package, {"package": package, "cumulative_us": 0, "self_us": 0})
        cost["self_us"] += own
        if package not in outer:
            cost["cumulative_us"] += cumulative
        for child in children:
            walk(child, outer + (package,))

    for entry in stack:
        walk(entry, ())
    return sorted(costs.values(), key=lambda c: -c["cumulative_us"])[:top]


def summarise(nodes: list[dict], imports: list[dict], machine_info: dict, repeats: int, tiny_study_s: float) -> dict:
    """startup.json: the nodes' medians, the tiny study's build time, the import costs, the targets and whether
    they are met."""
    slowest = max(nodes, key=lambda n: n["to_first_work_s"])
    swap = next(n for n in nodes if n["node"] == "teacher_swap")
    return {"machine": machine_info, "cpu_capability": machine_info["cpu_capability"], "preset": PRESET,
            "repeats": repeats, "definition": DEFINITION, "nodes": nodes, "tiny_study_s": tiny_study_s,
            "imports_node": IMPORTS_NODE, "imports": imports, "targets": TARGETS,
            "met": {"to_first_work_s": slowest["to_first_work_s"] <= TARGETS["to_first_work_s"],
                    "teacher_swap_total_s": swap["total_s"] <= TARGETS["teacher_swap_total_s"],
                    "teacher_swap_warm_total_s": swap["warm_total_s"] <= TARGETS["teacher_swap_total_s"],
                    "tiny_study_s": tiny_study_s <= TARGETS["tiny_study_s"],
                    "slowest_to_first_work": slowest["node"]}}


def markdown(result: dict) -> str:
    m, met, targets = result["machine"], result["met"], result["targets"]
    yes = lambda ok: "met" if ok else "NOT met"
    swap = next(n for n in result["nodes"] if n["node"] == "teacher_swap")
    slowest = next(n for n in result["nodes"] if n["node"] == met["slowest_to_first_work"])
    return "\n".join([
        f"# Node start-up: preset {result['preset']}, median of {result['repeats']} runs per node", "",
        f"Machine: {m['class']} ({m['model']}, {m['cores']} cores, {m['cpu']}), Python {m['python']}; load average "
        f"before the runs {', '.join(map(str, m['load_average']))} (the targets are for an idle machine).", "",
        f"Definitions: {result['definition']}. Each run is a fresh process, started as Snakemake starts it.", "",
        f"- to first work <= {targets['to_first_work_s']} s for every node: {yes(met['to_first_work_s'])} "
        f"(slowest: {slowest['node']}, {slowest['to_first_work_s']:.2f} s)",
        f"- teacher_swap in all <= {targets['teacher_swap_total_s']} s: cold {yes(met['teacher_swap_total_s'])} "
        f"({swap['total_s']:.2f} s), warm {yes(met['teacher_swap_warm_total_s'])} ({swap['warm_total_s']:.2f} s)",
        f"- the tiny study ({PRESET}, `snakemake --cores 2`, warm nodes) <= {targets['tiny_study_s']:.0f} s: "
        f"{yes(met['tiny_study_s'])} ({result['tiny_study_s']:.0f} s)", "",
        "Cold: a fresh interpreter imports what the node uses. Warm: the node's process hands its run to a child of "
        "a fork server that has torch, timm and MLflow imported (pipeline.orchestration.forkserver).", "",
        *markdown_table(["node", "cold: to first work (s)", "cold: in all (s)", "warm: to first work (s)",
                         "warm: in all (s)"], [
            [n["node"], f"{n['to_first_work_s']:.2f}", f"{n['total_s']:.2f}", f"{n['warm_to_first_work_s']:.2f}",
             f"{n['warm_total_s']:.2f}"] for n in result["nodes"]], "lr"), "",
        f"## Import costs of {result['imports_node']} (python -X importtime), by top-level package", "",
        "cumulative: its outermost imports, with what they imported that was not loaded yet; self: its own modules.",
        "",
        *markdown_table(["package", "cumulative (s)", "self (s)"], [
            [c["package"], f"{c['cumulative_us'] / 1e6:.2f}", f"{c['self_us'] / 1e6:.2f}"] for c in result["imports"]],
            "lr"),
        ""])


def write(result: dict, out: Path) -> None:
    write_json(out / "startup.json", result)
    atomic_write(out / "startup.md", lambda p: p.write_text(markdown(result)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per node type; the median counts (default 3)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="output folder (default results/bench)")
    args = parser.parse_args(argv)
    from pipeline import hardware

    machine_info = hardware.describe_machine()
    with tempfile.TemporaryDirectory(prefix="mim-startup-") as tmp:
        root = Path(tmp)
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        print(f"building the {PRESET} study in {root} (snakemake, minutes) ...", flush=True)
        started = time.monotonic()
        build_study(root, env)
        tiny_study_s = time.monotonic() - started
        print(f"built in {tiny_study_s:.0f} s", flush=True)
        nodes = []
        for node in NODES:
            nodes.append({"node": node, **median_times([time_node(node, root, env) for _ in range(args.repeats)]),
                          "runs": args.repeats})
            print(f"{node}: to first work {nodes[-1]['to_first_work_s']:.2f} s, in all {nodes[-1]['total_s']:.2f} s",
                  flush=True)
        warm = warm_times(root, env, args.repeats)
        for n in nodes:
            n.update(warm[n["node"]])
        cmd = command(IMPORTS_NODE)
        imports = import_costs(run([cmd[0], "-X", "importtime", *cmd[1:]], root, env).stderr)
    result = summarise(nodes, imports, machine_info, args.repeats, tiny_study_s)
    write(result, args.out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
