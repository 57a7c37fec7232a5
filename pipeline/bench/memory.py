"""Peak memory, as the memory benchmarks measure it (Linux /proc).

- In this process: rss_mb (RssAnon: its own memory; RssFile: mapped files' pages, the page cache's), PeakSampler
  (a daemon thread that keeps their maxima) and phase (one piece of work between two readings);
- of a child's process tree: tree_memory (RSS summed over the processes and PSS, shared pages split) and
  run_sampled (runs a command and keeps the tree's peaks).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from pipeline.errors import PipelineError


def rss_mb() -> dict[str, float]:
    """{"anon", "file"}: this process's RssAnon and RssFile now, in MB (Linux /proc/self/status)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        raise PipelineError("the memory benchmarks read /proc/self/status: it runs on Linux only") from None
    kb = {k: float(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)
          if k in ("RssAnon", "RssFile")}
    return {"anon": kb["RssAnon"] / 1024, "file": kb["RssFile"] / 1024}


class PeakSampler:
    """Samples rss_mb() every `interval` s in a daemon thread; peak() is the maximum since the last reset()."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.lock, self.stopped = interval, threading.Lock(), threading.Event()
        self.reset()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        now = rss_mb()
        with self.lock:
            self.max = {k: max(self.max[k], v) for k, v in now.items()}

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self._sample()

    def reset(self) -> None:
        with self.lock:
            self.max = rss_mb()

    def peak(self) -> dict[str, float]:
        self._sample()                     # the phase's end counts too
        with self.lock:
            return dict(self.max)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def phase(sampler: PeakSampler, name: str, work) -> tuple[dict, object]:
    """Run work(); {<name>_peak_anon_mb, <name>_peak_file_mb, <name>_s} and its value."""
    sampler.reset()
    start = time.perf_counter()
    value = work()
    seconds = time.perf_counter() - start
    peak = sampler.peak()
    return {f"{name}_peak_anon_mb": peak["anon"], f"{name}_peak_file_mb": peak["file"], f"{name}_s": seconds}, value


def _children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:                       # the process ended
        pass
    return out


def _field_kb(path: str, key: str) -> float:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def tree_memory(pid: int) -> dict:
    """{"rss_mb", "pss_mb", "main_rss_mb", "processes"} of pid and all its descendants now (Linux /proc): RSS
    summed over the processes (pages a fork shares counted in each), and PSS (shared pages split between them)."""
    pids, k = [pid], 0
    while k < len(pids):
        pids += _children(pids[k])
        k += 1
    rss = [_field_kb(f"/proc/{p}/status", "VmRSS:") for p in pids]
    pss = sum(_field_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
    return {"rss_mb": sum(rss) / 1024, "pss_mb": pss / 1024, "main_rss_mb": rss[0] / 1024,
            "processes": sum(1 for r in rss if r > 0)}


def run_sampled(cmd: list[str], cwd: Path, env: dict, interval: float = 0.05, timeout: float = 900) -> dict:
    """Run cmd; {"wall_s", "start", "peak_rss_mb", "peak_pss_mb", "peak_main_rss_mb", "max_processes"}: the peaks of
    tree_memory of its process tree, sampled every `interval` s. A failure raises with the end of its output."""
    import subprocess
    peak = {"rss_mb": 0.0, "pss_mb": 0.0, "main_rss_mb": 0.0, "processes": 0}
    start = time.time()
    with open(cwd / "node.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            now = tree_memory(proc.pid)
            peak = {k: max(peak[k], now[k]) for k in peak}
            if time.time() - start > timeout:
                proc.kill()
            time.sleep(interval)
    wall = time.time() - start
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n"
                            f"{(cwd / 'node.log').read_text()[-3000:]}")
    return {"wall_s": wall, "start": start, "peak_rss_mb": peak["rss_mb"], "peak_pss_mb": peak["pss_mb"],
            "peak_main_rss_mb": peak["main_rss_mb"], "max_processes": peak["processes"]}
