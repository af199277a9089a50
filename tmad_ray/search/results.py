"""What a study found, as rows and tables: one row per trial (from Tune's results and the trial's Ray
Train checkpoints), the Pareto front, the tables printed and logged, the start-up summary, and the
links that open the study in MLflow."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tmad_ray import tracking
from tmad_ray.recipe import KEYS, WEIGHTS
from tmad_ray.storage import Storage


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
        if (r.metrics or {}).get("non_finite_loss"):  # diverged: never the study's best, never exported
            status, best = f"NON-FINITE LOSS (epoch {r.metrics['non_finite_loss']})", None
        params = r.config or {}
        extra = [o for o in (cfg.search.objectives or []) if o != metric]
        ended = (r.metrics or {}).get("timestamp")  # Tune's time of the trial's last report (seconds)
        rows.append({"trial": trial, "trial_number": params.get("trial_number"),
                     **{k: params.get(k) for k in KEYS},
                     **{k: params[k] for k in ("lr", "student_depth") if k in params},
                     metric: None if best is None else float(best[metric]),
                     **{o: None if best is None else best.get(o) for o in extra},
                     "epochs": ran, "status": status, "ended": ended,
                     "error": str(r.error).splitlines()[0][:200] if r.error else None})
    return sorted(rows, key=lambda r: (r["trial_number"] is None, r["trial_number"] or 0))


def train_summary(cfg, study: str, trial: str) -> tuple[dict | None, int]:
    """(metrics of the best checkpoint, last epoch) of a trial's Train run; (None, 0) if it has none."""
    import ray.train

    from tmad_ray.search.cohorts import cohort_of

    storage = Storage(cfg.storage.ray_results)
    if (cohort := cohort_of(cfg.storage.ray_results, study, trial)) is not None:
        return cohort_summary(cfg, storage, study, cohort, trial)
    if not storage.is_file(study, "train", trial, "checkpoint_manager_snapshot.json"):
        return None, 0
    result = ray.train.Result.from_path(storage.uri(study, "train", trial))
    kept = [m for _, m in (result.best_checkpoints or []) if cfg.search.metric in m]
    if not kept:
        return None, 0
    pick = max if cfg.search.mode == "max" else min
    return pick(kept, key=lambda m: m[cfg.search.metric]), int((result.metrics or {}).get("epoch", 0))


def cohort_summary(cfg, storage: Storage, study: str, cohort: str, trial: str) -> tuple[dict | None, int]:
    """``train_summary`` for a student of a cohort: its best so far (the epoch exported under
    ``best/``) and its last epoch, from the status its run keeps beside its checkpoints."""
    from tmad_ray.train.cohort_loop import COHORT_FILE

    saved = storage.read_bytes(study, "train", cohort, COHORT_FILE)
    member = json.loads(saved)["members"].get(trial) if saved else None
    if member is None:
        return None, 0
    ran = int(member["last"].get("epoch", 0))
    names = dict.fromkeys([cfg.search.metric, *(cfg.search.objectives or [])])
    best = {k: member["best"][f"best_{k}"] for k in names if f"best_{k}" in member["best"]}
    return (best if cfg.search.metric in best else None), ran


def objective_modes(cfg) -> tuple[list[str], list[str]]:
    s = cfg.search
    objectives = s.objectives or [s.metric]
    return objectives, [s.mode if o == s.metric else ("max" if o.startswith("val_acc") or o == "val_macro_f1"
                                                      else "min") for o in objectives]


def pareto_front(rows: list[dict], objectives: list[str], modes: list[str]) -> list[dict]:
    """The rows no other row beats in every objective (and strictly in one)."""
    def better_or_equal(a, b):
        return all((a[o] >= b[o]) if m == "max" else (a[o] <= b[o]) for o, m in zip(objectives, modes))

    def strictly(a, b):
        return any((a[o] > b[o]) if m == "max" else (a[o] < b[o]) for o, m in zip(objectives, modes))
    done = [r for r in rows if all(r.get(o) is not None for o in objectives)]
    return [r for r in done if not any(better_or_equal(o, r) and strictly(o, r) for o in done if o is not r)]


