"""A real single-node Slurm cluster on this host, for the tests and by hand (Debian's slurm-wlm, 22.05).

    python -m tests.slurm_cluster up [--dir D]     # install what is missing, start, wait until the node is idle
    python -m tests.slurm_cluster status [--dir D]
    python -m tests.slurm_cluster down [--dir D]   # stop every daemon `up` started, by PID
    (scripts/slurm_cluster.sh wraps these; default D: /tmp/mim-slurm; then `export SLURM_CONF=D/etc/slurm.conf`)

`up` apt-gets slurmctld, slurmd, slurm-client, munge, slurmdbd (+ its MySQL plugin) and MariaDB when a
binary is missing (root only), writes a one-node slurm.conf for this host (its CPUs and memory; state, spool,
logs and sockets under D), then starts munged, mariadbd, slurmdbd, slurmctld and slurmd in the foreground
mode of each, in the background, recording their PIDs in D/run/. What the configuration must get right
here (each was seen to matter on this machine):
- accounting through slurmdbd: submitit learns job states only from `sacct`; without it a job that dies
  without a result stays UNKNOWN and job.result() waits for ever;
- /etc/slurm/slurm.conf -> D/etc/slurm.conf: the Snakemake Slurm executor's job-step plugin drops SLURM_CONF
  from its inner srun's environment (a real file there is left alone, with a warning);
- cred_expire=10 (a requeued job otherwise waits 120 s before it starts again); bf_interval and
  sched_interval of 2 s (jobs otherwise start only every 30-60 s);
- EnforcePartLimits=ALL (an oversized request is refused at sbatch instead of pending for ever),
  DefMemPerCPU (a job without --mem would take the whole node), MailProg=/bin/true;
- preemption: partition `low` is preempted (requeued) by partition `high`, and the job first gets its
  --signal (SlurmctldParameters=preempt_send_user_signal, the 22.05 spelling), so submitit can checkpoint;
- no cgroups in a container: proctrack/linuxproc, task/none, memory enforced by polling (OverMemoryKill).
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "slurm-wlm-mysql-plugin",
            "mariadb-server-core", "mariadb-client-core"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "sinfo", "sacct", "scontrol", "munged", "mungekey", "slurmdbd",
            "sacctmgr", "mariadbd", "mariadb", "mariadb-install-db"]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"]     # start order; stopped in reverse
CLUSTER = "ci"
ETC_CONF = Path("/etc/slurm/slurm.conf")
DEFAULT_DIR = Path(os.environ.get("MIM_SLURM_DIR", "/tmp/mim-slurm"))
PORTS = {"ctld": 6817, "slurmd": 6818, "dbd": 6819, "db": 13306}


class ClusterError(RuntimeError):
    """The cluster cannot be installed or started here; the message says why."""


def log(msg: str) -> None:
    print(f"[slurm_cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def install() -> None:
    """apt-get the packages when a binary is missing (root, Debian/Ubuntu); ClusterError otherwise."""
    missing = missing_binaries()
    if not missing:
        return
    if not sys.platform.startswith("linux"):
        raise ClusterError(f"not Linux ({sys.platform}); missing {', '.join(missing)}")
    if os.geteuid() != 0:
        raise ClusterError(f"not root, cannot apt-get the Slurm packages (missing {', '.join(missing)})")
    if shutil.which("apt-get") is None:
        raise ClusterError(f"no apt-get here to install the Slurm packages (missing {', '.join(missing)})")
    log(f"installing {' '.join(PACKAGES)} (missing: {', '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                # --no-install-recommends + the *-core MariaDB packages: no init scripts, no perl upgrades
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd[:2])} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}")
    if missing_binaries():
        raise ClusterError(f"still missing after apt-get: {', '.join(missing_binaries())}")


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """The cluster whose configuration, state, logs and PID files live under `root`."""

    def __init__(self, root: Path | str = DEFAULT_DIR, ports: dict | None = None):
        self.root = Path(root).resolve()
        self.ports = dict(PORTS, **(ports or {}))
        self.conf = self.root / "etc" / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- helpers ------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _run(self, *cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        return proc

    def _ok(self, *cmd) -> bool:
        try:
            return self._run(*cmd, check=False, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _pidfile(self, name: str) -> Path:
        return self.root / "run" / f"{name}.pid"

    def _log_tail(self, name: str, n: int = 600) -> str:
        texts = []
        for p in [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log",
                  self.root / "log" / "mariadb.err"]:
            if p.is_file() and (p.stem == name or name == "mariadbd"):
                texts.append(p.read_text(errors="replace")[-n:])
        return " | ".join(t.strip().replace("\n", " / ") for t in texts if t.strip()) or "(no log)"

    def _wait_for(self, what: str, seconds: float, test, daemon: str | None = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if test():
                return
            if daemon and daemon in self._procs and self._procs[daemon].poll() is not None:
                raise ClusterError(f"{daemon} exited ({self._procs[daemon].returncode}) before {what}: "
                                   f"{self._log_tail(daemon)}")
            time.sleep(0.2)
        raise ClusterError(f"timed out after {seconds:.0f} s waiting for {what}: "
                           f"{self._log_tail(daemon or 'slurmctld')}")

    def _start(self, name: str, *cmd) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        self._procs[name] = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                             cwd=self.root / "run")      # a daemon's core dump lands there
        out.close()
        self._pidfile(name).write_text(str(self._procs[name].pid))

    def pids(self) -> dict[str, int]:
        """PIDs recorded by `up` whose processes still run."""
        out = {}
        for name in DAEMONS:
            p = self._pidfile(name)
            if p.is_file():
                pid = int(p.read_text())
                if _alive(pid):
                    out[name] = pid
        return out

    def is_up(self) -> bool:
        return "slurmctld" in self.pids() and self._ok("sinfo", "-h")

    # ---- configuration ------------------------------------------------------------------------
    def write_config(self) -> None:
        cpus = os.cpu_count() or 1
        mem_mb = int(_mem_total_kb() / 1024 * 0.85)          # must not exceed what slurmd itself sees
        d, p = self.root, self.ports
        auth = f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.munge_socket},cred_expire=10"
        self.conf.write_text(f"""\
