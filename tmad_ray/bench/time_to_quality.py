"""``tmad-ray bench time-to-quality``: how long until each way has a student this good?

For every seed (``search.seed`` and ``train.seed``), on the same config and the same machine:

* **tmad_ray as users run it**: ``python tune.py``'s path (study preparation with a fresh clip
  cache, then Tune with TPE + ASHA, trials on Ray Train, MLflow); the clock starts before the
  preparation;
* **the seed's way**: the same recipes in the same order (those the study's seeded sampler drew),
  one after another in one process, each trained to the full epoch count with clips decoded when a
  step needs them, the three models in fp32 with eager attention and ``output_attentions`` in every
  block, the same global batch, no early stopping (``bench.search.reference_trial``).

Each side's curve is its best validation accuracy so far against wall time, from its own start.
Both are read the same way: the time each first reaches fixed targets (the seed way's best val
accuracy, 95 % of it, the teacher's test accuracy), and the ratio seed way / tmad_ray (> 1: tmad_ray
is faster; a side that never gets there is infinitely slow). Each side's chosen recipe (best on
val) is scored on the **test** split.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tmad_ray import recipe
from tmad_ray.bench import seed_facts, write_result
from tmad_ray.plots import save_figure



def best_so_far(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(time, value) points in any order -> the running maximum, one point per improvement, by time."""
    curve, best = [], None
    for t, v in sorted(points):
        if best is None or v > best:
            best = v
            curve.append((t, v))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first time a best-so-far curve is at or above ``target`` (None: never)."""
    return next((t for t, v in curve if v >= target - 1e-9), None)


def study_epochs(trials_dir: Path, t0: float) -> list[tuple[float, float]]:
    """(seconds since ``t0``, val accuracy) of every epoch of every trial, from the trials' own logs."""
    points = []
    for run_log in sorted(trials_dir.glob("*/train_log.jsonl")):
        for line in run_log.read_text().splitlines():
            e = json.loads(line)
            if e.get("event") == "epoch_end" and e.get("val_accuracy") is not None:
                points.append((e["time"] - t0, float(e["val_accuracy"])))
    return points


def run_tmad_ray(cfg, work: Path, say=print, own_ray: bool = False) -> dict:
    """One study the way ``python tune.py`` runs it, timed from before the preparation; with
    ``own_ray``, from before Ray starts, and Ray is stopped at the end (what ``python tune.py`` pays)."""
    from tmad_ray.study import prepare_study
    from tmad_ray.search.driver import run_study
    from tmad_ray.search.mlflow_runs import evaluate_test

    cfg = cfg.model_copy(deep=True)
    cfg.storage.clip_cache, cfg.storage.ray_results = str(work / "clips"), str(work / "ray_results")
    cfg.storage.output_dir = str(work / "outputs")
    cfg.tracking.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    if not own_ray:
        resources = _ray_resources(cfg)
    t0 = time.time()
    if own_ray:
        resources = _ray_resources(cfg)
    manifest, report, models = prepare_study(cfg)  # cold clip cache: its decode counts
    del models
    study = run_study(cfg, manifest, report, resources, say=lambda *a: None)
    seconds = time.time() - t0
    if own_ray:
        from tmad_ray.cluster import shutdown_ray

        shutdown_ray()
    if study.best is None:
        raise RuntimeError(f"study {study.name}: no trial reported a result; its trials' errors are in "
                           f"{Path(cfg.storage.ray_results) / study.name}")
    points = study_epochs(Path(cfg.storage.output_dir) / study.name / "trials", t0)
    test = evaluate_test(cfg, study.best_student, manifest)["test_accuracy"]
    recipes = [{k: r[k] for k in recipe.KEYS} for r in study.rows]
    best = study.best
    say(f"  tmad_ray seed {cfg.search.seed}: {seconds:.0f} s, best val {best[cfg.search.metric]:.3f} "
        f"(trial #{best['trial_number']}), test {test:.3f}; {sum(r['epochs'] for r in study.rows)} epochs in all")
    return {"seconds": seconds, "epochs": [(t, v) for t, v in sorted(points)], "curve": best_so_far(points),
            "best_val_accuracy": best[cfg.search.metric], "chosen": {k: best[k] for k in recipe.KEYS},
            "test_accuracy": test, "recipes": recipes, "epochs_trained": sum(r["epochs"] for r in study.rows),
            "trials": [{"trial_number": r["trial_number"], "best_val_accuracy": r[cfg.search.metric],
                        "epochs": r["epochs"], "status": r["status"], "params": {k: r[k] for k in recipe.KEYS}}
                       for r in study.rows]}


