"""MLflow: one parent run per study, one child run per trial, logged by run id with ``MlflowClient``.

The driver opens the parent run (``--resume`` reopens it, by the id kept beside Tune's state); each trial driver opens its
child run (tag ``mlflow.parentRunId``, found again by ``tmad.trial_id`` when a trial restarts);
rank 0 of the trial's Train workers logs per-epoch metrics and artifacts to that run id. Nothing
uses the fluent ``mlflow.start_run`` state, which would leave orphan runs in Ray workers.

The tracking URI: ``tracking.tracking_uri`` when the config sets it, else ``MLFLOW_TRACKING_URI``,
else ``sqlite:///mlflow.db`` in the working directory (MLflow 3 refuses the old file store).
A relative sqlite path is made absolute, because Tune changes the working directory of trials.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

STUDY_TAG, TRIAL_TAG, PARENT_TAG = "tmad.study", "tmad.trial_id", "mlflow.parentRunId"


def resolve_tracking_uri(tracking_cfg) -> str:
    uri = tracking_cfg.tracking_uri
    if "tracking_uri" not in tracking_cfg.model_fields_set and os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
    m = re.match(r"^sqlite:///(.+)$", uri)
    if m and not m.group(1).startswith("/"):
        uri = f"sqlite:///{Path(m.group(1)).resolve()}"
    return uri


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def find_runs(c, exp_id: str, **tags) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return c.search_runs([exp_id], filter_string=query, max_results=1000)


def open_parent(c, exp_id: str, study: str) -> str:
    """A new parent run for the study (``--resume`` finds it again through the study's state file)."""
    return c.create_run(exp_id, run_name=study, tags={STUDY_TAG: study}).info.run_id


def open_child(c, exp_id: str, parent_id: str, study: str, trial_id: str, trial_name: str) -> str:
    """A trial's child run; a restarted trial gets its own run back."""
    for r in find_runs(c, exp_id, **{TRIAL_TAG: trial_id, STUDY_TAG: study}):
        c.update_run(r.info.run_id, status="RUNNING")
        return r.info.run_id
    return c.create_run(exp_id, run_name=trial_name,
                        tags={PARENT_TAG: parent_id, STUDY_TAG: study, TRIAL_TAG: trial_id}).info.run_id


def log_params(c, run_id: str, params: dict) -> None:
    """Params are immutable in MLflow: a restarted trial logs the same values again, which is allowed."""
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        c.log_batch(run_id, params=items[i:i + 100])


def metric_key(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


def epoch_metrics(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a report, per-class accuracies flattened to ``val_acc/<label>``."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for label, acc in metrics.get("val_per_class", {}).items():
        out[metric_key(f"val_acc/{label}")] = float(acc)
    return out


def log_epoch(c, run_id: str, metrics: dict, labels: list[str]) -> None:
    """Per-epoch metrics (step = epoch) and the latest confusion matrix and per-class table."""
    import time

    from mlflow.entities import Metric

    from tmad_ray.train.evaluate import plot_confusion

    step, now = int(metrics["epoch"]), int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in epoch_metrics(metrics).items()])
    with tempfile.TemporaryDirectory() as d:
        plot_confusion(metrics["val_confusion"], labels, os.path.join(d, "confusion_matrix.png"),
                       title=f"val, epoch {step}")
        rows = [{"label": lab, "val_accuracy": metrics["val_per_class"].get(lab),
                 "support": int(sum(metrics["val_confusion"][i]))} for i, lab in enumerate(labels)]
        Path(d, "per_class.json").write_text(json.dumps({"epoch": step, "classes": rows}, indent=1))
        c.log_artifacts(run_id, d)
