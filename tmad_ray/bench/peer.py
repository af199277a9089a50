"""``tmad-ray bench peer``: tmad_ray against the pipeline a user would write instead.

The peer is a plain Hugging Face ``Trainer`` with a custom ``compute_loss`` (the reference
framework's own shape) and ``trainer.hyperparameter_search(backend="optuna")``: no Ray, no clip
cache, a ``Dataset`` that decodes each item with decord when the loader asks for it (a fresh
random clip start, crop and flip every time, 2 loader workers), the same toy-zoo models, the same
``TriModel`` and losses, the same search space, sampler (TPE, the same seed and start-up trials),
epochs, global batch, lr, weight decay (HF's no-decay group for biases and norms), warm-up +
cosine schedule and gradient clipping, and Optuna's ``MedianPruner`` at the config's grace period.
Its val accuracy is measured the way tmad_ray measures it (every eval view of every val video).

For every seed (``search.seed`` and ``train.seed``), on the same config and machine, each side is
timed from its own start with the same clock (``time.time``): the peer from before its ``Trainer``
is built, tmad_ray from before Ray starts (``tune.py``'s path: Ray, study preparation with a cold
clip cache, Tune with TPE + ASHA). From each side's best-val-so-far curve: the time each first
reaches fixed targets (the peer's best val, 95 % of it, the teacher's test accuracy) and the ratio
peer / tmad_ray (> 1: tmad_ray is faster); each side's chosen student (its best val epoch) scored
on **test**; and per recipe that both sides trained (TPE's start-up trials coincide), the paired
difference of their best val accuracies with a 95 % t interval.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tmad_ray import recipe
from tmad_ray.bench import seed_facts, write_result
from tmad_ray.bench.time_to_quality import best_so_far, ratio_of, run_tmad_ray, teacher_test_accuracy, time_to_reach
from tmad_ray.plots import save_figure


class ClipDataset(torch.utils.data.Dataset):
    """The train split as a user's ``Dataset``: ``data.train_views`` items per video (tmad_ray's clips
    per video and epoch, so both make the same optimizer steps), each decoded when asked with a random
    clip start (``data.sampling``), a random ``image_size`` crop of the ``train_short_side`` square and
    a flip, fresh at every epoch. ``{"pixel_values": float [T,3,S,S], "labels": int64}``.

    Randomness comes from torch's generator, which the ``DataLoader`` seeds per worker and epoch
    (from the Trainer's seed), so a run is reproducible and every epoch draws anew."""

    def __init__(self, manifest, data_cfg, flip: bool):
        from tmad_ray.data.clips import ViewSpec

        self.rows, self.root, self.label2id = manifest.rows["train"], manifest.root, manifest.label2id
        self.views = data_cfg.train_views
        self.spec = dataclasses.replace(ViewSpec.from_config(data_cfg, "train"), train_views=1)
        self.size, self.flip = data_cfg.image_size, flip

    def __len__(self) -> int:
        return len(self.rows) * self.views

    def __getitem__(self, i: int) -> dict:
        from tmad_ray.data.augment import augment
        from tmad_ray.data.clips import decode_views

        row = self.rows[i // self.views]
        seed = int(torch.randint(0, 2**31 - 1, ()))
        clip = decode_views(row.abspath(self.root), dataclasses.replace(self.spec, seed=seed))  # [1,T,S',S',3]
        gen = torch.Generator().manual_seed(seed)
        x = augment(torch.from_numpy(clip), self.size, self.flip, gen)[0]
        return {"pixel_values": x, "labels": torch.tensor(self.label2id[row.label])}


class Recorder:
    """Every evaluation of the peer's study: (seconds since ``t0``, trial, val accuracy), each trial's
    best, and the student state of the best val so far (kept in memory, as ``load_best_model_at_end``)."""

    def __init__(self, t0: float):
        self.t0, self.points, self.trials, self.best, self.best_state = t0, [], {}, -1.0, None
        self.built: list[dict] = []  # the recipe each model was built with (model_init), in order

    def add(self, trial: int, params: dict, acc: float, student) -> None:
        self.points.append((time.time() - self.t0, acc))
        t = self.trials.setdefault(trial, {"trial_number": trial, "params": params, "best_val_accuracy": acc,
                                           "epochs": 0})
        t["epochs"] += 1
        t["best_val_accuracy"] = max(t["best_val_accuracy"], acc)
        if acc > self.best:
            self.best, self.best_trial = acc, trial
            self.best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}


def run_hf_trainer(cfg, say=print) -> dict:
    """The peer's whole study on ``cfg``: an HF ``Trainer`` + Optuna, timed from before the Trainer.

    Long on purpose: the pipeline as a user writes it, one function from the data to the search;
    split into helpers it would no longer show what tmad_ray is compared with."""
    import optuna
    from transformers import Trainer, TrainingArguments

    from tmad_ray.bench.search import split_accuracy
    from tmad_ray.data.clips import ViewSpec
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.distill.trimodel import TriModel
    from tmad_ray.models.hf import load_models
    from tmad_ray.search.searcher import startup_trials

    t, d, s = cfg.train, cfg.data, cfg.search
    t0 = time.time()
    manifest = load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed)
    labels, eval_spec = manifest.labels, ViewSpec.from_config(d, "eval")
    rec = Recorder(t0)
    bounds = recipe.bounds_of(s)

    def hp_space(trial) -> dict:
        recipe.define_space(bounds, trial)
        return {}  # the recipe reaches the model through model_init, not TrainingArguments

    def model_init(trial=None):
        # transformers 5 builds the trial's model before it calls hp_space: sample the recipe here
        # (Optuna returns the same values when hp_space asks again), or every trial trains the config's
        if trial is not None:
            recipe.define_space(bounds, trial)
        params = dict(trial.params) if trial is not None else {}
        rec.built.append(params)
        run_cfg = recipe.apply(cfg, params)  # the Trainer seeds (args.seed) before it calls model_init
        models = load_models(run_cfg, labels, ("student", "teacher", "assistant"))
        return TriModel(models["student"], models["teacher"], models["assistant"], run_cfg.distill, labels)

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(inputs["pixel_values"], inputs["labels"])
            return (out["loss"], out) if return_outputs else out["loss"]

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            student = self.model.core.student
            acc = split_accuracy(student, manifest, "val", eval_spec, len(labels))
            trial = self._trial
            rec.add(trial.number if trial is not None else -1, dict(trial.params) if trial is not None else {},
                    acc, student)
            metrics = {f"{metric_key_prefix}_accuracy": acc}
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    batch = t.batch_size * t.num_workers  # tmad_ray's global batch: the same optimizer steps
    train_set = ClipDataset(manifest, d, t.flip)
    steps_per_epoch = math.ceil(len(train_set) / batch)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="peer_"), num_train_epochs=t.epochs, per_device_train_batch_size=batch,
        learning_rate=t.lr, weight_decay=t.weight_decay, lr_scheduler_type="cosine", warmup_steps=t.warmup_ratio,
        max_grad_norm=t.grad_clip or 0.0, eval_strategy="epoch", save_strategy="no", logging_strategy="no",
        report_to="none", use_cpu=True, dataloader_num_workers=2, remove_unused_columns=False, disable_tqdm=True,
        seed=t.seed)
    # eval_dataset only switches on the per-epoch evaluation; evaluate() reads the val split itself
    trainer = DistillTrainer(model_init=model_init, args=args, train_dataset=train_set, eval_dataset=train_set)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best_run = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m["eval_accuracy"], n_trials=s.num_samples,
        direction="maximize", backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=startup_trials(s)),
        pruner=optuna.pruners.MedianPruner(n_warmup_steps=s.grace_period * steps_per_epoch))
    seconds = time.time() - t0
    # the chosen student: the best val epoch of the study (not counted in the time, as on tmad_ray's side)
    student = model_init().core.student
    student.load_state_dict(rec.best_state)
    test = split_accuracy(student, manifest, "test", eval_spec, len(labels))
    trials = [rec.trials[k] for k in sorted(rec.trials)]
    chosen = rec.trials[rec.best_trial]["params"]
    say(f"  hf_trainer seed {s.seed}: {seconds:.0f} s, best val {rec.best:.3f} (trial #{rec.best_trial}), "
        f"test {test:.3f}; {sum(x['epochs'] for x in trials)} epochs in all; Optuna's best run #{best_run.run_id}")
    return {"seconds": seconds, "epochs": sorted(rec.points), "curve": best_so_far(rec.points),
            "best_val_accuracy": rec.best, "chosen": chosen, "test_accuracy": test,
            "epochs_trained": sum(x["epochs"] for x in trials), "trials": trials, "built_with": rec.built}


