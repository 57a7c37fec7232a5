"""What the generated rules (rules/nodes.smk) share: a node's inputs, outputs, logs and resources from its entry in
the node table (pipeline/dag.py), warm node starts, and the record in DVC after a run.

Inputs: PARAMS (resolved params) and config["preset"] from the Snakefile. Outputs: none.
"""
import atexit
import os
import sys

from pipeline.orchestration import cli

TRAIN_THREADS = max(1, workflow.cores // 2)   # two small single-thread trainings side by side outrun one on two
BENCHMARK = cli.BENCHMARK                      # a job's wall time and memory: results/seed<S>/benchmarks/<node>/<key>.tsv


def node_inputs(node):
    """The node's inputs for one job (wildcards -> its instance in the table), with its fingerprint."""
    def inputs(wildcards):
        return {**node.inputs(PARAMS, node.instance(PARAMS, wildcards)), "fingerprint": fingerprint_of(node, wildcards)}
    return inputs


def fingerprint_of(node, wildcards):
    return fingerprints.pattern(node).format(**wildcards)


def node_outputs(node):
    """Named outputs; pictures a person looks at go to `snakemake --report` (report(); labelled with the node id
    where the node has instances: the report's table shows one row per label, so the report node's own pictures
    have none)."""
    labels = {"labels": {"node": node.id_pattern()}} if node.wildcards else {}
    out = {}
    for name, o in node.outputs(PARAMS).items():
        paths = [report(p, **o.report, **labels) if o.report else p for p in o.paths]
        out[name] = paths[0] if len(paths) == 1 else paths
    return out


def node_resources(node):
    """Slurm's (and any executor's) view of a job, from params launch.*: memory and time of a compute node's job,
    GPUs of a training node's; a node Snakemake runs itself asks for nothing."""
    if node.local:
        return {}
    slurm = PARAMS["launch"]["slurm"]
    out = {"mem_mb": slurm["mem_gb"] * 1024, "runtime": slurm["timeout_min"]}
    if node.threads == "train" and slurm["gpus_per_node"]:
        out["gpu"] = slurm["gpus_per_node"]
    return out


def node_constraints(node):
    """Each wildcard matches exactly the values its instances take."""
    values = {}
    for inst in node.instances(PARAMS):
        for w in node.wildcards:
            values.setdefault(w, set()).add(str(inst[w]))
    return {w: "|".join(sorted(v)) for w, v in values.items()}


def node_command(node):
    """The job's command (as dvc.yaml's stage runs it): python -m <its CLI> --preset P --seed S --<key> K."""
    return lambda wildcards: node.command(config["preset"], node.instance(PARAMS, wildcards))


def start_forkserver():
    """Nodes of a local run start warm: a fork server (pipeline.orchestration.forkserver) for this Snakemake process's lifetime.

    Off with --config forkserver=0, off Linux, and for jobs that do not run on this machine (an executor plugin
    such as slurm); nodes that start before it has imported torch and the rest (~5 s) start cold."""
    wanted = str(config.get("forkserver", 1)).lower() not in ("0", "false", "no")
    if not wanted or sys.platform != "linux" or not workflow.executor_plugin.common_settings.local_exec:
        return
    from pipeline.orchestration import forkserver

    proc, path = forkserver.start(parent=os.getpid(), wait=False)
    atexit.register(forkserver.stop, proc, path)
    os.environ[forkserver.ENV] = path


def record_in_dvc():
    """One record of what is built: commit every complete node to DVC (dvc.lock and its cache), keeping the files'
    modification times (pipeline.orchestration.record). Off with --config record=0; skipped, with one line, where
    there is no DVC repository or dvc.yaml was generated for another preset. Never fails the run."""
    if str(config.get("record", 1)).lower() in ("0", "false", "no") or workflow.dryrun:
        return
    import subprocess

    subprocess.run([sys.executable, "-m", "pipeline.orchestration.record", "--preset", config["preset"]])
