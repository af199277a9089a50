"""Preparing a study (or one training run) on the driver, before any trial starts.

``prepare_study(cfg)``: the embedded dataset generated if the config asks for it, every clip
decoded once into the clip cache (bad videos counted against ``data.max_bad_fraction``), the
teacher, assistant and student loaded and checked for one tokenization, and, with
``distill.cache_targets``, the frozen models' targets computed once. Then ``search_plan`` and
``describe_models`` say in words what will run. ``tmad-ray tune`` / ``tune.py``, ``tmad-ray train``
and the benchmarks all start here.
"""

from __future__ import annotations

import json
from pathlib import Path

from tmad_ray.config import durable_base, in_ray_job_copy
from tmad_ray.errors import UserError
from tmad_ray.recipe import WEIGHTS


def prepare_data(cfg, quiet: bool = False):
    """Generate the embedded dataset if the config asks for it, then fill the clip cache.

    Returns ``(manifest, report)``; the data report is written to ``<output_dir>/data_report.json``.
    """
    import ray

    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.data.pipeline import fill_cache
    from tmad_ray.data.synthetic import ensure_synthetic

    ensure_synthetic(cfg.data)
    manifest = load_manifest(cfg.data.root, cfg.data.label_mode, cfg.data.val_fraction, cfg.data.split_seed)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
    report = fill_cache(manifest, cfg)
    out = Path(cfg.storage.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_report.json").write_text(json.dumps(report.as_dict(), indent=1))
    return manifest, report


def prepare_study(cfg, quiet: bool = False):
    """Data cached once (bad fraction checked), every model loaded and, with ``distill.cache_targets``,
    the frozen models' targets computed once: (manifest, report, models)."""
    from tmad_ray.data.pipeline import check_bad_fraction
    from tmad_ray.models.hf import load_models
    from tmad_ray.models.toyzoo import ensure_toy_zoo

    manifest, report = prepare_data(cfg, quiet)  # quiet: our one decode line instead of Ray Data's progress log
    check_bad_fraction(report, cfg.data.max_bad_fraction)
    ensure_toy_zoo(cfg)
    models = load_models(cfg, manifest.labels)
    if cfg.distill.cache_targets:
        from tmad_ray.distill.targets import build_target_cache

        stats = build_target_cache(cfg, report, {"teacher": models["teacher"], "assistant": models["assistant"]},
                                   models["student"].config.num_hidden_layers, manifest.labels,
                                   workers=cfg.train.num_workers)
        report.targets_key = stats["key"]
    if cfg.search.cohort_size > 1:
        check_cohort_memory(cfg, models)
    return manifest, report, models


class CohortTooBig(UserError):
    pass


def check_cohort_memory(cfg, models: dict) -> int:
    """Refuse a ``search.cohort_size`` whose estimated peak (``train.cohort.peak_bytes``) does not fit a
    training worker: the memory is asked of a task placed as a worker is (its GPU's, or its node's
    available RAM shared by the run's workers there). Returns the estimate in bytes."""
    import ray

    from tmad_ray.train.cohort import largest_fitting, peak_bytes

    t, size = cfg.train, cfg.search.cohort_size
    probe = ray.remote(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0,
                       resources=dict(t.worker_resources) or None)(worker_memory)
    budget = ray.get(probe.remote(t.use_gpu, t.cpus_per_worker, t.num_workers), timeout=300)
    need = peak_bytes(cfg, models, size)
    if need > 0.9 * budget:
        fits = largest_fitting(cfg, models, budget)
        kind = "GPU memory" if t.use_gpu else "RAM"
        raise CohortTooBig(
            f"search.cohort_size {size}: a cohort of {size} students needs about {need / 2**30:.1f} GiB a worker "
            f"(the frozen models once, each student's weights, gradients and AdamW moments, one student's "
            f"activations), and a worker has {budget / 2**30:.1f} GiB of {kind}: "
            + (f"use search.cohort_size {fits} or fewer" if fits else
               "not even one student fits; lower train.batch_size"))
    return need


def worker_memory(use_gpu: bool, cpus_per_worker: float, num_workers: int) -> float:
    """Bytes a training worker has: its GPU's total memory, or its node's available RAM shared by the
    run's workers that fit on the node."""
    import os

    if use_gpu:
        import torch

        return float(torch.cuda.mem_get_info()[1])
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        pass
    sharing = max(1, min(num_workers, int((os.cpu_count() or 1) // max(cpus_per_worker, 1e-9))))
    return available / sharing


def search_plan(cfg, manifest, report) -> str:
    """What a study of this config will run, in words."""
    from tmad_ray.tracking import redact, resolve_tracking_uri

    s, t, d = cfg.search, cfg.train, cfg.distill
    split_sizes = ", ".join(f"{k} {len(v)}" for k, v in manifest.rows.items())
    space = ", ".join(f"{k} {getattr(s, k)} (log)" for k in WEIGHTS)
    lines = [
        f"study {cfg.name!r}",
        f"  data      {manifest.root}: {split_sizes}; labels {manifest.labels}",
        f"  clips     {report.decoded} videos decoded, {report.reused} reused, {len(report.bad)} bad; "
        f"cache {report.cache}",
        f"  search    {s.num_samples} trials, {s.algorithm.upper()} (seed {s.seed}), "
        f"ASHA on epoch (grace {s.grace_period}, reduction {s.reduction_factor:g}, max {t.epochs}) "
        f"-> {s.mode} {s.metric}",
        f"  space     {space}, temperature {s.temperature}, layer sets {s.align_layer_sets}"
        + (f", lr {s.lr} (log)" if s.lr else ""),
        f"  trial     {t.num_workers} DDP workers x {t.cpus_per_worker:g} CPU{' + 1 GPU' if t.use_gpu else ''}"
        f"{''.join(f' + {v:g} {k}' for k, v in t.worker_resources.items())}, "
        f"{t.epochs} epochs, batch {t.batch_size}; defaults alpha={d.alpha} beta={d.beta} gamma={d.gamma} "
        f"delta={d.delta} T={d.temperature} layers={d.align_layers}",
        *([f"  cohorts   up to {s.cohort_size} students trained side by side in one Ray Train run (the batches and "
             f"the frozen forwards shared); a cohort starts {s.cohort_wait_s:g} s after the last trial joined"]
          if s.cohort_size > 1 else []),
        f"  tracking  {redact(resolve_tracking_uri(cfg.tracking))} (experiment {cfg.tracking.experiment!r})",
        f"  outputs   {cfg.storage.output_dir}; checkpoints {redact(cfg.storage.ray_results)}",
    ]
    if in_ray_job_copy(Path.cwd()):
        lines.append(f"            (in Ray's temporary copy of the job's working directory: relative paths of what the "
                     f"study writes are under {durable_base(Path.cwd())}, $TMAD_RAY_HOME)")
    return "\n".join(lines)


def describe_models(models: dict) -> str:
    """One line per model: class, depth x width, heads, parameters, head."""
    lines = []
    for role, m in models.items():
        conf = m.config
        head = f"{conf.num_labels} classes" if hasattr(m, "classifier") else "no classifier (features only)"
        if getattr(m, "reinitialized", None):
            head += (f"; pretrained from {conf.name_or_path}, new {' + '.join(m.reinitialized)} for these labels "
                     "(initialized at random, trained from here)")
        elif role == "student":
            head += "; from scratch (no pretrained weights: models.student gives a size, not a name)"
        lines.append(f"  {role:<9} {type(m).__name__}: {conf.num_hidden_layers} blocks x {conf.hidden_size} wide, "
                     f"{conf.num_attention_heads} heads, {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M params, "
                     f"{head}")
    return "\n".join(lines)
