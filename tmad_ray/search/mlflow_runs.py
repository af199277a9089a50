"""A study's MLflow bookkeeping: the parent run's params and artifacts, closing the trials' child
runs as Tune says they ended, and registering the best student as a pyfunc model version.

The primitives (client, runs by tag, params, per-epoch logging) are ``tmad_ray.tracking``, which
the training loop uses too; this module needs the search's results and the serving model on top.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import tempfile
from pathlib import Path

from tmad_ray import recipe, tracking
from tmad_ray.search.results import train_summary

CHAMPION = "champion"  # the registered model's alias for the newest study's best student


def log_study_start(client, parent: str, cfg) -> None:
    """The parent run's description, git commit, params (``study_params``) and artifacts: the whole
    config (secrets redacted) and the search space."""
    import yaml


    client.set_tag(parent, "mlflow.source.git.commit", git_commit())
    client.set_tag(parent, tracking.NOTE_TAG, f"Study `{cfg.name}`: {cfg.search.num_samples} trials of "
                   f"{cfg.train.epochs} epochs ({cfg.search.algorithm.upper()}), searching alpha, beta, gamma, delta, "
                   f"T and the aligned layers for {cfg.search.metric}. The whole config is the artifact config.yaml.")
    tracking.log_params(client, parent, study_params(cfg))
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.yaml").write_text(yaml.safe_dump(tracking.redact_tree(cfg.model_dump(mode="json")),
                                                         sort_keys=False))
        Path(d, "search_space.json").write_text(json.dumps(
            {**recipe.bounds_of(cfg.search), "log_uniform": list(recipe.WEIGHTS), "algorithm": cfg.search.algorithm,
             "objectives": cfg.search.objectives or [cfg.search.metric], "mode": cfg.search.mode}, indent=1))
        client.log_artifacts(parent, d)


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


def trial_run_ids(client, cfg, study: str) -> dict[str, str]:
    """Tune trial id -> its MLflow child run id."""
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment)
    return {r.data.tags[tracking.TRIAL_TAG]: r.info.run_id
            for r in tracking.find_runs(client, exp_id, **{tracking.STUDY_TAG: study}) if tracking.TRIAL_TAG in r.data.tags}


def close_trial_runs(client, cfg, study: str, rows: list[dict]) -> None:
    """Each child run ends as Tune's results say its trial ended, at the time of its last report:
    FAILED (with the error as a tag) for an errored trial, KILLED for one Tune has no result of or
    that was interrupted, FINISHED otherwise; a trial ASHA stopped says so in its name. The trial
    itself cannot be trusted to close its run: Tune kills it the moment it reports its last epoch,
    so it may die mid-way through any status update."""
    exp_id = tracking.experiment_id(client, cfg.tracking.experiment)
    by_trial = {r["trial"]: r for r in rows}
    for run in tracking.find_runs(client, exp_id, **{tracking.STUDY_TAG: study}):
        trial = run.data.tags.get(tracking.TRIAL_TAG)
        if trial is None:
            continue
        row = by_trial.get(trial, {})
        st = row.get("status", "")
        if row.get(cfg.search.metric) is not None:
            client.log_metric(run.info.run_id, f"best_{cfg.search.metric}", row[cfg.search.metric],
                              step=int(row.get("epochs") or 0))
        client.set_tag(run.info.run_id, "tune_status", st or "unknown")
        if row.get("error"):
            client.set_tag(run.info.run_id, "tune_error", row["error"])
        if row:  # the name a trial ends with: its best score, and whether ASHA stopped it
            client.update_run(run.info.run_id, name=tracking.trial_run_name(
                row, row.get(cfg.search.metric), row["epochs"] if st == "STOPPED (ASHA)" else None))
        ended = int(row["ended"] * 1000) if row.get("ended") else None
        client.set_terminated(run.info.run_id, end_time=ended,
                              status="FAILED" if st.startswith("NON-FINITE") else
                              {"ERROR": "FAILED", "": "KILLED", "INTERRUPTED": "KILLED"}.get(st, "FINISHED"))


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


def register_student(client, cfg, uri: str, study: str, best: dict, run_id: str, student_dir: Path, manifest) -> int:
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
    weights = {k: best[k] for k in (*recipe.WEIGHTS, "temperature") if best.get(k) is not None}
    study_p = study_params(cfg)
    tags = {**{k: f"{v:.4g}" for k, v in weights.items()},
            "align_layers": recipe.layers_param(best["align_layers"]),
            "lr": f"{best.get('lr', cfg.train.lr):.3g}", **{k: f"{v:.4f}" for k, v in model_metrics.items()},
            **({"test": test["test"]} if "test" in test else {"test_videos": str(test["test_videos"])}),
            "teacher": m.teacher.name, "assistant": study_p["assistant"],
            "student": study_p["student"], "labels": json.dumps(list(manifest.labels) if manifest else []),
            "study": study, "trial": f"#{best.get('trial_number')} ({best['trial']})", "epoch": str(epoch)}
    for k, v in tracking.redact_params(tags).items():
        client.set_model_version_tag(name, version, k, str(v))
    client.update_model_version(name, version, description=(
        f"Best student of study `{study}` (trial #{best.get('trial_number')}): {recipe.short(best)}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in model_metrics.items())
        + ". Load it with `mlflow.pyfunc.load_model(...)` and predict on a list of video paths."))
    client.update_registered_model(name, description="Video classifiers distilled by tmad_ray (teacher + assistant "
                                   "-> student). `@champion` is the best student of the newest study.")
    client.set_registered_model_alias(name, CHAMPION, version)
    return version