def same_recipe(a: dict, b: dict) -> bool:
    return all((a[k] == b[k]) if isinstance(a[k], str) else math.isclose(a[k], b[k], rel_tol=1e-9)
               for k in recipe.KEYS)


def recipe_pairs(run: dict) -> list[dict]:
    """Per recipe both sides trained: its best val accuracy on each side (tmad_ray's trial may have
    been stopped early by ASHA, the peer's by the median rule: each as the user gets it)."""
    pairs = []
    for tm in run["tmad_ray"]["trials"]:
        for hf in run["hf_trainer"]["trials"]:
            if same_recipe(tm["params"], hf["params"]):
                pairs.append({"recipe": {k: tm["params"][k] for k in recipe.KEYS},
                              "hf_trainer": hf["best_val_accuracy"], "tmad_ray": tm["best_val_accuracy"],
                              "hf_epochs": hf["epochs"], "tmad_ray_epochs": tm["epochs"]})
                break
    return pairs


def mean_ci(xs: list[float]) -> dict:
    """Mean and 95 % t interval (``ci95`` None with fewer than 2 values), as the quality benchmark's."""
    from tmad_ray.bench.quality import t_interval

    if not xs:
        return {"mean": None, "ci95": None, "n": 0}
    m, ci = t_interval(xs)
    return {"mean": m, "ci95": ci, "n": len(xs)}


