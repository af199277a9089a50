"""The driver side of one training run: datasets from the clip cache, the ``TorchTrainer``, the export.

Used by ``tmad-ray train`` (one run) and by the search (one run per trial).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tmad_ray.errors import UserError
from tmad_ray.train.loop import train_loop_per_worker
from tmad_ray.train.worker import STUDENT_DIR, RunSpec


def run_spec(cfg, manifest, report, log_path: str | None, mlflow_run: dict | None = None,
             started_at: float | None = None, fit_at: float | None = None, cohort: dict | None = None) -> RunSpec:
    """What every worker needs, all plain data (it travels to the workers), and for a cohort its
    recipes, hub and trials' log directory."""
    targets = report.targets_key if cfg.distill.cache_targets else None
    label_of = {split: {r.path: manifest.label2id[r.label] for r in manifest.rows[split]} for split in ("train", "val")}
    return RunSpec(cfg=cfg.model_dump(), labels=list(manifest.labels),
                   train_entries=dict(report.entries["train"]), val_entries=dict(report.entries["val"]),
                   train_labels={v: label_of["train"][v] for v in report.entries["train"]},
                   val_labels={v: label_of["val"][v] for v in report.entries["val"]},
                   log_path=log_path, mlflow=mlflow_run, targets_key=targets,
                   # the loop logs its start-up phases from when the run began on the driver's side
                   started_at=started_at or time.time(), fit_at=fit_at, **(cohort or {}))


def build_trainer(cfg, manifest, report, name: str, callbacks: list | None = None, log_path: str | None = None,
                  mlflow_run: dict | None = None, storage_path: str | None = None, started_at: float | None = None,
                  fit_at: float | None = None, cohort: dict | None = None):
    """A ``TorchTrainer`` over the cached train/val clips; a run of the same ``name`` in the same
    storage resumes from its latest checkpoint (Ray Train V2). Each worker reads its own share of
    the clip cache (``tmad_ray.data.loader``), in a seeded order that changes every epoch.
    ``cohort`` (``{"recipes": {trial: recipe}, "hub": ..., "trials_dir": ...}``): the run trains
    those students side by side (``train.cohort_loop``); its checkpoints are kept newest first
    (each student's best is exported as it improves, under ``best/``)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tmad_ray.train.cohort_loop import cohort_loop_per_worker

    t = cfg.train
    # kept and picked by what the search optimizes, the same number the searcher is told
    score = {} if cohort else {"checkpoint_score_attribute": cfg.search.metric,
                               "checkpoint_score_order": cfg.search.mode}
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}
    return TorchTrainer(
        cohort_loop_per_worker if cohort else train_loop_per_worker,
        train_loop_config={"spec": run_spec(cfg, manifest, report, log_path, mlflow_run, started_at, fit_at, cohort)},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path or cfg.storage.ray_results, callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not every report's metrics
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures,
                                                   controller_failure_limit=cfg.search.controller_failure_limit),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.num_to_keep, **score)),
    )


@dataclass
class RunOutcome:
    result: object          # ray.train.Result
    best_metrics: dict
    student_dir: Path | None


def export_best(result, out_dir: str | Path, metric: str, mode: str) -> tuple[dict, Path]:
    """Copy the student of the best checkpoint (by ``metric``, ``mode``: the config's ``search.metric``
    and ``search.mode``) to ``out_dir``."""
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else None
    if best is None:
        raise RuntimeError("the run reported no checkpoint: nothing to export")
    metrics = next(m for c, m in result.best_checkpoints if c.path == best.path)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    with best.as_directory() as d:
        shutil.copytree(Path(d) / STUDENT_DIR, out)
    return metrics, out


def fit(cfg, manifest, report, name: str, callbacks: list | None = None) -> RunOutcome:
    """Train (resuming a run of the same name), then export the best student to ``<output_dir>/<name>/best_student``."""
    run_dir = Path(cfg.storage.output_dir) / name
    trainer = build_trainer(cfg, manifest, report, name, callbacks, log_path=str(run_dir / "train_log.jsonl"))
    result = trainer.fit()
    if (why := non_finite_loss(run_dir / "train_log.jsonl")) is not None:
        raise NonFiniteLoss(f"nothing exported: {why}")
    metrics, student = export_best(result, run_dir / "best_student", cfg.search.metric, cfg.search.mode)
    return RunOutcome(result, metrics, student)


class NonFiniteLoss(UserError):
    pass


def non_finite_loss(log_path: Path) -> str | None:
    """Why the run's latest attempt stopped on a NaN or infinite loss (its log's last such event after
    its last start), or None."""
    why = None
    if Path(log_path).exists():
        for line in Path(log_path).read_text().splitlines():
            e = json.loads(line)
            why = e["why"] if e.get("event") == "non_finite_loss" else None if e.get("event") == "start" else why
    return why


def epoch_history(log_path: Path) -> list[dict]:
    """The last record of each epoch in a run's log (an epoch redone after a restart counts once)."""
    by_epoch = {}
    for line in log_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "epoch_end":
            by_epoch[rec["epoch"]] = rec
    return [by_epoch[e] for e in sorted(by_epoch)]
