"""An MLflow server that goes away mid-study: training goes on, nothing is redone, every metric arrives."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.mlflow_browser import free_port
from tests.test_search import epoch_starts, study_overrides, study_runs
from tmad_ray import tracking_queue

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


def serve(store: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``store`` (the same database after a restart)."""
    log = open(store / "server.log", "a")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
                             "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=store, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
                            start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            assert time.time() < deadline and proc.poll() is None, (store / "server.log").read_text()[-2000:]
            time.sleep(0.5)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)
    proc.wait(timeout=30)


def epoch_end_times(tmp_path) -> list[float]:
    logs = (tmp_path / "out").glob("*/trials/*/train_log.jsonl")
    return [json.loads(line)["time"] for p in logs for line in p.open() if '"epoch_end"' in line]


def test_a_study_trains_through_an_mlflow_outage_and_every_epoch_arrives(synth_root, smoke_zoo, tmp_path, ray_local,
                                                                          capsys, monkeypatch):
    from tmad_ray.cli import main

    monkeypatch.chdir(tmp_path)
    store, port, epochs = tmp_path / "store", free_port(), 6
    store.mkdir()
    procs, window = [serve(store, port)], {}

    def outage():  # down after the first epoch, for at least 6 s (the driver looks every 5 s) and 2 more epochs
        while len(epoch_end_times(tmp_path)) < 1:
            time.sleep(0.1)
        kill(procs[0])
        window["from"], n = time.time(), len(epoch_end_times(tmp_path))
        while time.time() < window["from"] + 6 or len(epoch_end_times(tmp_path)) < n + 2:
            time.sleep(0.1)
        window["to"] = time.time()
        procs.append(serve(store, port))

    chaos = threading.Thread(target=outage, daemon=True)
    chaos.start()
    try:
        rc = main(["tune", "--config", str(REPO / "experiments" / "smoke.yaml"),
                   *study_overrides(tmp_path, synth_root, smoke_zoo, "search.num_samples=1", f"train.epochs={epochs}",
                                    f"tracking.tracking_uri=http://127.0.0.1:{port}")])
        chaos.join(timeout=300)
        out = capsys.readouterr().out
        assert rc == 0, out[-3000:]
        # training went on while the server was away, and no epoch was run twice
        assert sum(window["from"] < t < window["to"] for t in epoch_end_times(tmp_path)) >= 2
        assert list(epoch_starts(tmp_path).values()) == [list(range(1, epochs + 1))]
        assert f"MLflow at http://127.0.0.1:{port} unreachable since" in out and "training continues" in out
        assert "is back at" in out
        # every epoch's metrics reached the server once it was back
        c, parents, children = study_runs(f"http://127.0.0.1:{port}")
        assert len(children) == 1 and children[0].info.status == "FINISHED"
        run_id = children[0].info.run_id
        for key in ("val_accuracy", "best_val_accuracy", "train_loss"):  # (the model's own metrics: the best epoch)
            assert sorted({m.step for m in c.get_metric_history(run_id, key)}) == list(range(1, epochs + 1)), key
        assert {"confusion_matrix.png", "per_class.json"} <= {a.path for a in c.list_artifacts(run_id)}
        assert parents[0].info.status == "FINISHED"
    finally:
        kill(procs[-1])


def test_watch_lines_say_an_outage_once_and_its_end_once():
    st = {"uri": "http://mlflow:5000", "queued": 14, "down_since": 1.0e9, "outages": [], "errors": []}
    seen = {}
    first = tracking_queue.watch_lines(st, seen)
    assert len(first) == 1 and "unreachable since" in first[0] and "14 writes queued; training continues" in first[0]
    assert tracking_queue.watch_lines(st, seen) == []  # said once
    back = tracking_queue.watch_lines({**st, "down_since": None, "outages": [(1.0e9, 1.0e9 + 270)],
                                       "errors": ["log_epoch for run r1: INVALID_PARAMETER_VALUE"]}, seen)
    assert "is back" in back[0] and "down 270 s" in back[0] and "refused a write (dropped)" in back[1]
    assert tracking_queue.watch_lines({**st, "down_since": None, "outages": [(1.0e9, 1.0e9 + 270)],
                                       "errors": ["log_epoch for run r1: INVALID_PARAMETER_VALUE"]}, seen) == []


def test_only_an_unreachable_store_is_retried():
    import requests
    from mlflow.exceptions import MlflowException

    assert tracking_queue.unreachable(MlflowException("API request to http://x failed with exception Max retries"))
    assert tracking_queue.unreachable(requests.ConnectionError("refused"))
    assert tracking_queue.unreachable(ConnectionRefusedError())
    assert not tracking_queue.unreachable(MlflowException.invalid_parameter_value("bad metric"))
    assert not tracking_queue.unreachable(KeyError("trial"))


def test_the_queue_writes_in_order_and_drops_only_what_mlflow_refuses(tmp_path):
    """The queue itself (in this process, on a sqlite store): a trial's child run opened and its
    epochs logged in order; a write for a run that does not exist is refused (4xx), dropped and said,
    and the writes behind it still arrive."""
    from tmad_ray import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "q")
    parent = tracking.open_parent(client, exp, "s")
    q = tracking_queue.TrackingQueue(uri)
    run = {"experiment_id": exp, "study": "s", "trial": "t1"}
    q.open_child(exp, parent, "s", "t1", "#0", "", 0, {"alpha": 1.0})
    metrics = {"epoch": 1, "val_accuracy": 0.5, "val_confusion": [[1, 0], [0, 1]], "val_per_class": {"A": 1, "B": 1}}
    q.log_epoch(run, metrics, ["A", "B"], 1_000)
    q.set_tag({"run_id": "0" * 32}, "k", "v")  # no such run
    q.log_epoch(run, {**metrics, "epoch": 2, "val_accuracy": 0.75}, ["A", "B"], 2_000)
    st = q.flush(60)
    assert st["queued"] == 0 and st["delivered"] == 5 and st["down_since"] is None
    assert len(st["errors"]) == 1 and st["errors"][0].startswith("set_tag for run 000")
    assert any("refused a write (dropped)" in line for line in q.news()) and q.news() == []
    child = q.runs["t1"]
    assert [(m.step, m.value) for m in client.get_metric_history(child, "val_accuracy")] == [(1, 0.5), (2, 0.75)]
    assert client.get_run(child).data.params["alpha"] == "1.0"


def test_a_dead_queue_does_not_end_the_study_it_says_what_was_lost(ray_local):
    """The driver drains the queue before it closes the runs: a queue actor that died (OOM, a killed
    process) is said in one line, and the study's end goes on."""
    import ray

    q = tracking_queue.start("sqlite:////nonexistent/mlflow.db", "dead-queue-test")
    ray.get(q.status.remote())
    ray.kill(q)
    said = []
    st = tracking_queue.drain(q, timeout_s=1, say=said.append)
    assert st["lost"] and len(said) == 1 and "the study's queue died" in said[0]
