"""MLflow bookkeeping against a real (sqlite) store: the tracking URI, parent and child runs found
again, rank 0 finding the run its trial opens, child runs closed as Tune says, the names and links
a user sees, and the fluent API leaving no environment behind."""

import os

import pytest

from tmad_ray import recipe, tracking
from tmad_ray.config import config_from_dict, load_config
from tmad_ray.search.mlflow_runs import close_trial_runs


def test_tracking_uri_from_config_environment_or_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(config_from_dict({}).tracking) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri(config_from_dict({}).tracking) == "http://mlflow:5000"
    explicit = config_from_dict({"tracking": {"tracking_uri": "sqlite:///x.db"}}).tracking
    assert tracking.resolve_tracking_uri(explicit) == f"sqlite:///{tmp_path}/x.db"


def test_a_trials_run_is_found_by_its_tags_within_its_study(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = tracking.client(uri)
    exp = tracking.experiment_id(client, "e")
    parent = tracking.open_parent(client, exp, "study-1")
    tracking.open_child(client, exp, parent, "study-0", "t1", "trial_1")  # the same trial id in another study
    assert tracking.trial_run_id(client, {"run_id": "abc"}) == "abc"
    opened = tracking.open_child(client, exp, parent, "study-1", "t1", "trial_1")
    assert tracking.trial_run_id(client, {"experiment_id": exp, "study": "study-1", "trial": "t1"}) == opened
    with pytest.raises(tracking.TrackingError, match="no MLflow run tagged"):
        tracking.trial_run_id(client, {"experiment_id": exp, "study": "study-1", "trial": "t9"})


def test_parent_and_child_runs_are_found_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts under ./mlruns
    client = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(client, "e")
    parent = tracking.open_parent(client, exp, "study-1")
    child = tracking.open_child(client, exp, parent, "study-1", "t1", "trial_1")
    client.set_terminated(child, status="FAILED")
    again = tracking.open_child(client, exp, parent, "study-1", "t1", "trial_1")
    assert again == child and client.get_run(child).info.status == "RUNNING"
    # a trial Tune lost (driver killed before it saved it) is sampled again under a new id: same run
    lost = tracking.open_child(client, exp, parent, "study-1", "t7", "trial_7", trial_number=3)
    client.set_terminated(lost, status="KILLED")
    again = tracking.open_child(client, exp, parent, "study-1", "t8", "trial_8", trial_number=3)
    assert again == lost and client.get_run(lost).data.tags[tracking.TRIAL_TAG] == "t8"
    assert tracking.open_child(client, exp, parent, "study-2", "t9", "trial_9", trial_number=3) != lost
    assert client.get_run(child).data.tags[tracking.PARENT_TAG] == parent
    metrics = {"epoch": 2, "val_accuracy": 0.5, "val_per_class": {"A": 1.0, "B 1?": 0.0}, "flag": True,
               "val_confusion": [[1, 0], [1, 0]]}
    assert tracking.epoch_metrics(metrics) == {"epoch": 2.0, "val_accuracy": 0.5, "val_acc/A": 1.0,
                                               "val_acc/B 1_": 0.0}
    tracking.log_epoch(client, child, metrics, ["A", "B 1?"])
    names = {a.path for a in client.list_artifacts(child)}
    assert names == {"confusion_matrix.png", "per_class.json"}
    assert [m.step for m in client.get_metric_history(child, "val_accuracy")] == [2]
    # MLflow's compare page plots the first metric it meets: the best so far, then validation
    assert list(tracking.epoch_metrics({**metrics, "best_val_accuracy": 0.5}))[:2] == ["best_val_accuracy",
                                                                                     "val_accuracy"]


def test_child_runs_end_as_tune_says_their_trials_ended(tmp_path, monkeypatch):
    """A trial killed by Tune mid-update may leave its run RUNNING or even FAILED; the driver's
    close sets every child from Tune's results, at the time of the trial's last report (not the
    study's end), and puts an errored trial's error on its run and its best score in its name."""
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"tracking": {"experiment": "e"}})
    client = tracking.client(f"sqlite:///{tmp_path}/m.db")
    exp = tracking.experiment_id(client, "e")
    parent = tracking.open_parent(client, exp, "study-1")
    runs = {t: tracking.open_child(client, exp, parent, "study-1", t, f"trial_{t}") for t in ("a", "b", "c", "d")}
    client.set_terminated(runs["a"], status="FAILED")  # a racing shutdown got there first
    other = tracking.open_child(client, exp, parent, "study-2", "a", "trial_a")  # another study's run: untouched
    recipe = {"alpha": 1.0, "beta": 2.0, "gamma": 0.1, "delta": 0.5, "temperature": 4.0, "align_layers": "-1"}
    rows = [{"trial": "a", "trial_number": 0, **recipe, "val_accuracy": 0.75, "epochs": 4, "status": "COMPLETED",
             "error": None, "ended": 1_700_000_000},
            {"trial": "b", "trial_number": 1, **recipe, "val_accuracy": 0.5, "epochs": 1, "status": "STOPPED (ASHA)",
             "error": None, "ended": 1_700_000_100},
            {"trial": "c", "trial_number": 2, **recipe, "val_accuracy": None, "epochs": 0, "status": "ERROR",
             "error": "RuntimeError: out of memory", "ended": None}]
    close_trial_runs(client, cfg, "study-1", rows)
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert status == {"a": "FINISHED", "b": "FINISHED", "c": "FAILED", "d": "KILLED"}
    assert client.get_run(runs["c"]).data.tags["tune_error"] == "RuntimeError: out of memory"
    assert client.get_run(runs["a"]).data.metrics["best_val_accuracy"] == 0.75
    assert client.get_run(runs["b"]).data.tags["tune_status"] == "STOPPED (ASHA)"
    assert client.get_run(other).info.status == "RUNNING"
    # each run ends when its trial did; the names say the number, the score, the recipe, an ASHA stop
    assert client.get_run(runs["a"]).info.end_time == 1_700_000_000_000
    assert client.get_run(runs["b"]).info.end_time == 1_700_000_100_000
    assert client.get_run(runs["a"]).info.run_name == "#0 val 0.750 · a=1 b=2 g=0.1 d=0.5 T=4.0 L=[-1]"
    assert client.get_run(runs["b"]).info.run_name.endswith("L=[-1] (stopped at epoch 1)")
    assert client.get_run(runs["c"]).info.run_name == "#2 a=1 b=2 g=0.1 d=0.5 T=4.0 L=[-1]"


