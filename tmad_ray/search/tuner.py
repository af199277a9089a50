"""The study: Tune + Optuna over the distillation recipe, one Ray Train run per trial, MLflow runs.

``run_study`` is what ``python tune.py`` does after the data is cached and the models load:

* a Tune **function trainable** per trial (``trial_fn``) that opens the trial's MLflow child run,
  builds a ``TorchTrainer`` for the sampled recipe and fits it (Ray Train V2 refuses
  ``Tuner(TorchTrainer)``); ``TuneReportCallback`` forwards each epoch's report to Tune;
* ``OptunaSearch`` (TPE, seeded; NSGA-II for several objectives) over a define-by-run space;
* ``ASHAScheduler(time_attr="epoch")`` (``training_iteration`` restarts after a restore);
* ``max_concurrent_trials`` from the cluster's CPUs / GPUs;
* ``Tuner.restore(resume_errored=True)`` for ``--resume``: finished trials are kept, the searcher's
  state comes back, and an interrupted trial's Train run resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tmad_ray import tracking
from tmad_ray.errors import UserError
from tmad_ray.search.space import WEIGHTS, apply_params, distributions, space_for

TRIAL_CPU = 1
CHAMPION = "champion"  # the registered model's alias for the newest study's best student
STATE_FILE = "tmad_study.json"  # beside Tune's experiment state: the parent run and what the study is


class StudyError(UserError, RuntimeError):
    pass


class StudyInterrupted(UserError):
    """Ctrl-C (SIGINT) or SIGUSR1 during a study: nothing is exported or registered."""

    exit_code = 130  # what a shell reports for a command ended by SIGINT

    def __init__(self, message: str, study: str):
        super().__init__(message)
        self.study = study


class Storage:
    """``storage.ray_results``: a local directory or a URI (``s3://...``), as Ray's ``storage_path``."""

    def __init__(self, root: str):
        import pyarrow.fs as pafs

        self.root = root.rstrip("/")
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(self.root)
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).resolve())

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info("/".join([self.base, *parts])).type == pafs.FileType.File

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream("/".join([self.base, *parts])) as f:
            return f.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        path = "/".join([self.base, *parts])
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(text.encode())

    def studies(self, prefix: str) -> list[tuple[float, str]]:
        """(modified time, name) of the studies named ``prefix*`` that have a state file."""
        import pyarrow.fs as pafs

        found = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True)):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if info.type == pafs.FileType.Directory and name.startswith(prefix) and self.exists(name, STATE_FILE):
                state = self.fs.get_file_info("/".join([self.base, name, STATE_FILE]))
                found.append((state.mtime.timestamp() if state.mtime else 0.0, name))
        return sorted(found)


# ------------------------------------------------------------------------------ the trial (a Tune trainable)


def trial_fn(params: dict, study: dict) -> None:
    """One trial: the sampled recipe trained on Ray Train, reported to Tune epoch by epoch."""
    started_at = time.time()
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tmad_ray.config import config_from_dict
    from tmad_ray.train.run import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = apply_params(config_from_dict(study["cfg"]), params)
    # The child run is opened beside Ray Train's start (importing MLflow and opening its store take
    # ~2.5 s here); rank 0 finds it by its tags when it first logs.
    opening = ChildRun(study, trial_id, params, cfg)
    opening.start()
    trial_dir = Path(study["trials_dir"]) / trial_id
    trainer = build_trainer(cfg, study["manifest"], study["report"], name=trial_id,
                            callbacks=[TuneReportCallback()], log_path=str(trial_dir / "train_log.jsonl"),
                            mlflow_run={"uri": study["tracking_uri"], "experiment_id": study["experiment_id"],
                                        "study": study["name"], "trial": trial_id},
                            storage_path=study["train_storage"], started_at=started_at, fit_at=time.time())
    # Tune kills the trial as soon as its last epoch is reported (ASHA stops at max_t too), and fit()
    # may raise while the trial's process shuts down, so neither an exception here nor code after fit()
    # says how the trial ended: the driver closes the child runs from Tune's results at the end.
    try:
        trainer.fit()
    finally:
        opening.join()
    if opening.error is not None:
        raise opening.error


