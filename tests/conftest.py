"""Shared fixtures. Tests run from the repository root (params/ and results/ are cwd-relative)."""
import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
COPIED = ["Snakefile", "dvc.yaml", ".dvcignore", "params", "rules", "pipeline", "pyproject.toml"]


def cannot_start(reason: str):
    """A suite that needs a part this machine may lack (the Slurm test cluster, Chromium, torch.distributed)
    cannot start: skip with the reason, except in CI ($CI=true, as .ci/run sets), where these suites must
    run, so it fails instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def copy_dag(dst: Path) -> Path:
    """Copy the repository's DAG files (Snakefile, dvc.yaml, params, rules, pipeline) into dst."""
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    return dst


# The test files of 30 s and more, longest first (seconds on 2 cores, 3 workers: pytest --durations=0 summed per file)
LONGEST_FIRST = ("test_e2e_snakemake.py",     # 450: the tiny study's build, then the tests that read and rerun it
                 "test_slurm.py",             # 300, mostly waiting on Slurm
                 "test_e2e_dvc.py",           # 180
                 "test_tracking_outage.py",   # 115
                 "test_mlflow_concurrency.py", "test_write_failures.py", "test_evaluation.py", "test_bad_images.py",
                 "test_dag.py", "test_bench.py", "test_e2e_swap.py", "test_distributed.py", "test_engine.py",
                 "test_forkserver.py", "test_dag_table.py", "test_tracking.py", "test_import_weights.py",
                 "test_bench_stream.py")     # 85 to 30