def summarize(cfg, runs: list[dict], teacher_test: float | None) -> dict:
    for run in runs:
        targets = {"hf_trainer_best": run["hf_trainer"]["best_val_accuracy"],
                   "95%_of_hf_trainer_best": 0.95 * run["hf_trainer"]["best_val_accuracy"]}
        if teacher_test is not None:
            targets["teacher_test_accuracy"] = teacher_test
        run["time_to_target"] = []
        for name, target in targets.items():
            h = time_to_reach(run["hf_trainer"]["curve"], target)
            m = time_to_reach(run["tmad_ray"]["curve"], target)
            run["time_to_target"].append({"target": name, "value": target, "hf_trainer_s": h, "tmad_ray_s": m,
                                          "ratio": ratio_of(h, m)})
        run["recipe_pairs"] = recipe_pairs(run)
    rows = []
    for i, first in enumerate(runs[0]["time_to_target"] if runs else []):
        per = [r["time_to_target"][i] for r in runs]
        ratios = [x["ratio"] for x in per if x["ratio"] is not None]
        rows.append({"target": first["target"], "hf_trainer_s": [x["hf_trainer_s"] for x in per],
                     "tmad_ray_s": [x["tmad_ray_s"] for x in per], "ratio": [x["ratio"] for x in per],
                     "median_ratio": statistics.median(ratios) if ratios else None,
                     "neither_reached": len(per) - len(ratios)})
    diffs = [p["tmad_ray"] - p["hf_trainer"] for r in runs for p in r["recipe_pairs"]]
    s = cfg.search
    return {
        "benchmark": "peer", "config": cfg.name, "seeds": [r["seed"] for r in runs],
        "budget": {"trials": s.num_samples, "epochs": cfg.train.epochs, "grace_period": s.grace_period,
                   "batch_size": cfg.train.batch_size * cfg.train.num_workers},
        "teacher_test_accuracy": teacher_test, "runs": runs,
        "summary": {
            "time_to_target": rows,
            "recipe_parity": {"pairs": len(diffs), "tmad_ray_minus_hf_best_val": mean_ci(diffs)},
            "test_accuracy": {side: mean_ci([r[side]["test_accuracy"] for r in runs]) for side in ("hf_trainer", "tmad_ray")},
            "test_diff": mean_ci([r["tmad_ray"]["test_accuracy"] - r["hf_trainer"]["test_accuracy"] for r in runs]),
            "best_val": {side: mean_ci([r[side]["best_val_accuracy"] for r in runs]) for side in ("hf_trainer", "tmad_ray")},
            "seconds": {side: mean_ci([r[side]["seconds"] for r in runs]) for side in ("hf_trainer", "tmad_ray")},
        },
    }