class ChildRun(threading.Thread):
    """Opens a trial's MLflow child run (or reopens a restarted trial's) and logs its params, in a
    thread of the trial function; ``error`` holds what went wrong."""

    def __init__(self, study: dict, trial_id: str, params: dict, cfg):
        super().__init__(name=f"mlflow-child-{trial_id}", daemon=True)
        self.study, self.trial_id, self.params, self.cfg = study, trial_id, params, cfg
        self.error: BaseException | None = None

    def run(self) -> None:
        study, params = self.study, self.params
        try:
            c = tracking.client(study["tracking_uri"])
            run_id = tracking.open_child(c, study["experiment_id"], study["parent_run_id"], study["name"],
                                         self.trial_id, tracking.trial_run_name(params),
                                         trial_description(params, study["name"], self.trial_id),
                                         trial_number=params.get("trial_number"))
            logged = {**{k: params[k] for k in sorted(params)}, **fixed_params(self.cfg)}
            if "align_layers" in logged:
                logged["align_layers"] = tracking.layers_param(logged["align_layers"])
            tracking.log_params(c, run_id, logged)
        except BaseException as e:  # noqa: BLE001 (re-raised by the trial function)
            self.error = e


def trial_description(params: dict, study: str, trial_id: str) -> str:
    """The run's description in MLflow (markdown): which trial of which study, and its recipe."""
    return (f"Trial #{params.get('trial_number', '?')} of study `{study}` (Tune trial `{trial_id}`): "
            f"{tracking.recipe_short(params)}")


def fixed_params(cfg) -> dict:
    """The parts of a trial's recipe that the search does not sample (logged with every child run)."""
    s = cfg.models.student
    return {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
            "num_workers": cfg.train.num_workers, "teacher_weight": cfg.distill.teacher_weight,
            "assistant_weight": cfg.distill.assistant_weight,
            "student": s.name or s.size or f"{s.depth}x{s.width}x{s.heads}", "teacher": cfg.models.teacher.name}