def _ray_resources(cfg) -> dict:
    from tmad_ray.cluster import init_ray, local_trials
    from tmad_ray.search.trial import TRIAL_CPU

    return init_ray(cfg, local_trials(cfg), per_run_extra=TRIAL_CPU, quiet=True, worker_logs=False)


def run_seed_way(cfg, recipes: list[dict], say=print) -> dict:
    """The same recipes, in order, the seed's way in this process; the clock runs across trials."""
    from tmad_ray.bench.search import reference_trial
    from tmad_ray.data.manifest import load_manifest

    d = cfg.data
    manifest = load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed)
    elapsed, points, trials = 0.0, [], []
    for params in recipes:
        r = reference_trial(cfg, manifest, params, say=lambda *a: None, test=True)
        points += [(elapsed + t, v) for t, v in r["history"]]
        trials.append({"best_val_accuracy": r["best_val_accuracy"], "test_accuracy": r["test_accuracy"],
                       "seconds": r["seconds"]})
        elapsed += r["seconds"]
    chosen = max(range(len(trials)), key=lambda i: trials[i]["best_val_accuracy"])  # the first best, as Tune's
    say(f"  seed way seed {cfg.train.seed}: {elapsed:.0f} s, best val {trials[chosen]['best_val_accuracy']:.3f} "
        f"(trial #{chosen}), test {trials[chosen]['test_accuracy']:.3f}")
    return {"seconds": elapsed, "epochs": points, "curve": best_so_far(points),
            "best_val_accuracy": trials[chosen]["best_val_accuracy"], "chosen": recipes[chosen],
            "test_accuracy": trials[chosen]["test_accuracy"], "trials": trials}


def run_ttq_bench(cfg, out: str, seeds: list[int], say=print) -> dict:
    """Both ways for every seed, one after the other: tmad_ray as ``python tune.py`` runs it, with its
    own Ray started and stopped inside its clock (what a user pays), then the seed's way alone with
    the machine's threads. The JSON, table and plot are rewritten after every seed, so a benchmark
    cut short keeps the seeds it finished."""
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.data.synthetic import ensure_synthetic
    from tmad_ray.models.toyzoo import ensure_toy_zoo

    work = Path(tempfile.mkdtemp(prefix="bench_ttq_"))
    t_start = time.time()
    ensure_synthetic(cfg.data)  # the dataset, the toy zoo and the teacher's score before either clock starts
    ensure_toy_zoo(cfg)
    d = cfg.data
    manifest = load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed)
    teacher = teacher_test_accuracy(cfg, manifest, work / "teacher")
    threads = torch.get_num_threads()
    runs, result = [], {}
    for seed in seeds:
        scfg = cfg.model_copy(deep=True)
        scfg.search.seed, scfg.train.seed = seed, seed
        torch.set_num_threads(threads)
        run = {"seed": seed, "tmad_ray": run_tmad_ray(scfg, work / f"seed{seed}", say, own_ray=True)}
        torch.set_num_threads(os.cpu_count() or threads)  # the seed's way: one process, every core
        run["seed_way"] = run_seed_way(scfg, run["tmad_ray"]["recipes"], say)
        runs.append(run)
        result = summarize(cfg, runs, teacher)
        result.update(seed_facts(manifest, t_start, seeds))
        plot(result, str(Path(out).with_suffix(".png")))
        write_result(result, out, format_table(result))
    torch.set_num_threads(threads)
    return result


