"""Headless Chromium for the tests that look at what a person looks at (the Snakemake report, the MLflow UI).

Driven by Playwright's Python API over the system's Chromium (Debian's `chromium` package; Playwright's own
browser downloads are not used). Tests skip with the reason where either is missing (fail with CI=true:
conftest.cannot_start).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import cannot_start

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    """The Chromium executable, or skip the test."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    cannot_start("no Chromium on PATH (Debian: apt-get install chromium)")


@contextmanager
def browser_page(width: int = 1600, height: int = 1000):
    """A fresh page of a headless Chromium, closed afterwards."""
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        cannot_start("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(command: list[str], port: int, cwd: Path, log_path: Path, env: dict | None = None,
                 timeout_s: float = 180) -> subprocess.Popen:
    """Start `mlflow <command...> --host 127.0.0.1 --port <port>` in its own session (output appended to log_path)
    and wait until its /health answers."""
    mlflow = Path(sys.executable).parent / "mlflow"
    with open(log_path, "a") as log:
        proc = subprocess.Popen([str(mlflow), *command, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"mlflow {command[0]} did not come up: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a process started in its own session, its whole group (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def mlflow_process(command: list[str], cwd: Path, log_path: Path, env: dict | None = None, timeout_s: float = 180):
    """`mlflow <command...>` on a free localhost port, until /health answers: yields its base URL, then stops it."""
    port = free_port()
    proc = start_mlflow(command, port, cwd, log_path, env, timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@contextmanager
def mlflow_ui(store: Path, timeout_s: float = 180):
    """`mlflow ui` on a SQLite store, on localhost only; yields its base URL."""
    with mlflow_process(["ui", "--backend-store-uri", f"sqlite:///{store}", "--workers", "1"], store.parent,
                        store.parent / "mlflow_ui.log", timeout_s=timeout_s) as url:
        yield url