# ------------------------------------------------------------------------------ the driver


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
    """How many trials the cluster runs at once: CPUs (one kept free) and GPUs per trial."""
    t = cfg.train
    k = max(1, int((resources.get("CPU", 1) - 1) // (t.num_workers * t.cpus_per_worker + TRIAL_CPU)))
    if t.use_gpu:
        k = min(k, max(1, int(resources.get("GPU", 0) // t.num_workers)))
    if cfg.search.max_concurrent_trials:
        k = min(k, cfg.search.max_concurrent_trials)
    return k


def check_layer_sets(cfg, student_depth: int, student_grid: tuple[int, int, int] | None = None) -> None:
    """Every layer set must exist in every student the search can build, and the relational term, whose
    weight δ the search always samples, must not be 0 by construction (errors before any trial)."""
    from tmad_ray.config import parse_layer_set, relation_grid_problem
    from tmad_ray.distill.trimodel import resolve_layer

    if student_grid is not None:
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
    root = Storage(cfg.storage.ray_results)
    if resume:
        if isinstance(resume, str):
            if not root.exists(resume, STATE_FILE):
                raise StudyError(f"no study {resume!r} under {root.root} to resume")
            return resume, True
        found = root.studies(f"{cfg.name}-")
        if not found:
            raise StudyError(f"no study of {cfg.name!r} under {root.root} to resume; run without --resume to start one")
        return found[-1][1], True
    return f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}", False


def build_tuner(cfg, study: dict, max_concurrent: int, resume_path: str | None):
    import optuna
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cfg.search
    # The trial driver holds one CPU (Tune refuses an empty request); its Train workers hold their own.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(trial_fn, study=study), {"CPU": TRIAL_CPU})
    if resume_path is not None:
        return ray.tune.Tuner.restore(resume_path, trainable=trainable, resume_errored=True)
    objectives, modes = objective_modes(cfg)
    if len(objectives) > 1:
        searcher = OptunaSearch(space=space_for(s), metric=objectives, mode=modes,
                                sampler=optuna.samplers.NSGAIISampler(seed=s.seed))
        scheduler = FIFOScheduler()  # ASHA stops on one metric; with several, every trial runs to the end
    else:
        sampler = (optuna.samplers.NSGAIISampler(seed=s.seed) if s.algorithm == "nsga2"
                   else optuna.samplers.TPESampler(seed=s.seed))
        searcher = OptunaSearch(space=space_for(s), metric=s.metric, mode=s.mode, sampler=sampler)
        scheduler = ASHAScheduler(time_attr="epoch", metric=s.metric, mode=s.mode, max_t=cfg.train.epochs,
                                  grace_period=min(s.grace_period, cfg.train.epochs),
                                  reduction_factor=s.reduction_factor)
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=s.num_samples,
                                        max_concurrent_trials=max_concurrent),
        run_config=ray.tune.RunConfig(name=study["name"], storage_path=cfg.storage.ray_results,
                                      failure_config=ray.tune.FailureConfig(max_failures=1), verbose=1,
                                      progress_reporter=progress_reporter(cfg)),
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
    params = {"trial_number": "#", "alpha": "alpha", "beta": "beta", "gamma": "gamma", "delta": "delta",
              "temperature": "T", "align_layers": "layers"}
    if s.lr is not None:
        params["lr"] = "lr"
    if s.student_depths:
        params["student_depth"] = "depth"
    return CLIReporter(metric_columns=metrics, parameter_columns=params, metric=f"best_{s.metric}", mode=s.mode,
                       sort_by_metric=False, max_report_frequency=30, print_intermediate_tables=True)


def run_study(cfg, manifest, report, resources: dict, resume: str | bool | None = None, log=print) -> StudyOutcome:
    """Search, then export and register the best student; returns the results."""
    name, resuming = study_name(cfg, resume)
    storage = Storage(cfg.storage.ray_results)
    exp_dir = storage.uri(name)
    out_dir = Path(cfg.storage.output_dir) / name
    uri = tracking.resolve_tracking_uri(cfg.tracking)
    c = tracking.client(uri)
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)

    if resuming:
        state = json.loads(storage.read_text(name, STATE_FILE))
        parent = state["parent_run_id"]
        c.update_run(parent, status="RUNNING")
        log(f"resuming study {name} (MLflow parent run {parent})")
    else:
        parent = tracking.open_parent(c, exp_id, name)
        storage.write_text(json.dumps({"name": name, "parent_run_id": parent, "experiment_id": exp_id,
                                       "tracking_uri": tracking.redact(uri)}, indent=1), name, STATE_FILE)
        log_study_start(c, parent, cfg)
    study = {"name": name, "cfg": cfg.model_dump(), "manifest": manifest, "report": report, "tracking_uri": uri,
             "experiment_id": exp_id, "parent_run_id": parent, "trials_dir": str(out_dir / "trials"),
             "train_storage": storage.uri(name, "train")}
    k = concurrent_trials(cfg, resources)
    log(f"study {name}: {cfg.search.num_samples} trials, up to {k} at a time "
        f"({cfg.train.num_workers} DDP workers each); Ray results in {exp_dir}")
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
        outcome = finish_study(c, cfg, grid, name, parent, uri, out_dir, manifest)
        outcome.experiment_id = exp_id
    except KeyboardInterrupt:  # Tune's interrupt, or a second Ctrl-C while it was saving
        done = end_interrupted(c, cfg, name, parent, grid, exp_dir)
        raise StudyInterrupted(
            f"study {name} interrupted: {done} of {cfg.search.num_samples} trials finished; nothing was exported "
            "or registered (MLflow: the study and its unfinished trials are KILLED)", name) from None
    except BaseException:
        c.set_terminated(parent, status="FAILED")
        raise
    c.set_terminated(parent, status="FINISHED")
    return outcome


class InterruptWatch:
    """Around ``tuner.fit()``. Tune replaces the SIGINT handler for the run and, on Ctrl-C (or SIGUSR1),
    saves the experiment, puts back the handler it found (ours) and returns. So ours being back at
    the end means "interrupted" (``seen``); a second Ctrl-C, while Tune saves, raises KeyboardInterrupt."""

    def __init__(self):
        self.seen, self.previous = False, None

    @staticmethod
    def _handler(sig, frame):
        raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0":  # else Ctrl-C raises in fit() itself
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            self.seen = signal.getsignal(signal.SIGINT) is self._handler
            signal.signal(signal.SIGINT, self.previous)
        return False


def saved_statuses(exp_dir: str) -> dict[str, str]:
    """Every trial's status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) by trial id, as Tune saved the
    experiment at the end of ``fit()``. Not the statuses of the ResultGrid: after saving, Tune's cleanup
    marks every trial still running TERMINATED, so an interrupted trial looks finished there."""
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(exp_dir).trials}


def end_interrupted(c, cfg, study: str, parent: str, grid, exp_dir: str) -> int:
    """Close an interrupted study's MLflow runs: the trials Tune finished as they ended, the others and
    the study KILLED; returns how many trials finished."""
    statuses = saved_statuses(exp_dir) if grid is not None else {}
    rows = trial_rows(grid, cfg, study) if grid is not None else []
    for r in rows:
        if statuses.get(r["trial"]) not in ("TERMINATED", "ERROR"):
            r["status"] = "INTERRUPTED"
    close_trial_runs(c, cfg, study, rows)
    c.set_tag(parent, "tune_status", "INTERRUPTED")
    c.set_terminated(parent, status="KILLED")
    return sum(s == "TERMINATED" for s in statuses.values())


def log_study_start(c, parent: str, cfg) -> None:
    import yaml

    from tmad_ray.search.space import bounds_of

    c.set_tag(parent, "mlflow.source.git.commit", git_commit())
    c.set_tag(parent, tracking.NOTE_TAG, f"Study `{cfg.name}`: {cfg.search.num_samples} trials of "
              f"{cfg.train.epochs} epochs ({cfg.search.algorithm.upper()}), searching alpha, beta, gamma, delta, T "
              f"and the aligned layers for {cfg.search.metric}. The whole config is the artifact config.yaml.")
    tracking.log_params(c, parent, study_params(cfg))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.yaml").write_text(yaml.safe_dump(tracking.redact_tree(cfg.model_dump(mode="json")),
                                                         sort_keys=False))
        Path(d, "search_space.json").write_text(json.dumps(
            {**bounds_of(cfg.search), "log_uniform": list(WEIGHTS), "algorithm": cfg.search.algorithm,
             "objectives": cfg.search.objectives or [cfg.search.metric], "mode": cfg.search.mode}, indent=1))
        c.log_artifacts(parent, d)


