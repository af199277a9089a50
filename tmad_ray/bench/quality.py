"""``tmad-ray bench quality``: does the searched distillation beat plain training, and which term helps?

On the config's task (the embedded default unless told otherwise), at one training budget (the
config's epochs, lr, batch, workers), over several seeds (``train.seed``: initialization, crops,
order), each variant is a real ``tmad-ray train`` run on Ray Train whose best-val checkpoint is
exported and scored on the **test** split with multi-view evaluation:

* ``ce_only``: α=1, β=γ=δ=0, the student alone (no teacher or assistant forward);
* ``distilled``: the recipe of the latest study's best trial (``outputs/<study>/best.json``), or
  the config's ``distill`` section with ``--recipe config``;
* ``no_beta`` / ``no_gamma`` / ``no_delta``: the distilled recipe with one term switched off.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from tmad_ray.bench import write_result
from tmad_ray.errors import NotFound
from tmad_ray.plots import save_figure

TERMS = {"no_beta": "beta", "no_gamma": "gamma", "no_delta": "delta"}


def latest_best(cfg) -> Path:
    found = sorted(Path(cfg.storage.output_dir).glob(f"{cfg.name}-*/best.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise NotFound(f"no finished study of {cfg.name!r} under {cfg.storage.output_dir}: run "
                       "`python tune.py` first, or use --recipe config")
    return found[-1]


def recipes(cfg, recipe: str) -> tuple[dict, str]:
    """The variants' distill settings and where the distilled recipe came from."""
    if recipe == "config":
        d = cfg.distill
        base = {k: getattr(d, k) for k in ("alpha", "beta", "gamma", "delta", "temperature")}
        base["align_layers"] = ",".join(map(str, d.align_layers))
        source = "config"
    else:
        path = Path(recipe) if recipe != "searched" else latest_best(cfg)
        best = json.loads(path.read_text())
        base = {k: best[k] for k in ("alpha", "beta", "gamma", "delta", "temperature", "align_layers")}
        source = str(path)
    out = {"ce_only": {**base, "alpha": 1.0, "beta": 0.0, "gamma": 0.0, "delta": 0.0}, "distilled": dict(base)}
    for name, term in TERMS.items():
        out[name] = {**base, term: 0.0}
    return out, source


def run_quality_bench(cfg, out: str, seeds: list[int], recipe: str = "searched", variants: list[str] | None = None,
                      say=print) -> dict:
    from tmad_ray.study import prepare_study
    from tmad_ray.cluster import init_ray
    from tmad_ray.search.space import apply_params
    from tmad_ray.train.evaluate import evaluate_exported
    from tmad_ray.train.run import fit

    all_recipes, source = recipes(cfg, recipe)
    names = variants or list(all_recipes)
    init_ray(cfg)
    manifest, report, _ = prepare_study(cfg)
    runs, stamp = [], time.strftime("%Y%m%d-%H%M%S")
    for name in names:
        for seed in seeds:
            run_cfg = apply_params(cfg, all_recipes[name])
            run_cfg.train.seed = seed
            run_name = f"quality-{cfg.name}-{stamp}-{name}-s{seed}"  # a new run, never a resumed one
            outcome = fit(run_cfg, manifest, report, run_name)
            ev = evaluate_exported(str(outcome.student_dir), cfg.data.root, "test", cfg.data.eval_clips,
                                   cfg.data.eval_crops, cfg.data.label_mode)
            runs.append({"variant": name, "seed": seed, "val_accuracy": outcome.best_metrics["val_accuracy"],
                         "best_epoch": outcome.best_metrics["epoch"], "test_accuracy": ev["accuracy"],
                         "test_macro_f1": ev["macro_f1"], "test_videos": ev["videos"]})
            say(f"  {name:<10} seed {seed}: val {runs[-1]['val_accuracy']:.3f}  test {ev['accuracy']:.3f}")
    summary = {}
    for name in names:
        acc = [r["test_accuracy"] for r in runs if r["variant"] == name]
        summary[name] = {"test_accuracy_mean": statistics.mean(acc),
                         "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "test_accuracy": acc, "recipe": all_recipes[name]}
    result = {"benchmark": "quality", "config": cfg.name, "recipe_source": source, "seeds": seeds,
              "budget": {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                         "workers": cfg.train.num_workers},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "chance": 1 / len(manifest.labels), "summary": summary, "runs": runs}
    plot(result, str(Path(out).with_suffix(".png")))
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    b = r["budget"]
    lines = [f"test accuracy over seeds {r['seeds']} ({b['epochs']} epochs, batch {b['batch_size']}, lr {b['lr']}, "
             f"{b['workers']} workers; chance {r['chance']:.2f}); distilled recipe from {r['recipe_source']}",
             "| variant | α | β | γ | δ | T | layers | test accuracy (mean ± sd) | per seed |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for name, s in r["summary"].items():
        p = s["recipe"]
        lines.append(f"| {name} | {p['alpha']:.3g} | {p['beta']:.3g} | {p['gamma']:.3g} | {p['delta']:.3g} | "
                     f"{p['temperature']:.2f} | {p['align_layers']} | {s['test_accuracy_mean']:.3f} ± "
                     f"{s['test_accuracy_std']:.3f} | {', '.join(f'{a:.2f}' for a in s['test_accuracy'])} |")
    return "\n".join(lines)


def plot(r: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["summary"])
    means = [r["summary"][n]["test_accuracy_mean"] for n in names]
    sds = [r["summary"][n]["test_accuracy_std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 1, 3.5))
    ax.bar(names, means, yerr=sds, capsize=4, color=["#999999"] + ["#3b75af"] * (len(names) - 1))
    for i, n in enumerate(names):
        ax.scatter([i] * len(r["summary"][n]["test_accuracy"]), r["summary"][n]["test_accuracy"], color="black", s=10,
                   zorder=3)
    ax.axhline(r["chance"], ls="--", color="red", lw=1, label="chance")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test accuracy")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