def under_two_global_seeds(step, generator_seed: int = 3):
    """A method's step run twice from the same generator state, after two different global seeds: (first, second)
    outputs. Equal outputs show that its draws (masks, crops) come from the generator given, not the global RNG."""
    import torch
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(step(torch.Generator().manual_seed(generator_seed)))
    return runs


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one pytest-xdist worker per core plus one. A third of the suite's time on 2 cores is spent
    waiting (Slurm's queue, MLflow servers, lock timeouts, the browser), which the extra worker fills."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_finish(session):
    """Once the test modules are imported (torch, timm, MLflow, pandas and the pipeline with them), their objects
    leave the cyclic garbage collector's reach: collections during the tests then walk only what the tests allocate
    (three in-process test files: 31-32 s -> 24-25 s on a 2-core AVX512 CPU; the fork server does the same for warm
    nodes)."""
    gc.freeze()


def pytest_collection_modifyitems(items):
    """Run the longest test files first, so that with the pytest-xdist workers (--dist loadfile) the
    others fill the time around them instead of trailing after (pyproject's --no-loadscope-reorder: by default
    pytest-xdist hands out the files with the most tests first, whatever this order). Under mutmut
    (scripts/mutation.py), the fastest tests first instead: it runs a mutant's tests with -x, so a killed mutant
    stops at its first failing test and most die in the fast unit tests (mutmut measured each test's time once,
    in its stats)."""
    stats = ROOT / "mutmut-stats.json"                  # ROOT is mutants/ when mutmut runs the tests
    if os.environ.get("MUTANT_UNDER_TEST") and stats.exists():
        seconds = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A copy of the repository's DAG files in tmp_path, as the working directory (results land there)."""
    copy_dag(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


@pytest.fixture(scope="session", autouse=True)
def warm_nodes():
    """Every node a test starts as a process (`python -m pipeline.stages.<stage>`) starts warm, from one fork
    server per test process (pipeline.orchestration.forkserver), as Snakemake's local runs start theirs; a node given
    MIM_FORKSERVER="" starts cold. $MIM_TEST_COLD=1: every node cold."""
    from pipeline.orchestration import forkserver

    if sys.platform != "linux" or os.environ.get("MIM_TEST_COLD"):
        yield
        return
    proc, path = forkserver.start(parent=os.getpid(), idle_s=7200)
    os.environ[forkserver.ENV] = path
    yield
    del os.environ[forkserver.ENV]
    forkserver.stop(proc, path)


@pytest.fixture
def one_thread():
    """torch on one thread (child processes inherit it): benchmark tests check outputs, not speed, and stay
    light on a shared machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args, cwd=None, check=True, env=None, timeout=600):
    """Run a command with this interpreter's environment (python/snakemake/dvc of the venv on PATH)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(list(args), cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dry_run_jobs(preset: str, *args) -> set[str]:
    """The node ids `snakemake -n` would run (rule + wildcards of each job; `all` left out), in the working dir."""
    import re

    from pipeline import dag

    out = run_cli("snakemake", "-n", *args, "--config", f"preset={preset}").stdout
    jobs, rule = set(), None
    for line in out.splitlines() + ["rule end:"]:
        head = re.match(r"^(?:local)?rule (\w+):", line)
        if head:
            if rule in dag.NODES and not dag.NODES[rule].wildcards:
                jobs.add(rule)
            rule = head.group(1)
        elif line.strip().startswith("wildcards:") and rule in dag.NODES:
            values = dict(kv.split("=", 1) for kv in line.split(":", 1)[1].strip().split(", "))
            jobs.add(dag.NODES[rule].node_id(values))
            rule = None
    return jobs


@pytest.fixture(scope="session")
def study(tmp_path_factory):
    """The tiny study, built once by Snakemake (91 jobs, warm: pipeline.orchestration.forkserver) for
    tests/test_e2e_snakemake.py (whose last tests kill and rerun its nodes), in a DVC repository with the tiny
    preset's dvc.yaml, so the run ends by recording what it built in DVC (pipeline.orchestration.record).
    $MIM_TINY_STUDY names a tiny study built before, to reuse while working on these tests (they change its
    results)."""
    if os.environ.get("MIM_TINY_STUDY"):
        return Path(os.environ["MIM_TINY_STUDY"])
    workdir = copy_dag(tmp_path_factory.mktemp("study"))
    run_cli("dvc", "init", "--no-scm", "-q", cwd=workdir)
    dvc = run_cli(sys.executable, "-m", "pipeline.orchestration.dvc_yaml", "--preset", "tiny", cwd=workdir).stdout
    (workdir / "dvc.yaml").write_text(dvc)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db",
           "MIM_PARAMS_READS": str(workdir / "reads"),  # each node's params reads (pipeline.orchestration.params_reads)
           "MIM_CODE_READS": str(workdir / "code")}     # and the modules it imported (orchestration.cli)
    proc = run_cli("snakemake", "--cores", "2", "--config", "preset=tiny", cwd=workdir, env=env, timeout=1800)
    (workdir / "snakemake.stderr").write_text(proc.stderr)
    return workdir


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster (tests/slurm_cluster.py) for the session, SLURM_CONF set; stopped after.

    Reuses a cluster already up in $MIM_SLURM_DIR (default /tmp/mim-slurm; `scripts/slurm_cluster.sh up`) and
    leaves it running; otherwise starts one in a fresh /tmp folder and stops its daemons by PID at the end.
    Skips, with the reason, where the cluster cannot start (no apt-get or root to install it, a daemon fails);
    fails instead with CI=true (cannot_start).
    """
    import tempfile

    from slurm_cluster import DEFAULT_DIR, ClusterError, SlurmCluster

    cluster, owned = SlurmCluster(DEFAULT_DIR), False
    if not cluster.is_up():
        cluster, owned = SlurmCluster(tempfile.mkdtemp(prefix="mim-slurm-", dir="/tmp")), True
        try:
            cluster.up_seconds = cluster.up()
        except (ClusterError, OSError, subprocess.SubprocessError) as e:
            shutil.rmtree(cluster.root, ignore_errors=True)
            cannot_start(f"no Slurm test cluster: {e}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        if owned:
            cluster.down()
            shutil.rmtree(cluster.root, ignore_errors=True)