def study_params(cfg) -> dict:
    """The parent run's params: what the study is, in a few keys that name no searched value (the
    trials carry alpha...layers; the whole config is the ``config.yaml`` artifact)."""
    m, s, t = cfg.models, cfg.search, cfg.train
    student = m.student.name or m.student.size or f"{m.student.depth}x{m.student.width}x{m.student.heads}"
    assistant = m.assistant.path or f"AMD {m.assistant.arch} {m.assistant.dataset} {m.assistant.kind}"
    return {"study_trials": s.num_samples, "study_algorithm": s.algorithm, "study_metric": s.metric,
            "study_epochs": t.epochs, "teacher": m.teacher.name, "assistant": assistant, "student": student,
            "dataset": cfg.data.root, "clip": f"{cfg.data.num_frames}x{cfg.data.image_size}",
            "workers_per_trial": t.num_workers, "global_batch": t.batch_size * t.num_workers * t.grad_accum}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------ the end of a study


def trial_rows(grid, cfg, study: str) -> list[dict]:
    """One row per trial: sampled values, best metric over its epochs, epochs run, how it ended.

    The best metric and the epochs come from the trial's Train run (its checkpoints), which is also
    what the export uses; Tune's own record of a trial restarted by ``--resume`` may be partial.
    """
    metric = cfg.search.metric
    rows = []
    for r in grid:
        trial = (r.metrics or {}).get("trial_id") or Path(r.path).name.split("_")[2]
        best, ran = train_summary(cfg, study, trial)
        status = "ERROR" if r.error else ("COMPLETED" if ran >= cfg.train.epochs else "STOPPED (ASHA)")
        params = r.config or {}
        extra = [o for o in (cfg.search.objectives or []) if o != metric]
        ended = (r.metrics or {}).get("timestamp")  # Tune's time of the trial's last report (seconds)
        rows.append({"trial": trial, "trial_number": params.get("trial_number"),
                     **{k: params.get(k) for k in (*WEIGHTS, "temperature", "align_layers")},
                     **{k: params[k] for k in ("lr", "student_depth") if k in params},
                     metric: None if best is None else float(best[metric]),
                     **{o: None if best is None else best.get(o) for o in extra},
                     "epochs": ran, "status": status, "ended": ended,
                     "error": str(r.error).splitlines()[0][:200] if r.error else None})
    return sorted(rows, key=lambda r: (r["trial_number"] is None, r["trial_number"] or 0))


