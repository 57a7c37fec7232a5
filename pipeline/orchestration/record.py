"""One record of what is built: after Snakemake, the nodes it built are committed to DVC (dvc.lock and DVC's cache),
so `dvc status` agrees with Snakemake, and Snakemake still agrees afterwards.

    python -m pipeline.orchestration.record [--preset NAME]   # by hand (the Snakefile does it when a run ends)

Why a commit step: Snakemake decides by modification times and DVC by content hashes recorded in dvc.lock. A
node that Snakemake ran is correct for DVC once dvc.lock holds the hashes of its deps and outs, which is what
DVC's commit writes (and it copies the outs into DVC's cache); nothing is rerun. It commits without relinking:
`dvc commit` on the command line relinks each output from the cache, which gives it a new modification time and
would make Snakemake rerun whatever reads a "newer" file. The other way needs nothing: `dvc repro` runs nodes
in DAG order, so each output is newer than its inputs, and the fingerprints it refreshes first
(pipeline.orchestration.fingerprints) are the same files Snakemake reads.

Only nodes that are up to date are committed (every output present and newer than its inputs); where there is no
DVC repository, or dvc.yaml was generated for another preset, nothing is, with one line saying why. A failure
here never fails the run that built the results: the line says how to record them later.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from pipeline import config, dag
from pipeline.orchestration import fingerprints

DVC_STAGE = "fingerprints"           # dvc.yaml's first stage (pipeline.orchestration.dvc_yaml)


def dvc_preset(dvc_yaml: Path = Path("dvc.yaml")) -> str | None:
    """The preset dvc.yaml was generated for (its `vars: - preset:`), or None without a dvc.yaml."""
    if not dvc_yaml.is_file():
        return None
    for entry in yaml.safe_load(dvc_yaml.read_text()).get("vars", []):
        if isinstance(entry, dict) and "preset" in entry:
            return entry["preset"]
    return None


def up_to_date(params: dict) -> list[str]:
    """The node ids (DVC stage names) of the nodes that are built as Snakemake sees them: every output exists and
    is newer than every input, its fingerprint included. Only these are committed: a node whose code or params
    changed after it ran (its fingerprint is newer) stays stale for DVC too."""
    out = []
    for node, inst in dag.instances(params):
        outs = [Path(p) for paths in node.output_paths(params, inst).values() for p in paths]
        ins = [Path(p) for paths in node.inputs(params, inst).values() for p in paths]
        ins.append(fingerprints.path(node.node_id(inst)))
        if all(p.exists() for p in outs + ins) and \
                min(p.stat().st_mtime_ns for p in outs) >= max(p.stat().st_mtime_ns for p in ins):
            out.append(node.node_id(inst))
    return out


def commit_stages(repo, names: set[str]) -> None:
    """What `repo.commit(name, force=True, relink=False)` does for each stage named, in one pass and one write of
    dvc.lock (dvc.repo.commit's own loop, over the stages chosen): a commit per stage reads dvc.yaml and dvc.lock
    again and writes dvc.lock, about 1.5 s a stage for the tiny study's 91."""
    from dvc.repo import lock_repo

    with lock_repo(repo):
        chosen = [stage for stage in repo.index.stages if stage.name in names]
        for stage in chosen:
            stage.save()
            stage.commit(relink=False)
        if chosen:
            chosen[0].dvcfile.dump_stages(chosen, update_pipeline=False)


def commit_built(preset: str, params: dict | None = None) -> bool:
    """Commit every up-to-date node (up_to_date) to DVC (dvc.lock and the cache), files untouched; True if it did."""
    if not Path(".dvc").is_dir():
        print("record: no DVC repository here (dvc init): what Snakemake built is not recorded in DVC",
              file=sys.stderr)
        return False
    generated = dvc_preset()
    if generated != preset:
        print(f"record: dvc.yaml is for preset {generated}, this run is {preset}: not recorded in DVC "
              f"(python -m pipeline.orchestration.dvc_yaml --preset {preset} > dvc.yaml)", file=sys.stderr)
        return False
    params = params or config.load(preset, check_paths=False)
    fingerprints.refresh(preset, params)          # code or params edited since the run: its nodes stay stale
    stages = up_to_date(params)
    everything = len(stages) == len(dag.instances(params))
    try:
        from dvc.repo import Repo

        with Repo(".") as repo:
            if everything:                  # one pass, one write of dvc.lock
                repo.commit(None, force=True, relink=False)
            else:                           # a run that stopped early or built a part: its up-to-date nodes only
                commit_stages(repo, {DVC_STAGE, *stages})
    except Exception as e:                  # noqa: BLE001  (a DVC lock held, a broken dvc.yaml: the results stay)
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        print(f"record: DVC did not record the results ({why}); they are intact: record them with "
              f"python -m pipeline.orchestration.record --preset {preset}", file=sys.stderr)
        return False
    print(f"record: {len(stages)} of {len(dag.instances(params))} nodes recorded in DVC (dvc.lock)", file=sys.stderr)
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.orchestration.record", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args(argv)
    sys.exit(0 if commit_built(args.preset) else 1)


if __name__ == "__main__":
    main()
