"""The submitit launcher: inline and local executors run the same work and return its result."""
import pytest

from pipeline import config
from pipeline.errors import PipelineError
from pipeline.orchestration import launch


def work(params, args):
    import os

    return {"study": params["study"], "value": args["x"] * 2, "pid": os.getpid()}


def fails(params, args):
    raise PipelineError("bad thing in the job")


@pytest.fixture
def importable_tests(monkeypatch):
    """The job subprocess unpickles `work` by reference to this module."""
    from pathlib import Path

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


@pytest.mark.parametrize("executor", ["inline", "local"])
def test_executor_runs_the_work(executor, workdir, importable_tests):
    params = config.load("tiny", [f"launch.executor={executor}"])
    out = launch.run(work, params, {"x": 21}, "unit")
    assert out["value"] == 42 and out["study"] == "tiny"
    import os

    assert (out["pid"] == os.getpid()) == (executor == "inline")


def test_local_failure_is_one_line_error(workdir, importable_tests):
    params = config.load("tiny", ["launch.executor=local"])
    with pytest.raises(PipelineError, match="unit failed as local job .*bad thing in the job"):
        launch.run(fails, params, {}, "unit")


def test_slurm_parameters_come_from_params():
    params = config.load("tiny", ["launch.slurm.partition=gpu", "launch.slurm.gpus_per_node=4",
                                  "launch.slurm.setup=['module load cuda']"])
    p = launch.slurm_parameters(params["launch"], "pretrain@mae")
    assert p["slurm_partition"] == "gpu" and p["gpus_per_node"] == 4 and p["slurm_setup"] == ["module load cuda"]
    assert p["timeout_min"] == 240 and "slurm_account" not in p and p["tasks_per_node"] == 1
    import submitit

    submitit.AutoExecutor(folder="/tmp/unused", cluster="debug").update_parameters(**p)   # names submitit knows


def test_a_multi_node_job_spreads_its_tasks_evenly():
    params = config.load("tiny", ["launch.executor=slurm", "launch.tasks=8", "launch.slurm.nodes=2",
                                  "launch.slurm.gpus_per_node=4"])
    p = launch.slurm_parameters(params["launch"], "pretrain@mae", tasks=8)
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (2, 4, 4)
    one = launch.slurm_parameters(params["launch"], "knn@mae")             # evaluation nodes: one task, one node
    assert (one["nodes"], one["tasks_per_node"]) == (1, 1)


def test_refused_submission_is_one_line_error(workdir, monkeypatch):
    """sbatch refusing a job (seen on the test cluster: more CPUs than a node has) names the resources asked."""
    import submitit

    class Refusing:
        def submit(self, job):
            raise submitit.core.utils.FailedJobError(
                "sbatch: error: Batch job submission failed: More processors requested than permitted")

    monkeypatch.setattr(launch, "make_executor", lambda *a: Refusing())
    params = config.load("tiny", ["launch.executor=slurm"])
    with pytest.raises(PipelineError, match=r"unit: could not submit the slurm job: sbatch: error: .*More processors "
                                            r"requested than permitted \(launch.slurm: .*cpus_per_task 8, mem_gb 32"):
        launch.run(work, params, {"x": 1}, "unit")