def pareto_front(rows: list[dict], objectives: list[str], modes: list[str]) -> list[dict]:
    """The rows no other row beats in every objective (and strictly in one)."""
    def better_or_equal(a, b):
        return all((a[o] >= b[o]) if m == "max" else (a[o] <= b[o]) for o, m in zip(objectives, modes))

    def strictly(a, b):
        return any((a[o] > b[o]) if m == "max" else (a[o] < b[o]) for o, m in zip(objectives, modes))
    done = [r for r in rows if all(r.get(o) is not None for o in objectives)]
    return [r for r in done if not any(better_or_equal(o, r) and strictly(o, r) for o in done if o is not r)]


def objective_modes(cfg) -> tuple[list[str], list[str]]:
    s = cfg.search
    objectives = s.objectives or [s.metric]
    return objectives, [s.mode if o == s.metric else ("max" if o.startswith("val_acc") or o == "val_macro_f1"
                                                      else "min") for o in objectives]


def plot_pareto(rows: list[dict], front: list[dict], objectives: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = objectives[1], objectives[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    done = [r for r in rows if r.get(x) is not None and r.get(y) is not None]
    ax.scatter([r[x] for r in done], [r[y] for r in done], color="#999999", label="trials")
    f = sorted(front, key=lambda r: r[x])
    ax.plot([r[x] for r in f], [r[y] for r in f], "o-", color="#3b75af", label="Pareto front")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train_summary(cfg, study: str, trial: str) -> tuple[dict | None, int]:
    """(metrics of the best checkpoint, last epoch) of a trial's Train run; (None, 0) if it has none."""
    import ray.train

    storage = Storage(cfg.storage.ray_results)
    if not storage.exists(study, "train", trial, "checkpoint_manager_snapshot.json"):
        return None, 0
    result = ray.train.Result.from_path(storage.uri(study, "train", trial))
    kept = [m for _, m in (result.best_checkpoints or []) if cfg.search.metric in m]
    if not kept:
        return None, 0
    pick = max if cfg.search.mode == "max" else min
    return pick(kept, key=lambda m: m[cfg.search.metric]), int((result.metrics or {}).get("epoch", 0))


def finish_study(c, cfg, grid, name: str, parent: str, uri: str, out_dir: Path, manifest=None) -> StudyOutcome:
    s = cfg.search
    rows = trial_rows(grid, cfg, name)
    done = [r for r in rows if r[s.metric] is not None]
    best = (max if s.mode == "max" else min)(done, key=lambda r: r[s.metric]) if done else None
    out_dir.mkdir(parents=True, exist_ok=True)
    table = results_table(rows, s.metric)
    objectives, modes = objective_modes(cfg)
    front = pareto_front(rows, objectives, modes) if len(objectives) > 1 else []
    (out_dir / "results.md").write_text(table + "\n")
    with tempfile.TemporaryDirectory() as d:
        Path(d, "results.md").write_text(table + "\n")
        Path(d, "results.csv").write_text(_csv(rows))
        if len(objectives) > 1:
            Path(d, "pareto.md").write_text(pareto_table(front, objectives) + "\n")
            (out_dir / "pareto.md").write_text(pareto_table(front, objectives) + "\n")
            plot_pareto(rows, front, objectives, str(Path(d, "pareto.png")))
        else:
            optuna_plots(cfg, rows, d)
        c.log_artifacts(parent, d)
    student_dir, version = None, None
    if best is not None:
        c.log_metric(parent, f"best_{s.metric}", best[s.metric])
        c.set_tag(parent, "best_trial", f"#{best.get('trial_number')} ({best['trial']})")
        (out_dir / "best.json").write_text(json.dumps({"study": name, **best}, indent=1))
        student_dir = export_trial_student(cfg, name, best["trial"], out_dir / "best_student")
        child = trial_run_ids(c, cfg, name).get(best["trial"])
        if child is not None:  # the registered version's source run is the trial that trained it
            version = register_student(c, cfg, uri, name, best, child, student_dir, manifest)
    close_trial_runs(c, cfg, name, rows)  # after the model is logged to the best trial's run: its real end time
    return StudyOutcome(name, rows, best, student_dir, parent, uri, version, front)


def trial_run_ids(c, cfg, study: str) -> dict[str, str]:
    """Tune trial id -> its MLflow child run id."""
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)
    return {r.data.tags[tracking.TRIAL_TAG]: r.info.run_id
            for r in tracking.find_runs(c, exp_id, **{tracking.STUDY_TAG: study}) if tracking.TRIAL_TAG in r.data.tags}


def evaluate_test(cfg, student_dir: Path, manifest) -> dict:
    """Accuracy and macro-F1 of the exported student on the test split (multi-view, as ``tmad-ray eval``);
    ``{"test": "<why not>"}`` when there is none."""
    from tmad_ray.train.evaluate import evaluate_exported

    if manifest is None or not manifest.rows.get("test"):
        return {"test": "no test split"}
    try:
        r = evaluate_exported(str(student_dir), str(manifest.root), "test", label_mode=cfg.data.label_mode,
                              out_dir=str(student_dir.parent / "eval_test"))
    except (FileNotFoundError, ValueError) as e:
        return {"test": f"not evaluated: {e}"}
    return {"test_accuracy": r["accuracy"], "test_macro_f1": r["macro_f1"], "test_videos": r["videos"]}


def register_student(c, cfg, uri: str, study: str, best: dict, run_id: str, student_dir: Path, manifest) -> int:
    """Log the exported student to its trial's run as an MLflow pyfunc model (``tmad_ray.serving``),
    register it as a new version of ``tracking.registered_model`` that says what it is (recipe,
    val/test metrics, teacher, assistant, labels) and point the ``champion`` alias at it."""
    import mlflow

    from tmad_ray import serving

    name, m = cfg.tracking.registered_model, cfg.models
    val = manifest.rows.get("val") if manifest is not None else None
    example = val[0].abspath(manifest.root) if val else None
    test = evaluate_test(cfg, student_dir, manifest)
    summary, epoch = train_summary(cfg, study, best["trial"])
    model_metrics = {f"val_{k}": summary[f"val_{k}"] for k in ("accuracy", "macro_f1") if summary and
                     f"val_{k}" in summary}
    model_metrics.update({k: v for k, v in test.items() if k.startswith("test_") and k != "test_videos"})
    with tracking.fluent_tracking(uri), mlflow.start_run(run_id=run_id):
        info = serving.log_student(student_dir, example)
        if model_metrics:
            mlflow.log_metrics(model_metrics, step=int((summary or {}).get("epoch", epoch)), model_id=info.model_id)
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Successfully registered..." itself
            version = int(mlflow.register_model(info.model_uri, name, tags={"study": study}).version)
    recipe = {k: best[k] for k in (*WEIGHTS, "temperature") if best.get(k) is not None}
    study_p = study_params(cfg)
    tags = {**{k: f"{v:.4g}" for k, v in recipe.items()},
            "align_layers": tracking.layers_param(best["align_layers"]),
            "lr": f"{best.get('lr', cfg.train.lr):.3g}", **{k: f"{v:.4f}" for k, v in model_metrics.items()},
            **({"test": test["test"]} if "test" in test else {"test_videos": str(test["test_videos"])}),
            "teacher": m.teacher.name, "assistant": study_p["assistant"],
            "student": study_p["student"], "labels": json.dumps(list(manifest.labels) if manifest else []),
            "study": study, "trial": f"#{best.get('trial_number')} ({best['trial']})", "epoch": str(epoch)}
    for k, v in tracking.redact_params(tags).items():
        c.set_model_version_tag(name, version, k, str(v))
    c.update_model_version(name, version, description=(
        f"Best student of study `{study}` (trial #{best.get('trial_number')}): {tracking.recipe_short(best)}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in model_metrics.items())
        + ". Load it with `mlflow.pyfunc.load_model(...)` and predict on a list of video paths."))
    c.update_registered_model(name, description="Video classifiers distilled by tmad_ray (teacher + assistant -> "
                              "student). `@champion` is the best student of the newest study.")
    c.set_registered_model_alias(name, CHAMPION, version)
    return version


def export_trial_student(cfg, study: str, trial: str, out: Path) -> Path:
    """The best checkpoint's student of a trial's Train run, copied to ``out``."""
    import ray.train

    from tmad_ray.train.run import export_best

    _, student = export_best(ray.train.Result.from_path(Storage(cfg.storage.ray_results).uri(study, "train", trial)),
                             out)
    return student


def close_trial_runs(c, cfg, study: str, rows: list[dict]) -> None:
    """Each child run ends as Tune's results say its trial ended, at the time of its last report:
    FAILED (with the error as a tag) for an errored trial, KILLED for one Tune has no result of or
    that was interrupted, FINISHED otherwise; a trial ASHA stopped says so in its name. The trial
    itself cannot be trusted to close its run: Tune kills it the moment it reports its last epoch,
    so it may die mid-way through any status update."""
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)
    by_trial = {r["trial"]: r for r in rows}
    for run in tracking.find_runs(c, exp_id, **{tracking.STUDY_TAG: study}):
        trial = run.data.tags.get(tracking.TRIAL_TAG)
        if trial is None:
            continue
        row = by_trial.get(trial, {})
        st = row.get("status", "")
        if row.get(cfg.search.metric) is not None:
            c.log_metric(run.info.run_id, f"best_{cfg.search.metric}", row[cfg.search.metric],
                         step=int(row.get("epochs") or 0))
        c.set_tag(run.info.run_id, "tune_status", st or "unknown")
        if row.get("error"):
            c.set_tag(run.info.run_id, "tune_error", row["error"])
        if row:  # the name a trial ends with: its best score, and whether ASHA stopped it
            c.update_run(run.info.run_id, name=tracking.trial_run_name(
                row, row.get(cfg.search.metric), row["epochs"] if st == "STOPPED (ASHA)" else None))
        ended = int(row["ended"] * 1000) if row.get("ended") else None
        c.set_terminated(run.info.run_id, end_time=ended,
                         status={"ERROR": "FAILED", "": "KILLED", "INTERRUPTED": "KILLED"}.get(st, "FINISHED"))