def test_the_mlflow_view_names_trials_and_keeps_the_parent_short():
    from tmad_ray.search.driver import progress_reporter
    from tmad_ray.search.mlflow_runs import study_params
    from tmad_ray.search.results import runs_url

    cfg = load_config(None)
    params = study_params(cfg)
    searched = ("alpha", "beta", "gamma", "delta", "temperature", "align", "layers")
    assert len(params) <= 12 and not any(w in k for k in params for w in searched)  # "alpha" once, on the trials
    assert recipe.layers_param("-1") == "[-1]"  # never looks like a number to MLflow's charts
    assert runs_url("sqlite:////x/mlflow.db", "3") == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType="
                                                        "machine_learning&orderByKey=metrics.%60best_val_accuracy%60"
                                                        "&orderByAsc=false")
    assert runs_url("https://u:pw@mlflow.example/", "3").startswith("https://***@mlflow.example/#/experiments/3/runs?")
    r = progress_reporter(cfg)  # Tune's live table: what a user watches, not the first four metrics
    assert r._metric_columns == {"epoch": "epoch", "val_accuracy": "accuracy", "best_val_accuracy": "best so far",
                                 "train_loss": "loss"}
    assert list(r._parameter_columns) == ["trial_number", "alpha", "beta", "gamma", "delta", "temperature",
                                          "align_layers"]


def test_mlflow_fluent_tracking_does_not_leak_to_later_subprocesses(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.fluent_tracking(f"sqlite:///{tmp_path}/a.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/a.db" == mlflow.get_tracking_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    with tracking.fluent_tracking(f"sqlite:///{tmp_path}/a.db"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mine:5000" == mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(None)


@pytest.mark.parametrize("body, expected", [
    ("Invalid Host header - possible DNS rebinding attack detected",
     "refused the host name '127.0.0.1' (HTTP 403, MLflow 3's DNS-rebinding check; not a credentials problem): "
     "start the server with `mlflow server --allowed-hosts 127.0.0.1,127.0.0.1:*`"),
    ("Permission denied", "refused the credentials (HTTP 403)"),
], ids=["host-check", "credentials"])
def test_a_403_says_whether_the_host_or_the_credentials_were_refused(body, expected):
    # a loopback server answering as MLflow 3 does to a Host it does not allow (a Kubernetes service name)
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(403)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(tracking.TrackingError) as e:
            tracking.check_tracking_store(f"http://127.0.0.1:{httpd.server_port}", timeout_s=5, tries=1)
        assert expected in str(e.value)
    finally:
        httpd.shutdown()
