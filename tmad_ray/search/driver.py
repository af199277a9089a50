"""The study's driver: Tune + Optuna over the distillation recipe, one Ray Train run per trial.

``run_study`` is what ``python tune.py`` does once the data is cached and the models load:

* ``OptunaSearch`` (TPE, seeded; NSGA-II for several objectives) over a define-by-run space;
* ``ASHAScheduler(time_attr="epoch")`` (``training_iteration`` restarts after a restore);
* ``max_concurrent_trials`` from the cluster's CPUs / GPUs (``concurrent_trials``);
* ``Tuner.restore(resume_errored=True)`` for ``--resume``: finished trials are kept, the searcher's
  state comes back, and an interrupted trial's Train run resumes from its checkpoint;
* at the end, the best trial's student exported and registered, every MLflow run closed.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tmad_ray import tracking, tracking_queue
from tmad_ray.errors import UserError
from tmad_ray.recipe import WEIGHTS, distributions
from tmad_ray.search import cohorts, confirm, mlflow_runs, state
from tmad_ray.search.results import objective_modes, pareto_front, pareto_table, results_table, rows_csv, trial_rows
from tmad_ray.search.signals import InterruptWatch
from tmad_ray.search.state import STATE_FILE
from tmad_ray.search.trial import COHORT_TRIAL_CPU, TRIAL_CPU, StudyContext, trial_fn
from tmad_ray.storage import Storage


class StudyError(UserError, RuntimeError):
    pass


class StudyInterrupted(UserError):
    """Ctrl-C (SIGINT) or SIGUSR1 during a study: nothing is exported or registered."""

    exit_code = 130  # what a shell reports for a command ended by SIGINT

    def __init__(self, message: str, study: str):
        super().__init__(message)
        self.study = study


@dataclass
class StudyOutcome:
    name: str
    rows: list[dict]
    best: dict | None
    best_student: Path | None
    parent_run_id: str
    tracking_uri: str
    model_version: int | None
    pareto: list[dict] | None = None
    experiment_id: str | None = None


def concurrent_trials(cfg, resources: dict) -> int:
    """How many trials the cluster runs at once: CPUs (one kept free) and GPUs per Ray Train run, one
    run per trial or per cohort of ``search.cohort_size`` trials."""
    t, size = cfg.train, cfg.search.cohort_size
    per_run = t.num_workers * t.cpus_per_worker + (TRIAL_CPU if size == 1 else size * COHORT_TRIAL_CPU)
    k = max(1, int((resources.get("CPU", 1) - 1) // per_run))
    if t.use_gpu:
        k = min(k, max(1, int(resources.get("GPU", 0) // t.num_workers)))
    k *= size
    if cfg.search.max_concurrent_trials:
        k = min(k, cfg.search.max_concurrent_trials)
    return k


def check_layer_sets(cfg, student_depth: int, student_grid: tuple[int, int, int] | None = None) -> None:
    """Every layer set must exist in every student the search can build, and the relational term, whose
    weight δ the search always samples, must not be 0 by construction (errors before any trial)."""
    from tmad_ray.recipe import parse_layer_set
    from tmad_ray.schema import relation_grid_problem
    from tmad_ray.distill.trimodel import resolve_layer

    if student_grid is not None and cfg.distill.relations:
        d = cfg.distill
        problem = relation_grid_problem(d.asym_time, d.asym_space, student_grid[0], min(student_grid[1:]))
        if problem:
            raise StudyError(f"search.delta {cfg.search.delta}: {problem}")

    if cfg.search.student_depths:
        if cfg.models.student.depth is None:
            raise StudyError("search.student_depths needs models.student given as depth/width/heads")
        if cfg.distill.cache_targets:
            raise StudyError("search.student_depths and distill.cache_targets do not go together yet: the "
                             "target cache is planned for one student depth")
        student_depth = min(cfg.search.student_depths)
    for text in cfg.search.align_layer_sets:
        for i in parse_layer_set(text):
            try:
                resolve_layer(i, student_depth)
            except ValueError as e:
                raise StudyError(f"search.align_layer_sets {text!r}: {e}") from None


def study_name(cfg, resume: str | bool | None) -> tuple[str, bool]:
    """A new study gets ``<name>-<time>``; ``--resume`` takes the latest study of this config's name
    (or the one named)."""
    results = Storage(cfg.storage.ray_results)
    if resume:
        if isinstance(resume, str):
            if not results.is_file(resume, STATE_FILE):
                raise StudyError(f"no study {resume!r} under {results.root} to resume")
            return resume, True
        found = sorted((results.mtime(d, STATE_FILE), d) for d in results.subdirs()
                       if d.startswith(f"{cfg.name}-") and results.is_file(d, STATE_FILE))
        if not found:
            raise StudyError(f"no study of {cfg.name!r} under {results.root} to resume; run without --resume to "
                             "start one")
        return found[-1][1], True
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", False


def build_tuner(cfg, study: StudyContext, max_concurrent: int, resume_path: str | None):
    """A new ``Tuner`` (Optuna TPE + ASHA, or NSGA-II + FIFO for several objectives), or the study at
    ``resume_path`` restored with its searcher's state and its errored trials run again."""
    import ray.tune

    from tmad_ray.search.searcher import build_searcher  # imports Optuna: only when a study starts

    cpu = TRIAL_CPU if study.hub is None else COHORT_TRIAL_CPU  # a cohort's trial only relays its epochs
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_fn, study=study), {"CPU": cpu})
    if resume_path is not None:
        return ray.tune.Tuner.restore(resume_path, trainable=trainable, resume_errored=True)
    callbacks = [tracking_queue.watch(study.name)]
    if study.hub is not None:
        callbacks.append(cohorts.watch(study.name))
    searcher, scheduler = build_searcher(cfg)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=cfg.search.num_samples,
                                        max_concurrent_trials=max_concurrent),
        run_config=ray.tune.RunConfig(name=study.name, storage_path=cfg.storage.ray_results,
                                      failure_config=ray.tune.FailureConfig(max_failures=1), verbose=1,
                                      progress_reporter=progress_reporter(cfg),
                                      callbacks=callbacks),
    )


