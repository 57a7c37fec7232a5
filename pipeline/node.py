"""What every node does around its work: a tracked MLflow run and the resolved params beside its outputs."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from pipeline.cli import write_params
from pipeline.config import section_hash
from pipeline.tracking import NodeRun


@contextmanager
def tracked(params: dict, chain: str, node_id: str, out_dir: Path, sections: list[str],
            tags: dict | None = None, run_id: str | None = None):
    """Start (or continue) the node's child run, log its params, write out_dir/params.yaml, yield the run.

    The run ends FINISHED when the block completes and FAILED when it raises.
    """
    run = NodeRun(params, chain, node_id, dict(tags or {}, params_hash=section_hash(params, sections)), run_id)
    run.log_params({s: params[s] for s in sections})
    write_params(Path(out_dir) / "params.yaml", params, sections)
    try:
        yield run
    except BaseException:
        run.finish(ok=False)
        raise
    run.log_artifacts(Path(out_dir) / "params.yaml")
    run.finish(ok=True)