# one-node test cluster written by tests/slurm_cluster.py
ClusterName={CLUSTER}
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
{auth}
MailProg=/bin/true
SlurmctldPort={p['ctld']}
SlurmdPort={p['slurmd']}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/slurmd-%n
SlurmctldPidFile={d}/run/slurmctld.daemon.pid
SlurmdPidFile={d}/run/slurmd.daemon.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
EnforcePartLimits=ALL
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
MessageTimeout=10
JobRequeue=1
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={p['dbd']}
# the slurmctld -> slurmdbd connection ignores AuthInfo=socket=; it takes the munge socket from here
AccountingStoragePass={self.munge_socket}
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 \
RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
PartitionName=low Nodes={self.host} MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=high Nodes={self.host} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
""")
        dbd = self.root / "etc" / "slurmdbd.conf"
        dbd.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={p['dbd']}
SlurmUser=root
DebugLevel=info
LogFile={d}/log/slurmdbd.log
PidFile={d}/run/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={p['db']}
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
""")
        dbd.chmod(0o600)                      # slurmdbd refuses a readable config

    # ---- up / down ----------------------------------------------------------------------------
    def up(self, link_etc: bool = True) -> float:
        """Start the cluster; returns the seconds it took. ClusterError (with the reason) if it cannot."""
        t0 = time.monotonic()
        install()
        if os.geteuid() != 0:
            raise ClusterError("not root: the daemons run as root (SlurmUser=root) in this test cluster")
        if self.pids():
            raise ClusterError(f"a cluster of {self.root} is already running ({self.pids()}); run `down` first")
        for sub in ("etc", "state", "log", "run", "munge", "db", f"spool/slurmd-{self.host}"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        (self.root / "munge").chmod(0o755)            # munged wants o+x on its socket's folder
        self.write_config()
        try:
            self._up_daemons()
        except BaseException:
            self.down()
            raise
        if link_etc:
            self._link_etc()
        return time.monotonic() - t0

    def _up_daemons(self) -> None:
        d, s = self.root, str(self.munge_socket)
        key = d / "munge" / "munge.key"
        if not key.is_file():
            self._run(_sbin("mungekey"), "--create", f"--keyfile={key}")
        self._start("munged", _sbin("munged"), "-F", f"--key-file={key}", f"--socket={s}",
                    f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                    f"--seed-file={d}/munge/munged.seed")
        self._wait_for("munged", 10, lambda: subprocess.run(
            f"munge -S {s} -n | unmunge -S {s}", shell=True, capture_output=True).returncode == 0, "munged")

        sql = ["mariadb", "--no-defaults", "-S", f"{d}/run/mysqld.sock", "-uroot"]
        if not (d / "db" / "mysql").is_dir():
            with open(d / "log" / "mariadb-install.log", "w") as f:
                rc = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={d}/db", "--user=root",
                                     "--auth-root-authentication-method=normal", "--skip-test-db"],
                                    stdout=f, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                raise ClusterError(f"mariadb-install-db failed ({rc}): see {d}/log/mariadb-install.log")
        self._start("mariadbd", _sbin("mariadbd"), "--no-defaults", f"--datadir={d}/db", "--user=root",
                    f"--socket={d}/run/mysqld.sock", f"--port={self.ports['db']}", "--bind-address=127.0.0.1",
                    f"--pid-file={d}/run/mysqld.pid", f"--log-error={d}/log/mariadb.err",
                    "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900")
        self._wait_for("mariadbd", 30, lambda: self._ok(*sql, "-e", "select 1"), "mariadbd")
        self._run(*sql, "-e", "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw'; "
                              "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF
        self._start("slurmdbd", _sbin("slurmdbd"), "-D")
        self._wait_for("slurmdbd", 30, lambda: self._ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd")
        if CLUSTER not in self._run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster").stdout.split():
            self._run("sacctmgr", "-i", "add", "cluster", CLUSTER)

        self._start("slurmctld", _sbin("slurmctld"), "-D", "-i", "-f", self.conf)
        self._start("slurmd", _sbin("slurmd"), "-D", "-f", self.conf)
        self._wait_for("the node to be idle", 60,
                       lambda: self._run("sinfo", "-h", "-o", "%T", check=False).stdout.split() == ["idle"],
                       "slurmctld")

    def _link_etc(self) -> None:
        ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        if ETC_CONF.is_symlink() or not ETC_CONF.exists():
            if ETC_CONF.is_symlink() or ETC_CONF.exists():
                ETC_CONF.unlink()
            ETC_CONF.symlink_to(self.conf)
            (self.root / "run" / "etc-link").touch()
        else:
            log(f"warning: {ETC_CONF} is a real file; left alone (Snakemake's job-step srun will read it)")

    def down(self) -> float:
        """Cancel every job, stop every daemon `up` recorded (by PID), remove the /etc link; returns seconds."""
        t0 = time.monotonic()
        running = self.pids()
        if "slurmctld" in running:
            jobs = self._run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self._run("scancel", "--full", *jobs, check=False)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self._run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.2)
        # the Slurm daemons first (together), then the ones they talk to
        for group in (["slurmd", "slurmctld"], ["slurmdbd"], ["mariadbd", "munged"]):
            pids = {n: running[n] for n in group if n in running}
            for pid in pids.values():
                _signal(pid, 15)
            for name, pid in pids.items():
                if not self._wait_exit(name, pid, 15):
                    log(f"{name} ({pid}) did not stop in 15 s: SIGKILL")
                    _signal(pid, 9)
                    self._wait_exit(name, pid, 5)
        for name in DAEMONS:
            self._pidfile(name).unlink(missing_ok=True)
        link = self.root / "run" / "etc-link"
        if link.exists():
            if ETC_CONF.is_symlink() and Path(os.readlink(ETC_CONF)) == self.conf:
                ETC_CONF.unlink()
            link.unlink()
        return time.monotonic() - t0

    def _wait_exit(self, name: str, pid: int, seconds: float) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == pid:          # our child: reap it
            try:
                proc.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not _alive(pid):
                return True
            time.sleep(0.1)
        return False

    def status(self) -> str:
        lines = [f"dir {self.root}; daemons {self.pids() or 'none'}"]
        if "slurmctld" in self.pids():
            lines += [self._run("sinfo", check=False).stdout, self._run("squeue", check=False).stdout]
        return "\n".join(lines)


def _mem_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    raise ClusterError("no MemTotal in /proc/meminfo")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:                                     # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.slurm_cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["install", "up", "down", "status", "env"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help=f"state/config folder (default {DEFAULT_DIR})")
    a = parser.parse_args(argv)
    cluster = SlurmCluster(a.dir)
    try:
        if a.action == "install":
            install()
        elif a.action == "up":
            log(f"up in {cluster.up():.1f} s")
            print(f"export SLURM_CONF={cluster.conf}")
            print(cluster.status(), file=sys.stderr)
        elif a.action == "down":
            log(f"down in {cluster.down():.1f} s")
        elif a.action == "status":
            print(cluster.status())
        else:
            print(f"export SLURM_CONF={cluster.conf}")
    except ClusterError as e:
        log(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
