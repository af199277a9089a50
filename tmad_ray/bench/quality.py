"""``tmad-ray bench quality``: is the searched recipe better than what a user gets without the search?

On ``experiments/quality.yaml`` (few labeled training videos, 200 val and 200 test videos, the
pretrained toy student), every recipe gets the same budget (the config's epochs, lr, batch,
workers) and the same seeds; each run is a real ``tmad-ray train`` run on Ray Train whose best-val
checkpoint is exported and scored on the **test** split with multi-view evaluation. A seed
(``train.seed``) fixes the new head's initialization, the projectors, the data order and the crops,
so recipes are compared **paired**, seed by seed. The recipes:

* ``searched``: the best trial of the latest study of this config (``python tune.py --config
  experiments/quality.yaml`` first; ``make bench-quality`` does both), or a ``best.json``, or the
  config's own ``distill`` section (``--recipe config``);
* ``reference_default``: the reference framework's defaults mapped onto α/β/γ/δ: CE 1, feature 1.0
  (β), attention 0.5 (γ), teacher feature weight 1.0 and assistant 0.8, T 4.0, layers -1,-2,-3,
  and δ = 0: its "asymmetric" term compares the teacher's and assistant's features only, so it has
  no gradient and teaches the student nothing;
* ``ce_only``: fine-tuning alone (α = 1, β = γ = δ = 0: no teacher or assistant forward);
* ``logit_kd``: classic Hinton KD from the teacher alone (CE + T²·KL on the teacher's logits, no
  relations, no assistant);
* ``no_alpha`` … ``no_delta``: the searched recipe with one term switched off;
* ``reference_decay_all``, ``reference_view_pool``: the reference recipe with one difference of the
  training set-up undone or added (weight decay on biases and norms too, as tmad_ray did before;
  a pool of 8 cached views per training video with 2 drawn each epoch instead of 2 fixed ones).
  Asked for with ``--variants``; reported paired against ``reference_default``.

Reported per recipe: the mean test accuracy with a 95 % confidence interval over the seeds (t
distribution), and its paired difference to ``ce_only`` with a 95 % CI. The test set is fixed, so
the intervals are over training randomness; a recipe is "better" only where its paired CI is
above 0.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tmad_ray.bench import write_result
from tmad_ray.errors import NotFound
from tmad_ray.plots import save_figure
from tmad_ray.recipe import KEYS, WEIGHTS, apply, of_config

REFERENCE_DEFAULT = {"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "delta": 0.0, "temperature": 4.0,
                     "align_layers": "-1,-2,-3", "teacher_weight": 1.0, "assistant_weight": 0.8}
CE_ONLY = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}
LOGIT_KD = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 1.0, "temperature": 4.0, "relations": False,
            "teacher_weight": 1.0, "assistant_weight": 0.0}
# The training set-up's differences, each on its own (issue: "the same recipe trains as well as in a
# plain HF Trainer"): dotted keys are config settings, applied on top of the recipe.
SETUP_VARIANTS = {"reference_decay_all": {"train.decay_all_params": True},
                  "reference_view_pool": {"data.train_view_pool": 8}}


def latest_best(cfg) -> Path:
    found = sorted(Path(cfg.storage.output_dir).glob(f"{cfg.name}-*/best.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise NotFound(f"no finished study of {cfg.name!r} under {cfg.storage.output_dir}: run "
                       f"`python tune.py --config <this config>` first (make bench-quality does), or use --recipe config")
    return found[-1]


def recipes(cfg, recipe: str) -> tuple[dict[str, dict], str]:
    """Every recipe's distill settings (searched first, ce_only the baseline) and where the searched
    one came from."""
    if recipe == "config":
        searched, source = of_config(cfg), "config"
    else:
        path = Path(recipe) if recipe != "searched" else latest_best(cfg)
        best = json.loads(path.read_text())
        searched, source = {k: best[k] for k in KEYS}, str(path)
    base = {k: searched[k] for k in ("temperature", "align_layers")}
    out = {"searched": dict(searched), "reference_default": dict(REFERENCE_DEFAULT),
           "ce_only": {**base, **CE_ONLY}, "logit_kd": {**base, **LOGIT_KD}}
    for term in WEIGHTS:
        out[f"no_{term}"] = {**searched, term: 0.0}
    for name, setup in SETUP_VARIANTS.items():
        out[name] = {**REFERENCE_DEFAULT, **setup}
    return out, source


def apply_recipe(cfg, recipe: dict):
    """``cfg`` with a recipe: the searched knobs as a trial applies them (``tmad_ray.recipe.apply``), the
    rest (relations, teacher/assistant weights, a set-up variant's dotted settings) on top."""
    run_cfg = apply(cfg, recipe)
    for k in ("relations", "teacher_weight", "assistant_weight"):
        if k in recipe:
            setattr(run_cfg.distill, k, recipe[k])
    for key, value in recipe.items():
        if "." in key:  # a set-up variant's setting (SETUP_VARIANTS)
            section, field = key.split(".")
            setattr(getattr(run_cfg, section), field, value)
    return run_cfg


def prepare_variants(cfg, recipes_run: list[dict], manifest, report) -> dict:
    """``{data settings as JSON: (manifest, report)}``: a set-up variant that caches other views
    (``data.train_view_pool``) gets its own clip-cache entries, prepared before any run starts."""
    from tmad_ray.study import prepare_study

    prepared = {cfg.data.model_dump_json(): (manifest, report)}
    for recipe in recipes_run:
        data = apply_recipe(cfg, recipe).data
        if data.model_dump_json() not in prepared:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.data = data
            prepared[data.model_dump_json()] = prepare_study(run_cfg)[:2]
    return prepared


def t_interval(xs: list[float]) -> tuple[float, list[float] | None]:
    """Mean and 95 % t confidence interval (None from a single value: no interval)."""
    from scipy import stats

    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, None
    half = float(stats.t.ppf(0.975, len(xs) - 1)) * statistics.stdev(xs) / math.sqrt(len(xs))
    return m, [m - half, m + half]


def run_quality_bench(cfg, out: str, seeds: list[int], recipe: str = "searched", variants: list[str] | None = None,
                      parallel: int | None = None, say=print) -> dict:
    """Every recipe at every seed, ``parallel`` runs at a time (default: as many as a study runs side
    by side here); the JSON at ``out``, its plot beside it."""
    from tmad_ray.bench.time_to_quality import teacher_test_accuracy
    from tmad_ray.cluster import init_ray, local_trials
    from tmad_ray.study import prepare_study
    from tmad_ray.train.evaluate import evaluate_exported
    from tmad_ray.train.run import fit

    all_recipes, source = recipes(cfg, recipe)
    names = variants or [n for n in all_recipes if n not in SETUP_VARIANTS]
    unknown = [n for n in names if n not in all_recipes]
    if unknown:
        raise NotFound(f"no recipe {', '.join(unknown)}; the recipes: {', '.join(all_recipes)}")
    if "ce_only" not in names:
        names = ["ce_only", *names]  # the baseline of every paired difference
    parallel = max(1, parallel or local_trials(cfg))
    init_ray(cfg, parallel)
    manifest, report, models = prepare_study(cfg)
    student = models["student"]
    init = (f"pretrained: {cfg.models.student.name}" if getattr(student, "reinitialized", None) else "scratch")
    del models
    prepared = prepare_variants(cfg, [all_recipes[n] for n in names], manifest, report)
    teacher = teacher_test_accuracy(cfg, manifest, Path(cfg.storage.output_dir) / "quality_teacher")
    t0, runs, stamp = time.time(), [], time.strftime("%Y%m%d-%H%M%S")

    def one(seed: int, name: str) -> dict:
        run_cfg = apply_recipe(cfg, all_recipes[name])
        run_cfg.train.seed = seed
        outcome = fit(run_cfg, *prepared[run_cfg.data.model_dump_json()], f"quality-{cfg.name}-{stamp}-{name}-s{seed}")
        ev = evaluate_exported(str(outcome.student_dir), cfg.data.root, "test", cfg.data.eval_clips,
                               cfg.data.eval_crops, cfg.data.label_mode)
        return {"recipe": name, "seed": seed, "val_accuracy": outcome.best_metrics["val_accuracy"],
                "best_epoch": outcome.best_metrics["epoch"], "test_accuracy": ev["accuracy"],
                "test_macro_f1": ev["macro_f1"]}

    # Runs are independent: as many side by side as the trials of a study (one worker's CPUs each).
    # Seeds outside, in submission order: a benchmark cut short still has every recipe at the first seeds.
    jobs = [(seed, name) for seed in seeds for name in names]
    with ThreadPoolExecutor(parallel) as pool:
        for run in pool.map(lambda job: one(*job), jobs):
            runs.append(run)
            say(f"  {run['recipe']:<18} seed {run['seed']}: val {run['val_accuracy']:.3f}  test {run['test_accuracy']:.3f}")
            # what has run so far, for a benchmark cut short (the full result replaces it at the end)
            Path(out).with_suffix(".partial.json").write_text(json.dumps(runs, indent=1))
    result = {"benchmark": "quality", "config": cfg.name, "recipe_source": source, "seeds": seeds,
              "n_train": len(manifest.rows["train"]), "n_val": len(manifest.rows["val"]),
              "n_test": len(manifest.rows["test"]), "student_init": init, "teacher_test_accuracy": teacher,
              "parallel_runs": parallel,
              "budget": {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                         "workers": cfg.train.num_workers},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "minutes": (time.time() - t0) / 60, "chance": 1 / len(manifest.labels),
              "recipes": {n: all_recipes[n] for n in names}, "runs": runs, **summarize(runs, names, teacher)}
    plot(result, str(Path(out).with_suffix(".png")))
    Path(out).with_suffix(".partial.json").unlink(missing_ok=True)
    return write_result(result, out, format_table(result))


def summarize(runs: list[dict], names: list[str], teacher: float | None) -> dict:
    """``summary.<recipe>``: mean test accuracy and its 95 % CI; ``paired_vs_ce_only.<recipe>``: the
    mean seed-by-seed difference to ce_only and its 95 % CI (seeds that both ran);
    ``paired_searched_vs.<recipe>``: the same for the searched recipe against every other one;
    ``paired_setup_vs_reference.<variant>``: each set-up variant minus ``reference_default``."""
    acc = {n: {r["seed"]: r["test_accuracy"] for r in runs if r["recipe"] == n} for n in names}

    def paired(a: str, b: str) -> dict | None:
        both = sorted(set(acc[a]) & set(acc.get(b, {})))
        if not both:
            return None
        d, dci = t_interval([acc[a][s] - acc[b][s] for s in both])
        return {"mean_diff": d, "ci95": dci, "seeds": len(both),
                "better": dci is not None and dci[0] > 0, "worse": dci is not None and dci[1] < 0}

    summary, vs_ce, vs_searched, vs_ref = {}, {}, {}, {}
    for n in names:
        xs = [acc[n][s] for s in sorted(acc[n])]
        if not xs:
            continue
        m, ci = t_interval(xs)
        summary[n] = {"test_accuracy_mean": m, "ci95": ci, "test_accuracy": xs,
                      "val_accuracy_mean": statistics.mean(r["val_accuracy"] for r in runs if r["recipe"] == n)}
        if teacher:
            summary[n]["vs_teacher"] = m / teacher
        if n != "ce_only" and (d := paired(n, "ce_only")):
            vs_ce[n] = d
        if n != "searched" and "searched" in acc and (d := paired("searched", n)):
            vs_searched[n] = d
        if n in SETUP_VARIANTS and (d := paired(n, "reference_default")):
            vs_ref[n] = d
    return {"summary": summary, "paired_vs_ce_only": vs_ce, "paired_searched_vs": vs_searched,
            "paired_setup_vs_reference": vs_ref}


def resummarize(out: str) -> dict:
    """Recompute the statistics, table and plot of a finished ``bench quality`` JSON from its runs."""
    result = json.loads(Path(out).read_text())
    names = list(result["recipes"])
    result.update(summarize(result["runs"], names, result.get("teacher_test_accuracy")))
    plot(result, str(Path(out).with_suffix(".png")))
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    b = r["budget"]
    teacher = r.get("teacher_test_accuracy")
    lines = [f"test accuracy on {r['n_test']} test videos ({r['n_train']} train, {r['n_val']} val), seeds {r['seeds']}, "
             f"{b['epochs']} epochs, batch {b['batch_size']}, lr {b['lr']}; student {r['student_init']}; chance "
             f"{r['chance']:.2f}" + (f"; teacher {teacher:.3f}" if teacher else "") +
             f"; searched recipe from {r['recipe_source']}",
             "| recipe | α | β | γ | δ | T | layers | test accuracy (95 % CI) | vs ce_only, paired (95 % CI) | "
             "searched minus this, paired (95 % CI) |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for name, s in r["summary"].items():
        p = r["recipes"][name]
        vs_ce = "baseline" if name == "ce_only" else _diff(r["paired_vs_ce_only"].get(name), "better", "worse")
        vs_s = "-" if name == "searched" else _diff(r.get("paired_searched_vs", {}).get(name), "searched better",
                                                    "searched worse")
        lines.append(f"| {name} | {p['alpha']:.3g} | {p['beta']:.3g} | {p['gamma']:.3g} | {p['delta']:.3g} | "
                     f"{p.get('temperature', 0):.2f} | {p.get('align_layers', '')} | {s['test_accuracy_mean']:.3f} "
                     f"{_ci(s['ci95'], '.3f')} | {vs_ce} | {vs_s} |")
    setup = r.get("paired_setup_vs_reference") or {}
    if setup:
        lines += ["", "| the reference recipe with | minus reference_default, paired (95 % CI) |", "|---|---|"]
        lines += [f"| {n}: {', '.join(f'{k}={v}' for k, v in SETUP_VARIANTS[n].items())} | "
                  f"{_diff(d, 'better', 'worse')} |" for n, d in setup.items()]
    return "\n".join(lines)


def _diff(d: dict | None, better: str, worse: str) -> str:
    if d is None:
        return "-"
    return (f"{d['mean_diff']:+.3f} {_ci(d['ci95'], '+.3f')}" +
            (f" **{better}**" if d["better"] else f" {worse}" if d["worse"] else ""))


def _ci(ci: list[float] | None, fmt: str) -> str:
    return "[one seed: no CI]" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def plot(r: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["summary"])
    means = [r["summary"][n]["test_accuracy_mean"] for n in names]
    cis = [r["summary"][n]["ci95"] or [m, m] for n, m in zip(names, means)]
    err = [[m - max(ci[0], 0) for ci, m in zip(cis, means)], [min(ci[1], 1) - m for ci, m in zip(cis, means)]]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 1, 3.8))
    ax.bar(names, means, yerr=err, capsize=4,
           color=["#3b75af" if n == "searched" else "#999999" if n == "ce_only" else "#b9cde0" for n in names])
    for i, n in enumerate(names):
        ys = r["summary"][n]["test_accuracy"]
        ax.scatter([i] * len(ys), ys, color="black", s=8, zorder=3)
    ax.axhline(r["chance"], ls="--", color="red", lw=1, label="chance")
    if r.get("teacher_test_accuracy"):
        ax.axhline(r["teacher_test_accuracy"], ls=":", color="green", lw=1, label="teacher")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy (95 % CI over seeds)")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(loc="lower right")
    return save_figure(fig, path)
