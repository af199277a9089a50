"""``tmad-ray bench data``: clips/s of three ways to feed training, on the same videos, in one run.

(a) per-step decode in one process, the reference framework's way: every training clip is
    decoded (open, sample, decode, resize) when it is needed, one after the other;
(b) the Ray Data decode into the clip cache, with every CPU Ray has (cold: a fresh cache,
    actor start-up included);
(c) reading the clip cache back through Ray Data, as a training epoch does (one pass; its
    start-up, Ray Data planning and task launch, is included and also reported on its own), and
    as a reference the same entries read by pyarrow in one process.

The videos are synthetic (``tmad-ray synth``) at a realistic size; the decode parameters are the
config's train views.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tmad_ray.bench import write_result
from tmad_ray.data.cache import ClipCache, clips_from_batch
from tmad_ray.data.clips import ViewSpec, decode_views
from tmad_ray.data.manifest import load_manifest
from tmad_ray.data.pipeline import clip_dataset, fill_cache
from tmad_ray.data.synthetic import make_dataset


def _per_step_decode(manifest, spec: ViewSpec) -> tuple[int, float]:
    one = dataclasses.replace(spec, train_views=1)
    n, t0 = 0, time.perf_counter()
    for row in manifest.rows["train"]:
        for v in range(spec.train_views):
            decode_views(row.abspath(manifest.root), dataclasses.replace(one, seed=spec.seed + v))
            n += 1
    return n, time.perf_counter() - t0


def _read_cache(manifest, report, cfg, batch_size: int = 8) -> tuple[int, float, float]:
    """One pass over the cached train clips as an epoch makes it: (clips, seconds, seconds to the first batch)."""
    ds = clip_dataset(manifest, report, cfg, "train")
    n, first, t0 = 0, None, time.perf_counter()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(clips_from_batch(batch))
        if first is None:
            first = time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


def run_data_bench(cfg, out: str, videos_per_class: int = 24, size: str = "240x320", frames: int = 64) -> dict:
    import ray

    videos = Path(cfg.storage.output_dir) / "bench_videos" / f"{size}_{frames}f_{videos_per_class}"
    make_dataset(videos, seed=0, videos_per_class=videos_per_class, size=size, frames=frames)
    cfg = cfg.model_copy(deep=True)
    cfg.data.root, cfg.data.synthetic = str(videos), None
    manifest = load_manifest(videos)
    spec = ViewSpec.from_config(cfg.data, "train")

    n_a, t_a = _per_step_decode(manifest, spec)

    from tmad_ray.cluster import init_ray

    init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cache_dir = tempfile.mkdtemp(prefix="bench_cache_", dir=cfg.storage.output_dir)
    try:
        cfg.storage.clip_cache = cache_dir
        report = fill_cache(manifest, cfg, splits=("train",))
        if report.bad:
            raise RuntimeError(f"benchmark videos failed to decode: {report.bad[:3]}")
        _read_cache(manifest, report, cfg)  # warm-up: the first pass starts Ray Data's workers
        n_c, t_c, first_c = _read_cache(manifest, report, cfg)
        # Reference for (c): the same entries read by pyarrow in this process, without Ray Data.
        cache, t0 = ClipCache(cache_dir), time.perf_counter()
        n_d = sum(len(cache.read_clips(key)[1]) for key in report.entries["train"].values())
        t_d = time.perf_counter() - t0
        cache_bytes = ClipCache(cache_dir).size_bytes()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    a, b, c = n_a / t_a, report.clips_per_s, n_c / t_c
    result = {
        "benchmark": "data",
        "machine": {"cpus": os.cpu_count(), "ray_cpus": ray.cluster_resources().get("CPU"),
                    "platform": platform.platform(), "processor": platform.processor()},
        "videos": {"count": len(manifest.rows["train"]), "size": size, "frames": frames, "codec": "h264"},
        "decode": {k: getattr(spec, k) for k in ("num_frames", "sampling", "sampling_rate", "train_short_side",
                                                 "train_views")},
        "clips_per_s": {"a_per_step_decode": round(a, 2), "b_ray_data_decode": round(b, 2),
                        "c_clip_cache_read": round(c, 2), "pyarrow_direct_read": round(n_d / t_d, 2)},
        "speedup_vs_a": {"b": round(b / a, 2), "c": round(c / a, 2)},
        "c_first_batch_s": round(first_c, 3),
        "clips": {"a": n_a, "b": report.clips_written, "c": n_c},
        "cache_mb": round(cache_bytes / 2**20, 1),
    }
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    cps, sp = r["clips_per_s"], r["speedup_vs_a"]
    v, d = r["videos"], r["decode"]
    lines = [
        f"{v['count']} videos {v['size']} x {v['frames']} frames (H.264); train views: {d['train_views']} x "
        f"{d['num_frames']} frames ({d['sampling']}, rate {d['sampling_rate']}), {d['train_short_side']}² px; "
        f"{r['machine']['cpus']} CPUs",
        "| path | clips/s | vs (a) |",
        "|---|---:|---:|",
        f"| (a) decode per step, one process (reference) | {cps['a_per_step_decode']:.1f} | 1.0× |",
        f"| (b) Ray Data decode into the clip cache, all CPUs | {cps['b_ray_data_decode']:.1f} | {sp['b']:.1f}× |",
        f"| (c) read the clip cache (Ray Data; {r['clips']['c']} clips, first batch after "
        f"{r['c_first_batch_s']:.2f} s) | {cps['c_clip_cache_read']:.1f} | {sp['c']:.1f}× |",
        f"| (c, reference) the same entries read by pyarrow in one process, no Ray Data "
        f"| {cps['pyarrow_direct_read']:.1f} | {cps['pyarrow_direct_read'] / cps['a_per_step_decode']:.1f}× |",
        f"clip cache: {r['cache_mb']} MB for {r['clips']['b']} clips",
    ]
    return "\n".join(lines)