def targets_of(run: dict, teacher_test: float | None) -> dict[str, float]:
    """The fixed val accuracies both sides race to, for one seed: the seed way's best, 95 % of it, and
    the teacher's test accuracy (when measured)."""
    best = run["seed_way"]["best_val_accuracy"]
    out = {"seed_way_best": best, "95%_of_seed_way_best": 0.95 * best}
    if teacher_test is not None:
        out["teacher_test_accuracy"] = teacher_test
    return out


def teacher_test_accuracy(cfg, manifest, out: Path) -> float | None:
    """The teacher's test accuracy, evaluated as the students are (multi-view, ``tmad-ray eval``'s
    way); None when its classifier does not have the dataset's labels (it teaches features only)."""
    from transformers import VideoMAEForVideoClassification

    from tmad_ray.train.evaluate import evaluate_exported
    from tmad_ray.train.export import export_student

    teacher = VideoMAEForVideoClassification.from_pretrained(cfg.models.teacher.name)
    if sorted(teacher.config.id2label.values()) != sorted(manifest.labels) or not manifest.rows.get("test"):
        return None
    export_student(teacher, cfg.data, out)
    return evaluate_exported(str(out), str(manifest.root), "test", label_mode=cfg.data.label_mode)["accuracy"]


def summarize(cfg, runs: list[dict], teacher_test: float | None = None) -> dict:
    """Per seed and target: the time each side first reaches it, each from its own start, read off
    its own best-so-far curve the same way, and their ratio (seed way / tmad_ray: > 1 means tmad_ray
    is faster). A side that never reaches a target counts as never (``None``, infinitely slow) in the
    median; then both chosen recipes' test accuracies, their means and spreads."""
    for run in runs:
        run["time_to_target"] = []
        for name, target in targets_of(run, teacher_test).items():
            w, t = time_to_reach(run["seed_way"]["curve"], target), time_to_reach(run["tmad_ray"]["curve"], target)
            run["time_to_target"].append({"target": name, "value": target, "seed_way_s": w, "tmad_ray_s": t,
                                          "ratio": ratio_of(w, t)})

    def mean_sd(xs):
        return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": xs}
    s = cfg.search
    return {
        "benchmark": "time_to_quality", "config": cfg.name, "seeds": [r["seed"] for r in runs],
        "budget": {"trials": s.num_samples, "epochs": cfg.train.epochs, "grace_period": s.grace_period,
                   "reduction_factor": s.reduction_factor, "batch_size": cfg.train.batch_size,
                   "num_workers": cfg.train.num_workers},
        "teacher_test_accuracy": teacher_test,
        "runs": runs,
        "summary": {"time_to_target": time_to_target_summary(runs),
                    "tmad_ray_seconds": mean_sd([r["tmad_ray"]["seconds"] for r in runs]),
                    "seed_way_seconds": mean_sd([r["seed_way"]["seconds"] for r in runs]),
                    "tmad_ray_test": mean_sd([r["tmad_ray"]["test_accuracy"] for r in runs]),
                    "seed_way_test": mean_sd([r["seed_way"]["test_accuracy"] for r in runs]),
                    "tmad_ray_best_val": mean_sd([r["tmad_ray"]["best_val_accuracy"] for r in runs]),
                    "seed_way_best_val": mean_sd([r["seed_way"]["best_val_accuracy"] for r in runs])},
    }


def ratio_of(slow_side: float | None, fast_side: float | None) -> float | None:
    """``slow_side / fast_side`` with never = infinitely slow: inf when only the other side never gets
    there, 0 when only this one never does, None when neither does."""
    if slow_side is None and fast_side is None:
        return None
    if fast_side is None:
        return 0.0
    if slow_side is None:
        return math.inf
    return slow_side / max(fast_side, 1e-9)