def run_peer_bench(cfg, out: str, seeds: list[int], say=print) -> dict:
    """Both pipelines for every seed, one after the other on a quiet machine (the peer alone with the
    machine's threads, tmad_ray with its own Ray started and stopped inside its clock). The JSON, table
    and plot are rewritten after every seed, so a benchmark cut short keeps the seeds it finished."""
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.data.synthetic import ensure_synthetic
    from tmad_ray.models.toyzoo import ensure_toy_zoo

    work = Path(tempfile.mkdtemp(prefix="bench_peer_"))
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
        # the same recipes on both sides: TPE's from the seed (the HF pipeline has no enqueued first points)
        scfg.search.points_to_evaluate = []
        torch.set_num_threads(os.cpu_count() or threads)
        hf = run_hf_trainer(scfg, say)
        torch.set_num_threads(threads)
        tm = run_tmad_ray(scfg, work / f"seed{seed}", say, own_ray=True)
        runs.append({"seed": seed, "hf_trainer": hf, "tmad_ray": tm})
        result = summarize(cfg, runs, teacher)
        result.update(seed_facts(manifest, t_start, seeds))
        plot(result, str(Path(out).with_suffix(".png")))
        write_result(result, out, format_table(result))
    return result


def _fmt_s(x):
    return "never" if x is None else f"{x:.0f} s"


def _fmt_ratio(x):
    return "-" if x is None else ("∞" if x == math.inf else f"{x:.2f}×")


def _fmt_ci(c: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    if c["mean"] is None:
        return "-"
    return f.format(c["mean"]) + ("" if c["ci95"] is None else f" [{f.format(c['ci95'][0])}, {f.format(c['ci95'][1])}]")


def format_table(r: dict) -> str:
    b, s = r["budget"], r["summary"]
    lines = [f"{b['trials']} trials × up to {b['epochs']} epochs of {r['config']!r}, global batch {b['batch_size']}, "
             f"grace {b['grace_period']} epochs (ASHA for tmad_ray, MedianPruner for the HF Trainer); seeds "
             f"{r['seeds']}; {r['videos']['train']} train, {r['videos']['val']} val, {r['videos']['test']} test videos "
             f"(chance {r['chance']:.2f}); {r['machine']['cpus']} CPUs; the benchmark took {r['benchmark_minutes']:.0f} min",
             "| seed | HF Trainer: wall s | best val | test (chosen) | tmad_ray: wall s | best val | test (chosen) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for run in r["runs"]:
        h, t = run["hf_trainer"], run["tmad_ray"]
        lines.append(f"| {run['seed']} | {h['seconds']:.0f} | {h['best_val_accuracy']:.3f} | {h['test_accuracy']:.3f} | "
                     f"{t['seconds']:.0f} | {t['best_val_accuracy']:.3f} | {t['test_accuracy']:.3f} |")
    lines += ["", "| target (val accuracy) | HF Trainer: time to first reach, per seed | tmad_ray | ratio (HF / tmad_ray) "
              "| median ratio |", "|---|---|---|---|---:|"]
    for row in s["time_to_target"]:
        lines.append(f"| {row['target']} | {', '.join(map(_fmt_s, row['hf_trainer_s']))} | "
                     f"{', '.join(map(_fmt_s, row['tmad_ray_s']))} | {', '.join(map(_fmt_ratio, row['ratio']))} | "
                     f"{_fmt_ratio(row['median_ratio'])} |")
    p = s["recipe_parity"]
    lines += ["", f"Same recipe and seed on both sides ({p['pairs']} pairs): tmad_ray − HF best val "
              f"{_fmt_ci(p['tmad_ray_minus_hf_best_val'], True)} (mean, 95 % CI)",
              f"Chosen student on test: HF {_fmt_ci(s['test_accuracy']['hf_trainer'])}, tmad_ray "
              f"{_fmt_ci(s['test_accuracy']['tmad_ray'])}; paired difference {_fmt_ci(s['test_diff'], True)}"]
    return "\n".join(lines)


def plot(r: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(r["runs"]):
        for side, color, name in (("hf_trainer", "#999999", "HF Trainer + Optuna"), ("tmad_ray", "#3b75af", "tmad_ray (tune.py)")):
            c = run[side]["curve"]
            xs = [x / 60 for x, _ in c] + [run[side]["seconds"] / 60]
            ys = [v for _, v in c] + [c[-1][1]]
            ax.step(xs, ys, where="post", color=color, alpha=0.85, lw=1.5, label=name if i == 0 else None)
    ax.axhline(r["chance"], ls="--", color="red", lw=1, label="chance")
    ax.set_xlabel("wall time (minutes)")
    ax.set_ylabel("best validation accuracy so far")
    ax.set_ylim(0, 1)
    ax.set_title(f"{r['config']}: {len(r['runs'])} seeds, each side from its own start")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