def progress_reporter(cfg):
    """Tune's live table with the columns a user watches: the epoch, the metric, the best so far, the
    training loss, and the recipe (Tune would pick the first four metrics it sees). Needs Tune's
    classic output (``RAY_AIR_NEW_OUTPUT=0``, set by ``run_study``): the new one takes no columns."""
    from ray.tune import CLIReporter

    s = cfg.search
    metrics = {"epoch": "epoch", s.metric: s.metric.removeprefix("val_") if s.metric.startswith("val_") else s.metric,
               f"best_{s.metric}": "best so far", "train_loss": "loss"}
    for o in s.objectives or []:
        metrics.setdefault(o, o)
    params = {"trial_number": "#", **{k: k for k in WEIGHTS}, "temperature": "T", "align_layers": "layers"}
    if s.lr is not None:
        params["lr"] = "lr"
    if s.student_depths:
        params["student_depth"] = "depth"
    return CLIReporter(metric_columns=metrics, parameter_columns=params, metric=f"best_{s.metric}", mode=s.mode,
                       sort_by_metric=False, max_report_frequency=30, print_intermediate_tables=True)


def run_study(cfg, manifest, report, resources: dict, resume: str | bool | None = None, say=print) -> StudyOutcome:
    """Search, then export and register the best student; returns the results. ``say`` prints the
    driver's few lines (the plan is printed by the caller, Tune prints its table)."""
    name, resuming = study_name(cfg, resume)
    results = Storage(cfg.storage.ray_results)
    if resuming:  # a new study's directory does not exist yet: its lock comes with its state file
        state.take_lock(results, name, StudyError)
    try:
        uri = tracking.resolve_tracking_uri(cfg.tracking)
        client = tracking.client(uri)
        exp_id = tracking.experiment_id(client, cfg.tracking.experiment)
        parent = open_parent_run(cfg, client, results, name, resuming, uri, exp_id, say)
        queue = tracking_queue.start(uri, name)  # the trials' MLflow writes, off their training path
        try:
            return _run(cfg, manifest, report, resources, name, resuming, results, client, uri, exp_id, parent,
                        queue, say)
        finally:
            import ray

            ray.kill(queue)
            with contextlib.suppress(ValueError):  # ValueError: no cohorts in this study
                ray.kill(ray.get_actor(cohorts.actor_name(name)))
    finally:
        state.release_lock(results, name)


