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

import csv
import io
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tmad_ray import tracking
from tmad_ray.errors import UserError
from tmad_ray.search.space import WEIGHTS, apply_params, distributions, space_for

TRIAL_CPU = 1
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
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tmad_ray.config import config_from_dict
    from tmad_ray.train.run import build_trainer

    ctx = ray.tune.get_context()
    trial_id, trial_name = ctx.get_trial_id(), ctx.get_trial_name()
    cfg = apply_params(config_from_dict(study["cfg"]), params)
    c = tracking.client(study["tracking_uri"])
    run_id = tracking.open_child(c, study["experiment_id"], study["parent_run_id"], study["name"], trial_id,
                                 trial_name)
    tracking.log_params(c, run_id, {**{k: params[k] for k in sorted(params)}, **fixed_params(cfg)})
    trial_dir = Path(study["trials_dir"]) / trial_id
    trainer = build_trainer(cfg, study["manifest"], study["report"], name=trial_id,
                            callbacks=[TuneReportCallback()], log_path=str(trial_dir / "train_log.jsonl"),
                            mlflow_run={"uri": study["tracking_uri"], "run_id": run_id},
                            storage_path=study["train_storage"])
    # Tune kills the trial as soon as its last epoch is reported (ASHA stops at max_t too), and fit()
    # may raise while the trial's process shuts down, so neither an exception here nor code after fit()
    # says how the trial ended: the driver closes the child runs from Tune's results at the end.
    trainer.fit()


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
                                      failure_config=ray.tune.FailureConfig(max_failures=1), verbose=1),
    )


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
        outcome = finish_study(c, cfg, grid, name, parent, uri, out_dir)
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
    flat = _flatten(cfg.model_dump(mode="json"))
    tracking.log_params(c, parent, {k: v for k, v in flat.items() if not k.startswith("faults.")})
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        Path(d, "search_space.json").write_text(json.dumps(
            {**bounds_of(cfg.search), "log_uniform": list(WEIGHTS), "algorithm": cfg.search.algorithm,
             "objectives": cfg.search.objectives or [cfg.search.metric], "mode": cfg.search.mode}, indent=1))
        c.log_artifacts(parent, d)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, type(None))) else v
    return out


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
        rows.append({"trial": trial, **{k: params.get(k) for k in (*WEIGHTS, "temperature", "align_layers")},
                     **{k: params[k] for k in ("lr", "student_depth") if k in params},
                     metric: None if best is None else float(best[metric]),
                     **{o: None if best is None else best.get(o) for o in extra},
                     "epochs": ran, "status": status,
                     "error": str(r.error).splitlines()[0][:200] if r.error else None})
    return rows


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


def finish_study(c, cfg, grid, name: str, parent: str, uri: str, out_dir: Path) -> StudyOutcome:
    s = cfg.search
    rows = trial_rows(grid, cfg, name)
    close_trial_runs(c, cfg, name, rows)
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
        tracking.log_params(c, parent, {f"best.{k}": best[k] for k in (*WEIGHTS, "temperature", "align_layers")
                                        if best.get(k) is not None})
        c.log_metric(parent, f"best_{s.metric}", best[s.metric])
        c.set_tag(parent, "best_trial", best["trial"])
        (out_dir / "best.json").write_text(json.dumps({"study": name, **best}, indent=1))
        student_dir = export_trial_student(cfg, name, best["trial"], out_dir / "best_student")
        c.log_artifacts(parent, str(student_dir), "best_student")
        version = register(c, cfg.tracking.registered_model, parent, name)
    return StudyOutcome(name, rows, best, student_dir, parent, uri, version, front)


def export_trial_student(cfg, study: str, trial: str, out: Path) -> Path:
    """The best checkpoint's student of a trial's Train run, copied to ``out``."""
    import ray.train

    from tmad_ray.train.run import export_best

    _, student = export_best(ray.train.Result.from_path(Storage(cfg.storage.ray_results).uri(study, "train", trial)),
                             out)
    return student


def close_trial_runs(c, cfg, study: str, rows: list[dict]) -> None:
    """Each child run ends as Tune's results say its trial ended: FAILED (with the error as a tag)
    for an errored trial, KILLED for one Tune has no result of, FINISHED otherwise. The trial itself
    cannot be trusted to close its run: Tune kills it the moment it reports its last epoch, so it
    may die mid-way through any status update."""
    exp_id = tracking.experiment_id(c, cfg.tracking.experiment)
    by_trial = {r["trial"]: r for r in rows}
    for run in tracking.find_runs(c, exp_id, **{tracking.STUDY_TAG: study}):
        trial = run.data.tags.get(tracking.TRIAL_TAG)
        if trial is None:
            continue
        row = by_trial.get(trial, {})
        st = row.get("status", "")
        if row.get(cfg.search.metric) is not None:
            c.log_metric(run.info.run_id, f"best_{cfg.search.metric}", row[cfg.search.metric])
        c.set_tag(run.info.run_id, "tune_status", st or "unknown")
        if row.get("error"):
            c.set_tag(run.info.run_id, "tune_error", row["error"])
        c.set_terminated(run.info.run_id, status={"ERROR": "FAILED", "": "KILLED",
                                                  "INTERRUPTED": "KILLED"}.get(st, "FINISHED"))


def register(c, model_name: str, parent: str, study: str) -> int:
    """A new version of ``model_name`` in the Model Registry, pointing at the parent run's best student."""
    if not c.search_registered_models(filter_string=f"name = '{model_name}'"):
        c.create_registered_model(model_name)
    run = c.get_run(parent)
    v = c.create_model_version(model_name, source=f"{run.info.artifact_uri}/best_student", run_id=parent,
                               tags={"study": study}, description=f"best student of study {study}")
    return v.version


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
    head = ["trial", "alpha", "beta", "gamma", "delta", "T", "layers", *(["lr"] if has_lr else []),
            *(["depth"] if has_depth else []), f"best {metric}", "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)
    for r in rows:
        cells = [r["trial"], *(f(r[k]) for k in WEIGHTS), f(r["temperature"], "{:.2f}"), str(r["align_layers"]),
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
    for r in rows:
        if r[s.metric] is None or any(r.get(k) is None for k in dist):
            continue
        study.add_trial(optuna.trial.create_trial(params={k: r[k] for k in dist}, distributions=dist,
                                                  value=r[s.metric]))
    paths = []
    if len(study.trials) >= 1:
        ovm.plot_optimization_history(study)
        paths.append(_save(plt, Path(out) / "optuna_history.png"))
    if len(study.trials) >= 2 and len({t.value for t in study.trials}) > 1:
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


def mlflow_ui_command(uri: str) -> str:
    uri = tracking.redact(uri)
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite") \
        else f"open {uri} in a browser"

