"""On a real one-node Slurm cluster (tests/slurm_cluster.py, fixture slurm_cluster; skipped where it cannot start, a
failure with CI=true):

- a tiny pre-training node dispatched by pipeline/orchestration/launch.py with launch.executor=slurm ends bit-identical
  to the inline executor's run;
- the same node interrupted mid-run, by a time-out (submitit's job._interrupt(timeout=True): the warning
  signal, then submitit checkpoints and requeues it) and by a preemption (`scontrol suspend`, `scontrol
  requeue`, `scontrol release`: Slurm kills the job and puts it back in the queue), is requeued, resumes
  from its saved state, ends bit-identical, and continues its MLflow run (exactly one run of that name,
  FINISHED, one loss point per epoch);
- the same node as a 2-task job (launch.tasks=2: two processes in torch.distributed, set up from Slurm's
  environment by submitit's TorchDistributedEnvironment) ends with the inline run's weights within float
  tolerance;
- the launcher's one-line errors for a refused sbatch and a cancelled job, and SIGTERM to the waiting
  submitter cancelling its job;
- a representative part of the tiny DAG (prepare_data -> pretrain@mae -> knn@mae, linprobe@mae: the report's
  inputs for one method) runs through the Snakemake profile profiles/slurm (snakemake-executor-plugin-slurm),
  every rule as its own Slurm job. The whole tiny DAG (~80 jobs) would take many minutes on 2 cores.
"""
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import COPIED, ROOT, cannot_start, run_cli
from data_parallel import assert_close_states
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

pytestmark = pytest.mark.slurm

NODE = "pretrain@seed0-mae"
EPOCHS, STEPS_PER_EPOCH = 3, 11           # tiny: 1,407 train images, batch 128
ARGS = ["--preset", "tiny", "--method", "mae", "--set", f"pretrain.epochs={EPOCHS}",
        "--set", "pretrain.checkpoint_every_min=0"]          # state saved after every step: interruptible anywhere
ENV = {"OMP_NUM_THREADS": "1"}            # the same thread count inline and in the job (bit-identity), and 2 cores
WEIGHTS = "results/seed0/pretrain/mae/encoder.safetensors"


def slurm_args(timeout_min: int) -> list[str]:
    # 1 CPU and 3 GB fit the 2-core test node (the defaults, 8 CPUs / 32 GB, are refused by sbatch there).
    # timeout_min: submitit asks for the warning signal 90 s before the limit; 3 min leaves it 90 s after the
    # start (keep >= 60 s: earlier, it can come before submitit has installed its handler), and any signal
    # then counts as a time-out (after min(0.8 T, T - 10 min)); 60 min: any signal counts as a preemption.
    return ["--set", "launch.executor=slurm", "--set", "launch.slurm.cpus_per_task=1",
            "--set", "launch.slurm.mem_gb=3", "--set", f"launch.slurm.timeout_min={timeout_min}"]


def sacct(job_id: str, *extra) -> list[str]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State", *extra],
                         capture_output=True, text=True, check=True).stdout
    return [s.strip() for s in out.splitlines() if s.strip()]


def final_state(job_id: str, seconds: float = 60) -> str:
    """The job's state once Slurm has recorded its end (its result file comes a moment before that)."""
    deadline = time.time() + seconds
    while (state := sacct(job_id)[-1]) in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING") and time.time() < deadline:
        time.sleep(0.5)
    return state


@pytest.fixture(scope="module")
def prepared(slurm_cluster, tmp_path_factory):
    """The tiny data prepared once, and the uninterrupted inline run's weights (the reference)."""
    d = tmp_path_factory.mktemp("slurm_prepared")
    for name in COPIED:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, d / name)
    env = dict(ENV, MLFLOW_TRACKING_URI=f"sqlite:///{d}/mlflow.db")
    run_cli(sys.executable, "-m", "pipeline.stages.training.prepare_data", "--preset", "tiny", cwd=d, env=env)
    run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", *ARGS, cwd=d, env=env)
    return d, load_file(d / WEIGHTS)


def with_data(workdir, prepared):
    shutil.copytree(prepared[0] / "results/prepare_data", workdir / "results/prepare_data")


def assert_same_weights(workdir, reference):
    got = load_file(workdir / WEIGHTS)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_pretrain_on_slurm_is_bit_identical_to_inline(workdir, prepared):
    with_data(workdir, prepared)
    proc = run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", *ARGS, *slurm_args(60), env=ENV)
    job = re.search(rf"{NODE}: submitted as slurm job (\d+)", proc.stdout).group(1)
    assert final_state(job) == "COMPLETED"
    assert_same_weights(workdir, prepared[1])