def _run(cfg, manifest, report, resources, name, resuming, results, client, uri, exp_id, parent, queue,
         say) -> StudyOutcome:
    """``run_study`` once the study holds its lock, its MLflow parent run is open and its queue runs."""
    exp_dir, out_dir = results.uri(name), Path(cfg.storage.output_dir) / name
    study = StudyContext(name, cfg.model_dump(), manifest, report, exp_id, parent, str(out_dir / "trials"),
                         results.uri(name, "train"), queue)
    k, size = concurrent_trials(cfg, resources), cfg.search.cohort_size
    if size > 1:
        study.hub = cohorts.start(study, size, cfg.search.cohort_wait_s, max(1, k // size), cfg.storage.ray_results)
    say(f"study {name}: {cfg.search.num_samples} trials, up to {k} at a time "
        + (f"in cohorts of up to {size} students, " if size > 1 else "(")
        + f"{cfg.train.num_workers} DDP workers {'a cohort' if size > 1 else 'each)'}; Ray results in {exp_dir}")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's classic table: the only one that takes chosen columns
    tuner = build_tuner(cfg, study, k, exp_dir if resuming else None)
    grid = None
    # Tune catches SIGINT itself: it saves the experiment and returns from fit() as if it were done,
    # after putting back the handler it found. Ours is that handler, so seeing it back says "interrupted".
    interrupt = InterruptWatch()
    try:
        with interrupt:
            grid = tuner.fit()
        statuses = saved_statuses(exp_dir)
        if interrupt.seen or len(statuses) < cfg.search.num_samples or \
                set(statuses.values()) - {"TERMINATED", "ERROR"}:
            raise KeyboardInterrupt
        outcome = finish_study(client, cfg, grid, name, parent, uri, out_dir, manifest, study, k, say)
        outcome.experiment_id = exp_id
    except KeyboardInterrupt:  # Tune's interrupt, or a second Ctrl-C while it was saving
        tracking_queue.drain(queue, timeout_s=30, say=say)
        done = end_interrupted(client, cfg, name, parent, grid, exp_dir)
        raise StudyInterrupted(
            f"study {name} interrupted: {done} of {cfg.search.num_samples} trials finished; nothing was exported "
            "or registered (MLflow: the study and its unfinished trials are KILLED)", name) from None
    except BaseException:
        client.set_terminated(parent, status="FAILED")
        raise
    # a study in which no trial reported a usable result failed, whatever Tune says of its trials
    client.set_terminated(parent, status="FINISHED" if outcome.best is not None else "FAILED")
    saved = json.loads(results.read_text(name, STATE_FILE))
    results.write_text(json.dumps({**saved, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1), name,
                       STATE_FILE)
    return outcome


def open_parent_run(cfg, client, results: Storage, name: str, resuming: bool, uri: str, exp_id: str, say) -> str:
    """The study's MLflow parent run: a new one (its id saved beside Tune's state, ``STATE_FILE``) or,
    on ``--resume``, the one the study began with, running again."""
    if resuming:
        parent = json.loads(results.read_text(name, STATE_FILE))["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        say(f"resuming study {name} (MLflow parent run {parent})")
        return parent
    parent = tracking.open_parent(client, exp_id, name)
    results.write_text(json.dumps({"name": name, "parent_run_id": parent, "experiment_id": exp_id,
                                   "tracking_uri": tracking.redact(uri), "config": state.saved_form(cfg)},
                                  indent=1), name, STATE_FILE)
    state.take_lock(results, name, StudyError)
    mlflow_runs.log_study_start(client, parent, cfg)
    return parent


def saved_statuses(exp_dir: str) -> dict[str, str]:
    """Every trial's status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) by trial id, as Tune saved the
    experiment at the end of ``fit()``. Not the statuses of the ResultGrid: after saving, Tune's cleanup
    marks every trial still running TERMINATED, so an interrupted trial looks finished there."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(exp_dir).trials}


def end_interrupted(client, cfg, study: str, parent: str, grid, exp_dir: str) -> int:
    """Close an interrupted study's MLflow runs: the trials Tune finished as they ended, the others and
    the study KILLED; returns how many trials finished."""
    statuses = saved_statuses(exp_dir) if grid is not None else {}
    rows = trial_rows(grid, cfg, study) if grid is not None else []
    for r in rows:
        if statuses.get(r["trial"]) not in ("TERMINATED", "ERROR"):
            r["status"] = "INTERRUPTED"
    mlflow_runs.close_trial_runs(client, cfg, study, rows)
    client.set_tag(parent, "tune_status", "INTERRUPTED")
    client.set_terminated(parent, status="KILLED")
    return sum(s == "TERMINATED" for s in statuses.values())


def finish_study(client, cfg, grid, name: str, parent: str, uri: str, out_dir: Path, manifest=None,
                 study: StudyContext | None = None, concurrent: int = 1, say=print) -> StudyOutcome:
    """The end of a finished study: rows, tables and plots (in ``out_dir`` and on the parent run), the
    best recipe (confirmed on more seeds with ``search.confirm_top_k``) exported and registered from
    the run that trained it, every child run closed as its trial ended."""
    s = cfg.search
    rows = trial_rows(grid, cfg, name)
    done = [r for r in rows if r[s.metric] is not None]
    best = (max if s.mode == "max" else min)(done, key=lambda r: r[s.metric]) if done else None
    export_run = best["trial"] if best else None
    objectives, modes = objective_modes(cfg)
    if best is not None and s.confirm_top_k and study is not None:
        confirmed = confirm.confirm_top(cfg, rows, study, client, concurrent, say)
        if confirmed is not None:
            best, export_run = confirmed
    if study is not None:  # every trial's writes are in before its run is closed
        tracking_queue.drain(study.queue, say=say)
    front = pareto_front(rows, objectives, modes) if len(objectives) > 1 else []
    log_results(client, cfg, parent, rows, front, out_dir)
    student_dir, version = None, None
    if best is not None:
        client.log_metric(parent, f"best_{s.metric}", best[s.metric])
        if best.get(f"{s.metric}_mean") is not None:
            client.log_metric(parent, f"best_{s.metric}_mean_over_seeds", best[f"{s.metric}_mean"])
        client.set_tag(parent, "best_trial", f"#{best.get('trial_number')} ({best['trial']})")
        (out_dir / "best.json").write_text(json.dumps({"study": name, **best, "exported_run": export_run}, indent=1))
        student_dir = export_trial_student(cfg, name, export_run, out_dir / "best_student")
        # the registered version's source run is the run that trained it: the trial, or a confirmation run
        child = mlflow_runs.trial_run_ids(client, cfg, name).get(export_run) or \
            confirm.confirm_run_ids(client, study, name).get(export_run)
        if child is not None:
            version = mlflow_runs.register_student(client, cfg, uri, name, best, child, student_dir, manifest)
    # after the model is logged to the best trial's run: its real end time
    mlflow_runs.close_trial_runs(client, cfg, name, rows)
    return StudyOutcome(name, rows, best, student_dir, parent, uri, version, front)


def log_results(client, cfg, parent: str, rows: list[dict], front: list[dict], out_dir: Path) -> None:
    """``results.md`` (and ``pareto.md``) in ``out_dir``; on the parent run, those with ``results.csv``
    and the plots: the Pareto front with several objectives, else Optuna's history and importance."""
    from tmad_ray.plots import optuna_plots, plot_pareto

    s = cfg.search
    objectives, _ = objective_modes(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"results.md": results_table(rows, s.metric)}
    if len(objectives) > 1:
        tables["pareto.md"] = pareto_table(front, objectives)
    with tempfile.TemporaryDirectory() as d:
        for file, table in tables.items():
            (out_dir / file).write_text(table + "\n")
            Path(d, file).write_text(table + "\n")
        Path(d, "results.csv").write_text(rows_csv(rows))
        if len(objectives) > 1:
            plot_pareto(rows, front, objectives, str(Path(d, "pareto.png")))
        else:
            optuna_plots(rows, distributions(s), s.metric, s.mode, d)
        client.log_artifacts(parent, d)


def export_trial_student(cfg, study: str, trial: str, out: Path) -> Path:
    """The best checkpoint's student of a Train run of the study (a trial's or a confirmation run's),
    copied to ``out``."""
    import ray.train

    from tmad_ray.train.cohort import BEST_DIR
    from tmad_ray.train.run import export_best

    results = Storage(cfg.storage.ray_results)
    if (cohort := cohorts.cohort_of(cfg.storage.ray_results, study, trial)) is not None:
        return results.copy_dir_to(out, study, "train", cohort, BEST_DIR, trial)
    result = ray.train.Result.from_path(results.uri(study, "train", trial))
    _, student = export_best(result, out, cfg.search.metric, cfg.search.mode)
    return student
