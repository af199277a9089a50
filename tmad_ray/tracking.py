"""MLflow: one parent run per study, one child run per trial, logged by run id with ``MlflowClient``.

The driver opens the parent run (``--resume`` reopens it, by the id kept beside Tune's state); the
study's MLflow queue (``tmad_ray.tracking_queue``) opens each trial's child run (tag
``mlflow.parentRunId``, found again by ``tmad.trial_id`` when a trial restarts; named by
``trial_run_name``: number and recipe) and writes the per-epoch metrics and artifacts that rank 0
of the trial's Train workers hands it. No Ray process uses the fluent
``mlflow.start_run`` state, which would leave orphan runs in Ray workers; only the study's driver
does, once, to log the best student as an MLflow model to its trial's run (``tmad_ray.serving``).

The tracking URI: ``tracking.tracking_uri`` when the config sets it, else ``MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db`` in the working directory (MLflow 3 refuses the old file store; in a
``ray job submit`` working directory, which Ray deletes, under ``$TMAD_RAY_HOME`` instead). A
relative sqlite path is made absolute, because Tune changes the working directory of trials.
``check_tracking_store`` tries the store before a study prepares anything. Secrets never reach
MLflow, a file or the screen: ``redact`` hides a URI's user info and secret query values, and
``log_params`` masks secret-named keys.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import urllib.parse
from pathlib import Path

from tmad_ray import recipe
from tmad_ray.config import durable_base
from tmad_ray.errors import UserError

STUDY_TAG, TRIAL_TAG, PARENT_TAG = "tmad.study", "tmad.trial_id", "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI
NUMBER_TAG = "tmad.trial_number"  # the searcher's number of the trial (the same when Tune samples it again)

# Config keys whose values are secrets wherever they appear, and secrets inside URIs.
SECRET_KEY = re.compile(r"(password|passwd|secret|token|api[_-]?key|access[_-]?key|credential)", re.IGNORECASE)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+@")
_SECRET_QUERY = re.compile(r"(?P<key>[?&][A-Za-z0-9_.\-]*(?:token|key|secret|password|passwd|signature|sig|"
                           r"credential)=)[^&\s]+", re.IGNORECASE)


class TrackingError(UserError):
    pass


def redact(text: str) -> str:
    """A string with the secrets of any URI in it hidden: ``https://user:pw@host`` -> ``https://***@host``,
    ``?token=abc`` -> ``?token=***``. For everything printed, stored or logged."""
    return _SECRET_QUERY.sub(r"\g<key>***", _USERINFO.sub(r"\g<scheme>***@", str(text)))


def redact_params(params: dict) -> dict:
    """Params with secret-named keys masked and URIs redacted (what reaches MLflow's params)."""
    return {k: ("***" if SECRET_KEY.search(k) and v not in (None, "", "null") else redact(v) if isinstance(v, str)
                else v) for k, v in params.items()}


def redact_tree(tree):
    """A config dump (dicts, lists, scalars) with secret-named keys masked and URIs redacted."""
    if isinstance(tree, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v not in (None, "") else redact_tree(v))
                for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v) for v in tree]
    return redact(tree) if isinstance(tree, str) else tree


def check_tracking_store(uri: str, timeout_s: float = 5.0, tries: int = 2) -> None:
    """Fail in seconds, with what to do, when the tracking store cannot be used: a server that does not
    answer or refuses the credentials, or a sqlite file whose directory is missing or read-only.
    (MLflow's own client retries for minutes and then raises a long traceback.)"""
    shown = redact(uri)
    if uri.startswith(("http://", "https://")):
        import requests

        headers, auth = {}, None
        if os.environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
        elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        reason = "no answer"
        for attempt in range(tries):
            try:
                r = requests.get(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                                 headers=headers, auth=auth, timeout=timeout_s)
            except requests.RequestException as e:
                reason = redact(str(e).splitlines()[0])[:160]
                time.sleep(0.5 * (attempt + 1))
                continue
            if r.status_code == 403 and "Invalid Host header" in r.text:
                host = urllib.parse.urlsplit(uri).hostname
                raise TrackingError(f"the MLflow tracking server {shown} refused the host name {host!r} (HTTP 403, "
                                    "MLflow 3's DNS-rebinding check; not a credentials problem): start the server "
                                    f"with `mlflow server --allowed-hosts {host},{host}:*` (or its "
                                    "MLFLOW_SERVER_ALLOWED_HOSTS), or reach it by a name it already allows")
            if r.status_code in (401, 403):
                raise TrackingError(f"the MLflow tracking server {shown} refused the credentials (HTTP "
                                    f"{r.status_code}): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                                    "(or MLFLOW_TRACKING_TOKEN)")
            if r.status_code < 500:
                return
            reason = f"HTTP {r.status_code}"
        raise TrackingError(f"cannot reach the MLflow tracking server {shown} ({reason}; {tries} tries of "
                            f"{timeout_s:g} s): start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), or "
                            "set MLFLOW_TRACKING_URI / tracking.tracking_uri to one that runs (sqlite:///mlflow.db "
                            "needs no server)")
    m = re.match(r"^sqlite:///(.+)$", uri)
    if m:
        folder = Path(m.group(1)).parent
        if not folder.is_dir():
            raise TrackingError(f"tracking store {shown}: the folder {folder} does not exist; create it or set "
                                "tracking.tracking_uri to another sqlite:///<path>")
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking store {shown}: the folder {folder} is not writable; set "
                                "tracking.tracking_uri to a sqlite:///<path> you can write")