def test_two_task_job_trains_like_one_process(workdir, prepared):
    with_data(workdir, prepared)
    proc = run_cli(sys.executable, "-m", "pipeline.stages.training.pretrain", *ARGS, *slurm_args(60),
                   "--set", "launch.tasks=2", env=ENV)
    job = re.search(rf"{NODE}: submitted as slurm job (\d+)", proc.stdout).group(1)
    assert final_state(job) == "COMPLETED" and "rank 0/2 joined" in proc.stdout
    assert_close_states(load_file(workdir / WEIGHTS), prepared[1], "2-task slurm job")


def sleeps(params, args):
    import time

    time.sleep(120)


def test_refused_and_cancelled_jobs_are_one_line_errors(workdir, slurm_cluster, monkeypatch):
    """sbatch refusing the params' 8 CPUs on this 2-CPU node, and a job cancelled while it runs (no result)."""
    from pathlib import Path

    from pipeline import config
    from pipeline.errors import PipelineError
    from pipeline.orchestration import launch

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))      # the job unpickles `sleeps` from here
    params = config.load("tiny", ["launch.executor=slurm", "launch.slurm.cpus_per_task=64"])
    with pytest.raises(PipelineError, match=r"could not submit the slurm job: sbatch: error: .*(processors|CPU).*"
                                            r"cpus_per_task 64"):
        launch.run(sleeps, params, {}, "unit")

    params = config.load("tiny", ["launch.executor=slurm", "launch.slurm.cpus_per_task=1", "launch.slurm.mem_gb=2"])
    def cancel_when_running():
        deadline = time.time() + 60
        while time.time() < deadline:
            jobs = subprocess.run(["squeue", "-h", "-n", "unit", "-t", "R", "-o", "%A"],
                                  capture_output=True, text=True).stdout.split()
            if jobs:
                subprocess.run(["scancel", *jobs])
                return
            time.sleep(0.2)
    threading.Thread(target=cancel_when_running, daemon=True).start()
    with pytest.raises(PipelineError, match=r"unit: slurm job \d+ ended without a result \(state CANCELLED"):
        launch.run(sleeps, params, {}, "unit")


def test_a_two_node_job_reaches_sbatch_as_two_nodes(workdir, slurm_cluster, monkeypatch):
    """launch.slurm.nodes: the one-node test cluster refuses two nodes of one task each (it could run the two
    tasks on its one node), which shows the request reached sbatch as two nodes."""
    from pathlib import Path

    from pipeline import config
    from pipeline.errors import PipelineError
    from pipeline.orchestration import launch

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    params = config.load("tiny", ["launch.executor=slurm", "launch.tasks=2", "launch.slurm.nodes=2",
                                  "launch.slurm.cpus_per_task=1", "launch.slurm.mem_gb=1"])
    with pytest.raises(PipelineError, match=r"could not submit the slurm job: sbatch: error: (?i:.*node).*nodes 2 x "
                                            r"1 tasks"):
        launch.run(sleeps, params, {}, "unit", distributed_ok=True)


def test_sigterm_to_the_submitter_cancels_its_job(workdir, slurm_cluster):
    """Snakemake stopping a rule (or `timeout`) sends SIGTERM to the waiting submitter: no job is left running."""
    code = ("import test_slurm; from pipeline import config; from pipeline.orchestration import launch; "
            "launch.run(test_slurm.sleeps, config.load('tiny', ['launch.executor=slurm', "
            "'launch.slurm.cpus_per_task=1', 'launch.slurm.mem_gb=2']), {}, 'unit')")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=f"{ROOT / 'tests'}{os.pathsep}{workdir}"))
    deadline, jobs = time.time() + 90, []
    while time.time() < deadline and not jobs and proc.poll() is None:
        jobs = subprocess.run(["squeue", "-h", "-n", "unit", "-t", "R", "-o", "%A"],
                              capture_output=True, text=True).stdout.split()
        time.sleep(0.2)
    proc.terminate()
    out = proc.communicate(timeout=60)[0]
    assert jobs and f"interrupted: cancelling job {jobs[0]}" in out, out[-2000:]
    assert proc.returncode != 0 and final_state(jobs[0]).startswith("CANCELLED")


def saved_step(state) -> int:
    try:
        return torch.load(state, weights_only=True)["step"]
    except Exception:                      # not written yet
        return 0


