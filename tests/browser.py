"""Headless Chromium for the tests that look at what a person looks at (the Snakemake report, the MLflow UI).

Driven by Playwright's Python API over the system's Chromium (Debian's `chromium` package; Playwright's own
browser downloads are not used). Tests skip with the reason where either is missing.
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

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    """The Chromium executable, or skip the test."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")


@contextmanager
def browser_page(width: int = 1600, height: int = 1000):
    """A fresh page of a headless Chromium, closed afterwards."""
    executable = chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
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


@contextmanager
def mlflow_process(command: list[str], cwd: Path, log_path: Path, env: dict | None = None, timeout_s: float = 180):
    """Start `mlflow <command...> --host 127.0.0.1 --port P` (a free port) in its own session, wait until its
    /health answers, yield its base URL; afterwards stop its whole process group by PID (SIGTERM, then SIGKILL)."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(mlflow), *command, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow {command[0]} did not come up: {log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@contextmanager
def mlflow_ui(store: Path, timeout_s: float = 180):
    """`mlflow ui` on a SQLite store, on localhost only; yields its base URL."""
    with mlflow_process(["ui", "--backend-store-uri", f"sqlite:///{store}", "--workers", "1"], store.parent,
                        store.parent / "mlflow_ui.log", timeout_s=timeout_s) as url:
        yield url
