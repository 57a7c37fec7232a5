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
def mlflow_ui(store: Path, timeout_s: float = 180):
    """`mlflow ui` on a SQLite store, on localhost only; yields its base URL; stopped (its whole process
    group) afterwards."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    log = open(store.parent / "mlflow_ui.log", "w")
    proc = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=store.parent, start_new_session=True)
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
                raise AssertionError(f"mlflow ui did not come up: {(store.parent / 'mlflow_ui.log').read_text()[-2000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