def pareto_table(front: list[dict], objectives: list[str]) -> str:
    lines = ["| trial | " + " | ".join(objectives) + " | student depth | " + " | ".join(WEIGHTS) + " | T | layers |",
             "|---|" + "---:|" * (len(objectives) + 1 + len(WEIGHTS) + 1) + "---|"]
    for r in sorted(front, key=lambda r: r[objectives[0]], reverse=True):
        lines.append(f"| {r['trial']} | " + " | ".join(f"{r[o]:.3f}" for o in objectives) +
                     f" | {r.get('student_depth', '-')} | " + " | ".join(f"{r[k]:.3g}" for k in WEIGHTS) +
                     f" | {r['temperature']:.2f} | {r['align_layers']} |")
    return "\n".join(lines)


def results_table(rows: list[dict], metric: str) -> str:
    has_lr = any("lr" in r for r in rows)
    has_depth = any("student_depth" in r for r in rows)
    has_mean = any(f"{metric}_mean" in r for r in rows)  # trials confirmed on more seeds
    head = ["#", "trial", *WEIGHTS, "T", "layers", *(["lr"] if has_lr else []),
            *(["depth"] if has_depth else []), f"best {metric}", *(["mean over seeds"] if has_mean else []),
            "epochs", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)
    for r in rows:
        cells = [str(r.get("trial_number", "-")), r["trial"], *(f(r[k]) for k in WEIGHTS), f(r["temperature"], "{:.2f}"), str(r["align_layers"]),
                 *([f(r.get("lr"))] if has_lr else []), *([str(r.get("student_depth", "-"))] if has_depth else []),
                 f(r[metric], "{:.3f}"), *([_mean_cell(r, metric)] if has_mean else []), str(r["epochs"]), r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_cell(r: dict, metric: str) -> str:
    runs = r.get(f"{metric}_runs")
    return "-" if not runs else f"{r[f'{metric}_mean']:.3f} ({len(runs)} runs)"


def rows_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = sorted({k for r in rows for k in r})
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


STARTUP_PHASES = ("trial_setup_s", "ray_train_start_s", "models_s", "first_step_s", "startup_s")


def startup_summary(trials_dir: Path) -> str | None:
    """One line: the median of each start-up phase over the study's trials (their logs' "startup" events)."""
    import statistics

    events = []
    for run_log in sorted(Path(trials_dir).glob("*/train_log.jsonl")):
        found = [json.loads(line) for line in run_log.read_text().splitlines() if '"startup"' in line]
        if found and "ray_train_start_s" in found[0]:
            events.append(found[0])
    if not events:
        return None
    median = {k: statistics.median(e[k] for e in events) for k in STARTUP_PHASES}
    return (f"trial start-up (median of {len(events)}): {median['startup_s']:.1f} s to the first step = "
            f"{median['trial_setup_s']:.1f} s trial set-up + {median['ray_train_start_s']:.1f} s Ray Train start "
            f"(controller, worker processes) + {median['models_s']:.1f} s models + {median['first_step_s']:.1f} s "
            "first step + imports, DDP, data (each trial's train_log.jsonl, event \"startup\")")


def runs_url(uri: str, experiment_id: str, metric: str = "val_accuracy", mode: str = "max",
             ui: str = "http://127.0.0.1:5000") -> str:
    """The study's experiment in MLflow's runs view, best trial first (MLflow 3 opens its GenAI screen
    without ``workflowType=machine_learning``)."""
    base = tracking.redact(uri).rstrip("/") if uri.startswith(("http://", "https://")) else ui
    return (f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&orderByKey=metrics.%60best_{metric}%60&orderByAsc={'true' if mode == 'min' else 'false'}")


def mlflow_ui_command(uri: str) -> str:
    uri = tracking.redact(uri)
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite") \
        else f"open {uri} in a browser"