def time_to_target_summary(runs: list[dict]) -> list[dict]:
    """One row per target: both sides' times over the seeds and the median ratio (seeds where neither
    side gets there are left out of the median and counted)."""
    rows = []
    for i, first in enumerate(runs[0]["time_to_target"] if runs else []):
        per_seed = [r["time_to_target"][i] for r in runs]
        ratios = [x["ratio"] for x in per_seed if x["ratio"] is not None]
        rows.append({"target": first["target"], "seed_way_s": [x["seed_way_s"] for x in per_seed],
                     "tmad_ray_s": [x["tmad_ray_s"] for x in per_seed], "ratio": [x["ratio"] for x in per_seed],
                     "median_ratio": statistics.median(ratios) if ratios else None,
                     "neither_reached": len(per_seed) - len(ratios)})
    return rows


def _fmt_s(x: float | None) -> str:
    return "never" if x is None else f"{x:.0f} s"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else ("∞" if x == math.inf else f"{x:.2f}×")


def headline(r: dict) -> str:
    s = r["summary"]
    first = s["time_to_target"][0]
    m = first["median_ratio"]
    speed = ("no seed reached it on either side" if m is None else
             f"tmad_ray is {_fmt_ratio(m)} the seed way's speed (median of {len(r['seeds'])} seeds; "
             f"> 1 means tmad_ray gets there sooner)")
    return (f"Time to first reach the seed way's best val accuracy, both sides from their own start: {speed}; "
            f"chosen recipes score {s['tmad_ray_test']['mean']:.3f} ± {s['tmad_ray_test']['sd']:.3f} (tmad_ray) vs "
            f"{s['seed_way_test']['mean']:.3f} ± {s['seed_way_test']['sd']:.3f} (seed way) on test")


def format_table(r: dict) -> str:
    b = r["budget"]
    lines = [f"{b['trials']} trials × up to {b['epochs']} epochs of {r['config']!r} (ASHA grace {b['grace_period']}, "
             f"reduction {b['reduction_factor']:g} for tmad_ray; every trial to the end for the seed way), "
             f"seeds {r['seeds']}; {r['videos']['train']} train, {r['videos']['val']} val, {r['videos']['test']} test "
             f"videos (chance {r['chance']:.2f}); {r['machine']['cpus']} CPUs; the whole benchmark took "
             f"{r['benchmark_minutes']:.0f} min",
             "| seed | seed way: wall s | best val | test (chosen) | tmad_ray: wall s | best val | test (chosen) | "
             "epochs trained |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        w, t = run["seed_way"], run["tmad_ray"]
        lines.append(f"| {run['seed']} | {w['seconds']:.0f} | {w['best_val_accuracy']:.3f} | {w['test_accuracy']:.3f} | "
                     f"{t['seconds']:.0f} | {t['best_val_accuracy']:.3f} | {t['test_accuracy']:.3f} | "
                     f"{t['epochs_trained']} of {b['trials'] * b['epochs']} |")
    lines += ["", "| target (val accuracy) | seed way: time to first reach, per seed | tmad_ray | ratio (seed way / "
              "tmad_ray) | median ratio |", "|---|---|---|---|---:|"]
    for row in r["summary"]["time_to_target"]:
        lines.append(f"| {row['target']} | {', '.join(map(_fmt_s, row['seed_way_s']))} | "
                     f"{', '.join(map(_fmt_s, row['tmad_ray_s']))} | {', '.join(map(_fmt_ratio, row['ratio']))} | "
                     f"{_fmt_ratio(row['median_ratio'])} |")
    return "\n".join(lines + ["", headline(r)])


def plot(r: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(r["runs"]):
        for side, color in (("seed_way", "#999999"), ("tmad_ray", "#3b75af")):
            c = run[side]["curve"]
            xs = [t / 60 for t, _ in c] + [run[side]["seconds"] / 60]
            ys = [v for _, v in c] + [c[-1][1]]
            ax.step(xs, ys, where="post", color=color, alpha=0.85, lw=1.5,
                    label=(("seed's way" if side == "seed_way" else "tmad_ray (tune.py)") if i == 0 else None))
            ax.plot(xs[-1], ys[-1], "o", color=color, ms=4)
    if "chance" in r:
        ax.axhline(r["chance"], ls="--", color="red", lw=1, label="chance")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_ylim(0, 1)
    ax.set_title(f"{r['config']}: {len(r['runs'])} seeds, the same recipes on both sides")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
