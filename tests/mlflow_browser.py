"""Headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against `mlflow server`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store: Path, timeout_s: float = 120, extra: tuple[str, ...] = ()):
    """``mlflow server`` on loopback over ``store/mlflow.db`` (artifacts where the runs put them, or
    where ``extra`` says, e.g. ``("--artifacts-destination", "s3://bucket/mlflow")``)."""
    port = free_port()
    log = open(store / "mlflow_server.log", "w")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=store,
                            env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"mlflow server did not start: {(store / 'mlflow_server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def browser(width: int = 1600, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = chromium_paths()
    if found is None:
        raise RuntimeError("no chromium / chromedriver: `make test` installs Debian's chromium and chromium-driver")
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(a)
    opts.binary_location = found[0]
    d = webdriver.Chrome(service=Service(found[1]), options=opts)
    try:
        yield d
    finally:
        d.quit()


def wait_for_text(d, *texts: str, timeout_s: float = 60) -> str:
    """The page's text once it contains every one of ``texts`` (the UI renders after its API calls)."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout_s
    body = ""
    while time.time() < deadline:
        body = d.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"{d.current_url}: {missing} not on the page; it shows: {body[:1500]}")


def close_assistant(d) -> None:
    """MLflow 3.17 opens an assistant panel beside every page; it hides half the table."""
    from selenium.webdriver.common.by import By

    for b in d.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if b.is_displayed():
            b.click()
            time.sleep(0.5)
            return


def expand_parents(d) -> None:
    from selenium.webdriver.common.by import By

    for b in d.find_elements(By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"):
        b.click()
        time.sleep(0.5)


def search_charts(d, text: str) -> None:
    """Type into a run page's "Search metric charts" box."""
    from selenium.webdriver.common.by import By

    box = d.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
    box.send_keys(text)
    time.sleep(1)


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    q = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])})
    return f"{base}/#/compare-runs?{q}&workflowType=machine_learning"
