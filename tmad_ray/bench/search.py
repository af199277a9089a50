"""``tmad-ray bench search``: trials per hour of the whole system against the reference framework's way.

Same machine, same config, same trials (the recipes the system's own study sampled), one run:

* **system**: ``run_study`` as ``tune.py`` runs it (ASHA off so every trial runs its epochs),
  from a cold clip cache (the one-time decode counts), Ray Train DDP workers, SDPA with attention
  captured at the aligned layers, MLflow tracking; then the same with the frozen-target cache
  (``distill.cache_targets``; its one-time build counts too);
* **reference**: one process per trial, every clip decoded when a step needs it, teacher,
  assistant and student in fp32 with eager attention and ``output_attentions=True`` in every
  block, no clip cache: the way the reference framework trains; with the system's global batch
  (``train.batch_size`` × ``train.num_workers``), so both make the same optimizer steps.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tmad_ray import recipe
from tmad_ray.bench import write_result


def split_accuracy(student, manifest, split: str, eval_spec, n_labels: int) -> float:
    """Multi-view accuracy of an in-memory student on a split, decoding every video (the reference's way)."""
    from tmad_ray.data.clips import decode_views
    from tmad_ray.data.augment import normalize
    from tmad_ray.train import evaluate as ev

    student.eval()
    truth, pred = [], []
    for row in manifest.rows[split]:
        views = decode_views(row.abspath(manifest.root), eval_spec)
        with torch.no_grad():
            pred.append(int(ev.predict_probs(student, normalize(views)).mean(0).argmax()))
        truth.append(manifest.label2id[row.label])
    return ev.metrics_from_confusion(ev.confusion(truth, pred, n_labels), list(range(n_labels)))["accuracy"]


def reference_trial(cfg, manifest, params: dict, say=print, test: bool = False) -> dict:
    """One trial the reference framework's way: its best val accuracy, seconds, the val accuracy of
    every epoch with the time it was known (``history``: (seconds since the trial began, accuracy)),
    and with ``test`` the test accuracy of its best-val epoch's student.

    Long on purpose: the reference framework's trial as that framework writes it, one loop from the
    models to the last epoch; split into helpers it would no longer show what is being compared."""
    from tmad_ray.data.clips import BadVideo, ViewSpec, decode_views
    from tmad_ray.data.augment import augment
    from tmad_ray.distill.trimodel import TriModel
    from tmad_ray.models.hf import load_models
    from tmad_ray.train.worker import cosine_with_warmup, param_groups

    t0 = time.perf_counter()
    run_cfg = recipe.apply(cfg, params)
    t, d = run_cfg.train, run_cfg.data
    torch.manual_seed(t.seed)
    labels = manifest.labels
    models = load_models(run_cfg, labels, ("student", "teacher", "assistant"))
    student, teacher, assistant = models["student"], models["teacher"], models["assistant"]
    for m in (student, teacher, assistant):
        m.set_attn_implementation("eager")
        m.config.output_attentions = True
    tri = TriModel(student, teacher, assistant, run_cfg.distill, labels)
    opt = torch.optim.AdamW(param_groups(tri, t.weight_decay), lr=t.lr)  # as the Trainer the reference uses
    items = [(r, v) for r in manifest.rows["train"] for v in range(d.train_views)]
    # train.batch_size is per worker: one process takes the system's global batch, so that both
    # make the same optimizer steps on the same number of clips (same recipe, same training).
    batch = t.batch_size * t.num_workers
    steps = -(-len(items) // batch) * t.epochs
    sched = cosine_with_warmup(opt, int(t.warmup_ratio * steps), steps)
    spec = dataclasses.replace(ViewSpec.from_config(d, "train"), train_views=1)
    eval_spec = ViewSpec.from_config(d, "eval")
    gen, rng = torch.Generator().manual_seed(t.seed), random.Random(t.seed)
    best, best_state, history = 0.0, None, []
    for epoch in range(1, t.epochs + 1):
        tri.train()
        rng.shuffle(items)
        for i in range(0, len(items), batch):
            clips, ys = [], []
            for row, v in items[i:i + batch]:
                try:  # decoded when the step needs it, as the reference framework does
                    clips.append(decode_views(row.abspath(manifest.root), dataclasses.replace(spec, seed=spec.seed + v))[0])
                except BadVideo:
                    continue
                ys.append(manifest.label2id[row.label])
            x = augment(torch.from_numpy(np.stack(clips)), d.image_size, t.flip, gen)
            out = tri(x, torch.tensor(ys))
            out["loss"].backward()
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(tri.parameters(), t.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        acc = split_accuracy(tri.core.student, manifest, "val", eval_spec, len(labels))
        history.append((time.perf_counter() - t0, acc))
        if acc > best or len(history) == 1:
            best = acc
            if test:  # the best-val epoch's student, scored on test once the trial is over
                best_state = {k: v.detach().clone() for k, v in tri.core.student.state_dict().items()}
    seconds = time.perf_counter() - t0
    out = {"best_val_accuracy": best, "seconds": seconds, "history": history}
    if test:
        tri.core.student.load_state_dict(best_state)
        out["test_accuracy"] = split_accuracy(tri.core.student, manifest, "test", eval_spec, len(labels))
    say(f"  reference trial {params}: best val {best:.3f} in {seconds:.0f} s")
    return out


def bench_config(cfg, trials: int | None, epochs: int | None):
    """The config's study (or ``trials`` of ``epochs``), every trial to its last epoch, with its own
    fresh clip cache, results and MLflow store in a new directory."""
    cfg = cfg.model_copy(deep=True)
    if epochs:
        cfg.train.epochs = epochs
    cfg.search.num_samples = trials or cfg.search.num_samples  # by default the config's own study
    cfg.search.grace_period = cfg.train.epochs  # every trial runs all its epochs, in both systems
    work = Path(tempfile.mkdtemp(prefix="bench_search_", dir=Path(cfg.storage.output_dir).parent
                                 if Path(cfg.storage.output_dir).parent.exists() else None))
    cfg.storage.clip_cache, cfg.storage.ray_results = str(work / "clips"), str(work / "ray_results")
    cfg.storage.output_dir = str(work / "outputs")
    cfg.tracking.tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    return cfg


def run_search_bench(cfg, out: str, trials: int | None = None, epochs: int | None = None, say=print) -> dict:
    """Trials per hour on the same recipes: ``tune.py``'s path from a cold clip cache, the same with the
    frozen-target cache, and the reference framework's way (one process, decoding every step)."""
    import ray

    from tmad_ray.cluster import init_ray, local_trials
    from tmad_ray.study import prepare_study
    from tmad_ray.search.driver import run_study
    from tmad_ray.search.trial import TRIAL_CPU

    cfg = bench_config(cfg, trials, epochs)
    trials = cfg.search.num_samples
    resources = init_ray(cfg, local_trials(cfg), per_run_extra=TRIAL_CPU)  # as many trials at once as tune.py
    torch_threads = torch.get_num_threads()

    t0 = time.perf_counter()
    manifest, report, models = prepare_study(cfg)  # cold: decodes every clip into the fresh cache
    fill_s = time.perf_counter() - t0
    del models
    t0 = time.perf_counter()
    study = run_study(cfg, manifest, report, resources, say=lambda *a: None)
    system_s = fill_s + time.perf_counter() - t0
    recipes = [{k: r[k] for k in recipe.KEYS} for r in study.rows]

    cached_cfg = cfg.model_copy(deep=True)
    cached_cfg.distill.cache_targets = True
    t0 = time.perf_counter()
    manifest, report, models = prepare_study(cached_cfg)  # clip cache warm now: this is the target build
    targets_s = time.perf_counter() - t0
    del models
    t0 = time.perf_counter()
    cached = run_study(cached_cfg, manifest, report, resources, say=lambda *a: None)
    cached_s = fill_s + targets_s + time.perf_counter() - t0
    from tmad_ray.data.cache import ClipCache

    target_mb = ClipCache(cfg.storage.clip_cache).size_bytes("targets") / 2**20

    ray.shutdown()  # the reference runs alone, with the machine's threads
    torch.set_num_threads(os.cpu_count() or torch_threads)
    ref = [reference_trial(cfg, manifest, p, say) for p in recipes]
    ref_s = sum(r["seconds"] for r in ref)

    per_hour = {"system": trials / system_s * 3600, "system_target_cache": trials / cached_s * 3600,
                "reference": trials / ref_s * 3600}
    result = {
        "benchmark": "search", "config": cfg.name, "trials": trials, "epochs": cfg.train.epochs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray_cpus": resources.get("CPU")},
        "seconds": {"system": system_s, "system_clip_cache_fill": fill_s, "system_target_cache": cached_s,
                    "target_cache_build": targets_s, "reference": ref_s},
        "trials_per_hour": per_hour,
        "speedup": {k: per_hour[k] / per_hour["reference"] for k in ("system", "system_target_cache")},
        "target_cache_mb": target_mb,
        "best_val_accuracy": {"system": [r["val_accuracy"] for r in study.rows],
                              "system_target_cache": [r["val_accuracy"] for r in cached.rows],
                              "reference": [r["best_val_accuracy"] for r in ref]},
        "recipes": recipes,
    }
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    s, ph, sp = r["seconds"], r["trials_per_hour"], r["speedup"]
    acc = r["best_val_accuracy"]

    def a(xs):
        return ", ".join(f"{x:.2f}" if x is not None else "-" for x in xs)
    return "\n".join([
        f"{r['trials']} trials x {r['epochs']} epochs of {r['config']!r}, the same recipes in every row; "
        f"{r['machine']['cpus']} CPUs",
        "| system | wall s | trials/hour | vs reference | best val acc per trial |",
        "|---|---:|---:|---:|---|",
        f"| reference: decode per step, fp32, output_attentions everywhere, one process | {s['reference']:.0f} | "
        f"{ph['reference']:.1f} | 1.0× | {a(acc['reference'])} |",
        f"| tmad_ray (clip cache fill {s['system_clip_cache_fill']:.0f} s included) | {s['system']:.0f} | "
        f"{ph['system']:.1f} | {sp['system']:.2f}× | {a(acc['system'])} |",
        f"| tmad_ray + frozen-target cache (build {s['target_cache_build']:.0f} s, {r['target_cache_mb']:.0f} MB, "
        f"included) | {s['system_target_cache']:.0f} | {ph['system_target_cache']:.1f} | "
        f"{sp['system_target_cache']:.2f}× | {a(acc['system_target_cache'])} |",
    ])