def resolve_tracking_uri(tracking_cfg) -> str:
    uri = tracking_cfg.tracking_uri
    if "tracking_uri" not in tracking_cfg.model_fields_set and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    m = re.match(r"^sqlite:///(.+)$", uri)
    if m and not m.group(1).startswith("/"):
        uri = f"sqlite:///{(durable_base(Path.cwd()) / m.group(1)).resolve()}"
    return uri


@contextlib.contextmanager
def fluent_tracking(uri: str):
    """MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``register_model``) pointed at ``uri``
    for the block only: ``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in this process's
    environment, which every later subprocess (another ``tune.py``, a Ray worker) would inherit and
    then track to this study's store instead of its own."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets both the variable and MLflow's global


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def find_runs(client, exp_id: str, **tags) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp_id], filter_string=query, max_results=1000)


def open_parent(client, exp_id: str, study: str) -> str:
    """A new parent run for the study (``--resume`` finds it again through the study's state file)."""
    return client.create_run(exp_id, run_name=study, tags={STUDY_TAG: study}).info.run_id


def open_child(client, exp_id: str, parent_id: str, study: str, trial_id: str, run_name: str,
               description: str = "", trial_number: int | None = None) -> str:
    """A trial's child run; a restarted trial gets its own run back. So does a trial Tune lost: when the
    driver is killed before Tune saved a just-started trial, ``--resume`` samples it again (the same
    number and recipe) under a new trial id, and takes over the run of the lost one."""
    for r in find_runs(client, exp_id, **{TRIAL_TAG: trial_id, STUDY_TAG: study}):
        client.update_run(r.info.run_id, status="RUNNING")
        return r.info.run_id
    if trial_number is not None:
        for r in find_runs(client, exp_id, **{NUMBER_TAG: str(trial_number), STUDY_TAG: study}):
            client.set_tag(r.info.run_id, TRIAL_TAG, trial_id)
            client.update_run(r.info.run_id, status="RUNNING")
            return r.info.run_id
    tags = {PARENT_TAG: parent_id, STUDY_TAG: study, TRIAL_TAG: trial_id}
    if trial_number is not None:
        tags[NUMBER_TAG] = str(trial_number)
    if description:
        tags[NOTE_TAG] = description
    return client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id


def trial_run_id(client, run: dict) -> str:
    """The id of a trial's child run: ``run["run_id"]`` when known, else the run tagged with
    ``run["trial"]`` and ``run["study"]`` in ``run["experiment_id"]`` (a study resumed by a new
    driver, whose trial's run an earlier queue opened)."""
    if run.get("run_id"):
        return run["run_id"]
    found = find_runs(client, run["experiment_id"], **{TRIAL_TAG: run["trial"], STUDY_TAG: run["study"]})
    if not found:
        raise TrackingError(f"trial {run['trial']}: no MLflow run tagged {TRIAL_TAG}={run['trial']}, "
                            f"{STUDY_TAG}={run['study']}; its opening was refused (the driver said why)")
    return found[0].info.run_id


def trial_run_name(params: dict, best: float | None = None, stopped_at: int | None = None) -> str:
    """What the runs table shows for a trial: Optuna's trial number (as in the Optuna plots), once it
    has ended its best validation score, the recipe, and whether ASHA stopped it."""
    number = params.get("trial_number")
    return ((f"#{number} " if number is not None else "") + (f"val {best:.3f} · " if best is not None else "")
            + recipe.short(params) + (f" (stopped at epoch {stopped_at})" if stopped_at else ""))


def log_params(client, run_id: str, params: dict) -> None:
    """Params are immutable in MLflow: a restarted trial logs the same values again, which is allowed."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in redact_params(params).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i:i + 100])


def metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def epoch_metrics(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a report, per-class accuracies flattened to ``val_acc/<label>``; the
    best-so-far and validation metrics first (MLflow's compare page plots the first metric it meets)."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for label, acc in metrics.get("val_per_class", {}).items():
        out[metric_key(f"val_acc/{label}")] = float(acc)
    first = sorted(out, key=lambda k: (not k.startswith("best_"), not k.startswith("val_"), "/" in k))
    return {k: out[k] for k in first}


def log_epoch(client, run_id: str, metrics: dict, labels: list[str], timestamp_ms: int | None = None) -> None:
    """Per-epoch metrics (``log_epoch_metrics``) and the epoch's confusion matrix and per-class table
    (``log_epoch_artifacts``)."""
    log_epoch_metrics(client, run_id, metrics, timestamp_ms)
    log_epoch_artifacts(client, run_id, metrics, labels)


def log_epoch_metrics(client, run_id: str, metrics: dict, timestamp_ms: int | None = None) -> None:
    """Per-epoch metrics (step = epoch; ``best_val_accuracy`` is the best so far, the column to sort
    trials by). A write tried again with the same ``timestamp_ms`` is not a second point: MLflow keeps
    one row per (key, timestamp, step, value)."""
    from mlflow.entities import Metric

    step, now = int(metrics["epoch"]), timestamp_ms or int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in epoch_metrics(metrics).items()])


def log_epoch_artifacts(client, run_id: str, metrics: dict, labels: list[str]) -> None:
    """The latest confusion matrix and per-class table (each epoch's replace the last's)."""
    from tmad_ray.plots import plot_confusion

    step = int(metrics["epoch"])
    with tempfile.TemporaryDirectory() as d:
        plot_confusion(metrics["val_confusion"], labels, os.path.join(d, "confusion_matrix.png"),
                       title=f"val, epoch {step}")
        rows = [{"label": lab, "val_accuracy": metrics["val_per_class"].get(lab),
                 "support": int(sum(metrics["val_confusion"][i]))} for i, lab in enumerate(labels)]
        Path(d, "per_class.json").write_text(json.dumps({"epoch": step, "classes": rows}, indent=1))
        client.log_artifacts(run_id, d)