def job_state(job_id: str) -> str:
    """squeue's state and reason of a job ("PENDING JobHeldAdmin"); "" once it has left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout
    return out.strip()


def preempt(job: str, seconds: float = 120) -> None:
    """Slurm's preemption by requeue, then wait until the job runs again. Suspended first: a requeued running
    job gets SIGTERM (which submitit ignores) and KillWait (5 s) before SIGKILL, in which a fast tiny run can
    finish; a suspended one is killed at once and comes back held (JobHeldAdmin). The hold is set once the
    killed job has completed: a release sent before that is lost (the job then stays held), so the release is
    sent whenever the job is seen held."""
    for cmd in ("suspend", "requeue"):
        subprocess.run(["scontrol", cmd, job], check=True)
    deadline, seen = time.time() + seconds, []
    while time.time() < deadline:
        seen.append(state := job_state(job))
        if "Held" in state:
            subprocess.run(["scontrol", "release", job], check=True)
        elif state.startswith("RUNNING") and any(s.startswith("PENDING") for s in seen) or state == "":
            return                                # running again after its requeue, or already ended
        time.sleep(0.2)
    # Seen once in many runs (a loaded 2-core machine): the killed batch step's slurmstepd dumped core, and the
    # released job stayed "PENDING None". What Slurm says of the job and the node, for whoever meets it next:
    said = [subprocess.run(cmd, capture_output=True, text=True).stdout for cmd in (
        ["scontrol", "show", "job", job], ["sinfo", "-N", "-o", "%N %T %E"])]
    log = Path(os.environ["SLURM_CONF"]).parents[1] / "log" / "slurmctld.log"
    said.append("\n".join(log.read_text().splitlines()[-40:]) if log.exists() else f"{log}: none")
    pytest.fail(f"job {job} did not run again within {seconds} s of its requeue: {sorted(set(seen))}\n" +
                "\n".join(said))


@pytest.mark.parametrize("how", ["timeout", "preempt"])
def test_interrupted_job_requeues_and_resumes_bit_identical(how, workdir, prepared):
    import submitit

    with_data(workdir, prepared)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.stages.training.pretrain", *ARGS,
                             *slurm_args(3 if how == "timeout" else 60)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, **ENV))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    state = workdir / f"results/.resume/{NODE}/state.pt"
    deadline, job, step = time.time() + 240, None, 0
    try:
        while time.time() < deadline and proc.poll() is None:      # wait for a save in the middle of epoch 2
            job = job or next((m.group(1) for m in map(re.compile(r"submitted as slurm job (\d+)").search, lines)
                               if m), None)
            step = saved_step(state)
            if job and step > STEPS_PER_EPOCH and step % STEPS_PER_EPOCH:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"the job ended or never got mid-run (job {job}, step {step}):\n{''.join(lines)[-3000:]}")
        if how == "timeout":
            submitit.SlurmJob(folder=workdir / "results/.submitit" / NODE, job_id=job)._interrupt(timeout=True)
        else:
            preempt(job)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", str(job)], check=False)
    reader.join(10)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    resumed = [int(s) for s in re.findall(rf"resuming results/.resume/{NODE}/state.pt at step (\d+)", out)]
    assert resumed and step <= resumed[0] < EPOCHS * STEPS_PER_EPOCH, out[-3000:]
    assert ("this job is timed-out" if how == "timeout" else "DUE TO JOB REQUEUE") in out
    assert out.count("Loading pickle") == 2                 # ran twice: before and after the requeue
    assert final_state(job) == "COMPLETED" and "REQUEUED" in sacct(job, "-D")
    assert_same_weights(workdir, prepared[1])

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              f"attributes.run_name = '{NODE}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")}) == list(range(EPOCHS))


def test_snakemake_slurm_profile_runs_one_methods_report_inputs(workdir, slurm_cluster):
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        cannot_start("snakemake-executor-plugin-slurm is not installed (pip install -e .)")
    targets = ["results/seed0/knn/mae/metrics.json", "results/seed0/linprobe/mae/metrics.json"]
    # the local test cluster: 2 CPUs, account root, partition debug; each rule asks for launch.slurm.mem_gb (a job
    # step needs ~1.4 GB: Snakemake + the stage) and timeout_min; status checks every second, not every 30 s
    tiny = (workdir / "params/presets/tiny.yaml").read_text()
    (workdir / "params/presets/tiny_slurm.yaml").write_text(tiny + "launch: {slurm: {mem_gb: 3, timeout_min: 10}}\n")
    proc = run_cli(
        sys.executable, "-m", "snakemake", "--profile", str(ROOT / "profiles/slurm"), "--config", "preset=tiny_slurm",
        "--cores", "2", "--default-resources", "slurm_account=root", "slurm_partition=debug", "mem_mb=2000",
        "runtime=10", "--seconds-between-status-checks", "1", "--slurm-init-seconds-before-status-checks", "1",
        "--latency-wait", "5", *targets, env=ENV, timeout=600)
    jobs = re.findall(r"submitted with SLURM jobid (\d+)", proc.stdout + proc.stderr)
    assert len(jobs) == 4, proc.stderr[-3000:]            # prepare_data, pretrain, knn, linprobe
    assert all(final_state(j) == "COMPLETED" for j in jobs)
    assert all((workdir / t).is_file() for t in targets)