def pareto_table(front: list[dict], objectives: list[str]) -> str:
    lines = ["| trial | " + " | ".join(objectives) + " | student depth | alpha | beta | gamma | delta | T | layers |",
             "|---|" + "---:|" * len(objectives) + "---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(front, key=lambda r: r[objectives[0]], reverse=True):
        lines.append(f"| {r['trial']} | " + " | ".join(f"{r[o]:.3f}" for o in objectives) +
                     f" | {r.get('student_depth', '-')} | {r['alpha']:.3g} | {r['beta']:.3g} | {r['gamma']:.3g} | "
                     f"{r['delta']:.3g} | {r['temperature']:.2f} | {r['align_layers']} |")
    return "\n".join(lines)


def results_table(rows: list[dict], metric: str) -> str:
    has_lr = any("lr" in r for r in rows)
    has_depth = any("student_depth" in r for r in rows)
    head = ["#", "trial", "alpha", "beta", "gamma", "delta", "T", "layers", *(["lr"] if has_lr else []),
            *(["depth"] if has_depth else []), f"best {metric}", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)
    for r in rows:
        cells = [str(r.get("trial_number", "-")), r["trial"], *(f(r[k]) for k in WEIGHTS), f(r["temperature"], "{:.2f}"), str(r["align_layers"]),
                 *([f(r.get("lr"))] if has_lr else []), *([str(r.get("student_depth", "-"))] if has_depth else []),
                 f(r[metric], "{:.3f}"), str(r["epochs"]), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = sorted({k for r in rows for k in r})
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def optuna_plots(cfg, rows: list[dict], out: str) -> list[str]:
    """Optimization history and parameter importance, from an Optuna study rebuilt from the trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    s = cfg.search
    dist = distributions(s)
    study = optuna.create_study(direction="maximize" if s.mode == "max" else "minimize")
    for r in rows:  # in trial-number order, failed ones too: the plots number trials as the runs do
        if any(r.get(k) is None for k in dist):
            continue
        done = r[s.metric] is not None
        study.add_trial(optuna.trial.create_trial(
            params={k: r[k] for k in dist}, distributions=dist, value=r[s.metric] if done else None,
            state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL))
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        return []
    ovm.plot_optimization_history(study)
    paths = [_save(plt, Path(out) / "optuna_history.png")]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len({t.value for t in complete}) > 1:
        try:
            ovm.plot_param_importances(study)
            paths.append(_save(plt, Path(out) / "optuna_importance.png"))
        except (RuntimeError, ValueError, ZeroDivisionError):
            pass  # importance is undefined when the trials carry no information (e.g. all equal)
    return paths


def _save(plt, path: Path) -> str:
    fig = plt.gcf()
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close("all")
    return str(path)


def runs_url(uri: str, experiment_id: str, metric: str = "val_accuracy", mode: str = "max",
             ui: str = "http://127.0.0.1:5000") -> str:
    """The study's experiment in MLflow's runs view, best trial first (MLflow 3 opens its GenAI screen
    without ``workflowType=machine_learning``)."""
    base = tracking.redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&orderByKey=metrics.%60best_{metric}%60&orderByAsc={'true' if mode == 'min' else 'false'}")


STARTUP_PHASES = ("trial_setup_s", "ray_train_start_s", "models_s", "first_step_s", "startup_s")


def startup_summary(trials_dir: Path) -> str | None:
    """One line: the median of each start-up phase over the study's trials (their logs' "startup" events)."""
    import statistics

    events = []
    for log in sorted(Path(trials_dir).glob("*/train_log.jsonl")):
        found = [json.loads(line) for line in log.read_text().splitlines() if '"startup"' in line]
        if found and "ray_train_start_s" in found[0]:
            events.append(found[0])
    if not events:
        return None
    median = {k: statistics.median(e[k] for e in events) for k in STARTUP_PHASES}
    return (f"trial start-up (median of {len(events)}): {median['startup_s']:.1f} s to the first step = "
            f"{median['trial_setup_s']:.1f} s trial set-up + {median['ray_train_start_s']:.1f} s Ray Train start "
            f"(controller, worker processes) + {median['models_s']:.1f} s models + {median['first_step_s']:.1f} s "
            "first step + imports, DDP, data (each trial's train_log.jsonl, event \"startup\")")


def mlflow_ui_command(uri: str) -> str:
    uri = tracking.redact(uri)
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite") \
        else f"open {uri} in a browser"

