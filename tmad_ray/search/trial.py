"""One trial of a study: a Tune function trainable that trains the sampled recipe on Ray Train.

``trial_fn`` runs in the trial's own process (one CPU, ``TRIAL_CPU``): it asks the study's MLflow
queue to open the trial's child run, builds a ``TorchTrainer`` for the recipe and fits it (Ray
Train V2 refuses ``Tuner(TorchTrainer)``); ``TuneReportCallback`` forwards each epoch's report to
Tune. How a trial ended is decided by the driver from Tune's results, not here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tmad_ray import recipe, tracking

TRIAL_CPU = 1  # the trial function's own CPU (Tune refuses an empty request); its Train workers hold theirs
COHORT_TRIAL_CPU = 0.01  # a cohort's trial function: it waits for its student's epochs and relays them


@dataclass
class StudyContext:
    """What every trial of a study gets from the driver (``tune.with_parameters``: stored once in
    Ray's object store, not pickled per trial)."""

    name: str
    cfg: dict                 # the experiment (``Config.model_dump()``); the trial applies its recipe
    manifest: object          # tmad_ray.data.manifest.Manifest
    report: object            # tmad_ray.data.pipeline.CacheReport: the clip-cache entries
    experiment_id: str
    parent_run_id: str
    trials_dir: str           # <output_dir>/<study>/trials: each trial's train_log.jsonl
    train_storage: str        # Ray Train's storage_path for the trials' runs (local or a URI)
    queue: object             # the study's MLflow queue (``tmad_ray.tracking_queue``), an actor handle
    hub: object = None        # with search.cohort_size > 1: the study's cohort hub (``tmad_ray.search.cohorts``)


def trial_fn(params: dict, study: StudyContext) -> None:
    """One trial: the sampled recipe trained on Ray Train, reported to Tune epoch by epoch."""
    started_at = time.time()
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tmad_ray.config import config_from_dict
    from tmad_ray.train.run import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = recipe.apply(config_from_dict(study.cfg), params)
    # The child run is opened by the study's MLflow queue, in its own process, while Ray Train starts:
    # a slow or absent tracking server delays the run's records, not the trial.
    ray.wait([study.queue.open_child.remote(
        study.experiment_id, study.parent_run_id, study.name, trial_id, tracking.trial_run_name(params),
        trial_description(params, study.name, trial_id), params.get("trial_number"), child_params(params, cfg))],
        timeout=10)
    if study.hub is not None:  # trained in a cohort: the hub's run trains it, this relays its epochs
        from tmad_ray.search.cohorts import join_and_relay

        join_and_relay(study.hub, trial_id, params)
        return
    trial_dir = Path(study.trials_dir) / trial_id
    trainer = build_trainer(cfg, study.manifest, study.report, name=trial_id,
                            callbacks=[TuneReportCallback()], log_path=str(trial_dir / "train_log.jsonl"),
                            mlflow_run={"experiment_id": study.experiment_id, "study": study.name, "trial": trial_id,
                                        "queue": study.queue},
                            storage_path=study.train_storage, started_at=started_at, fit_at=time.time())
    # Tune kills the trial as soon as its last epoch is reported (ASHA stops at max_t too), and fit()
    # may raise while the trial's process shuts down, so neither an exception here nor code after fit()
    # says how the trial ended: the driver closes the child runs from Tune's results at the end.
    trainer.fit()


def child_params(params: dict, cfg) -> dict:
    """What a trial's child run logs as params: the sampled recipe, then what the search does not sample."""
    return recipe.mlflow_params({**{k: params[k] for k in sorted(params)}, **fixed_params(cfg)})


def trial_description(params: dict, study: str, trial_id: str) -> str:
    """The run's description in MLflow (markdown): which trial of which study, and its recipe."""
    return (f"Trial #{params.get('trial_number', '?')} of study `{study}` (Tune trial `{trial_id}`): "
            f"{recipe.short(params)}")


def fixed_params(cfg) -> dict:
    """The parts of a trial's recipe that the search does not sample (logged with every child run)."""
    s = cfg.models.student
    return {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "num_workers": cfg.train.num_workers, "teacher_weight": cfg.distill.teacher_weight,
            "assistant_weight": cfg.distill.assistant_weight,
            "student": s.name or s.size or f"{s.depth}x{s.width}x{s.heads}", "teacher": cfg.models.teacher.name}
