"""``tmad-ray bench step``: time of one training step (forward + backward + AdamW) per variant.

Variants, all on the config's clip shape and batch size, models with random weights (timing does
not depend on the weights; nothing is downloaded):

* ``student``: the student alone, cross-entropy only;
* ``forwards``: student step plus the teacher's and assistant's forwards, no distillation terms
  (what the losses cost is the difference to the next one);
* ``tri``: the tri-model with β and δ (features, relations, logit KD) and no attention term;
* ``tri+attn@k``: the same plus attention distillation at k aligned layers, captured by hooks;
* ``tri+attn@k, output_attentions``: the same, but every model switched to eager attention with
  ``output_attentions=True`` in every block, the way the reference framework gets attention maps.

Each variant runs in a fresh process, so its peak memory is its own: on CUDA the peak allocated
by torch, on CPU the process's peak RSS (models, warm-up and steps).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from tmad_ray.bench import in_fresh_process, write_result

REAL_ARCH = {"vit-s": (12, 384, 6), "vit-b": (12, 768, 12)}


def _arch(cfg, role: str) -> tuple[int, int, int]:
    """Depth, width, heads of a frozen model: the toy zoo's for the embedded default, else ViT-B / ViT-S."""
    from tmad_ray.models.toyzoo import ASSISTANT_ARCH, TEACHER_ARCH

    if cfg.models.toy_zoo is not None:
        a = TEACHER_ARCH if role == "teacher" else ASSISTANT_ARCH
        return a["depth"], a["width"], a["heads"]
    return REAL_ARCH["vit-b" if role == "teacher" else (cfg.models.assistant.arch or "vit-s")]


def student_shape(cfg) -> tuple[tuple[int, int, int], dict]:
    """(depth, width, heads) and tokenization (patch, tubelet) of the config's student: a preset or
    explicit size as given; a pretrained one from its ``config.json``, or from the toy zoo's plan
    before the zoo is built. Step timings need the shapes only, never the weights."""
    from tmad_ray.models.hf import STUDENT_PRESETS

    s, z = cfg.models.student, cfg.models.toy_zoo
    if s.name is None:
        arch = STUDENT_PRESETS[s.size] if s.size else (s.depth, s.width, s.heads)
        return arch, {"patch_size": s.patch_size, "tubelet_size": s.tubelet_size}
    if z is not None and z.student is not None and Path(s.name) == Path(z.dir) / "student":
        return ((z.student.depth, z.student.width, z.student.heads),
                {"patch_size": z.patch_size, "tubelet_size": z.tubelet_size})
    from transformers import VideoMAEConfig

    c = VideoMAEConfig.from_pretrained(s.name)
    return ((c.num_hidden_layers, c.hidden_size, c.num_attention_heads),
            {"patch_size": c.patch_size, "tubelet_size": c.tubelet_size})


def build_models(cfg, labels: list[str], seed: int = 0, teacher_arch=None, assistant_arch=None):
    """Random-weight student / teacher / assistant with the config's tokenization."""
    from transformers import VideoMAEForVideoClassification

    from tmad_ray.models.hf import video_config

    d = cfg.data
    student_arch, patch = student_shape(cfg)
    tok = dict(image_size=d.image_size, num_frames=d.num_frames, **patch)
    torch.manual_seed(seed)
    student = VideoMAEForVideoClassification(video_config(*student_arch, labels=labels, **tok))
    teacher = VideoMAEForVideoClassification(video_config(*(teacher_arch or _arch(cfg, "teacher")), labels=labels, **tok))
    assistant = VideoMAEForVideoClassification(
        video_config(*(assistant_arch or _arch(cfg, "assistant")), labels=[f"m{i}" for i in range(174)], **tok))
    return student, teacher, assistant


def _variant_distill(cfg, variant: dict):
    d = cfg.distill.model_copy()
    d.alpha = 1.0
    d.beta, d.delta = (0.0, 0.0) if variant["kind"] in ("student", "forwards") else (1.0, 1.0)
    d.gamma = 1.0 if variant.get("attn_layers") else 0.0
    if variant.get("attn_layers"):
        d.align_layers = list(range(-1, -variant["attn_layers"] - 1, -1))
    return d


def _run_variant(cfg_dict: dict, variant: dict, steps: int, warmup: int, threads: int, queue) -> None:
    from tmad_ray.config import config_from_dict
    from tmad_ray.distill.trimodel import TriModel

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    labels = ["A", "B1", "B2", "G"]
    student, teacher, assistant = build_models(cfg, labels, teacher_arch=variant.get("teacher_arch"),
                                               assistant_arch=variant.get("assistant_arch"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if variant.get("output_attentions"):
        for m in (student, teacher, assistant):
            m.set_attn_implementation("eager")
            m.config.output_attentions = True
    d = _variant_distill(cfg, variant)
    tri = TriModel(student, None if variant["kind"] == "student" else teacher,
                   None if variant["kind"] == "student" else assistant, d, labels)
    tri.trainable.to(device)
    tri.frozen_to(device)
    if variant["kind"] == "forwards":
        extra = [teacher.to(device).eval().requires_grad_(False), assistant.to(device).eval().requires_grad_(False)]
    else:
        extra = []
    opt = torch.optim.AdamW(tri.parameters(), lr=1e-4)
    b, shape = cfg.train.batch_size, (cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
    x = torch.randn(b, *shape, device=device)
    y = torch.randint(0, len(labels), (b,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    cached, query = None, None
    if variant.get("cached"):  # the frozen-target cache: targets read, not computed (made once here)
        cached, query = _cached_targets(tri, x, d)
        for f in tri.frozen.values():  # nothing of the frozen models stays on the device
            f.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def step():
        with autocast:
            for m in extra:
                with torch.no_grad():
                    m(pixel_values=x)
            out = tri(x, y, cached=cached, query_idx=query)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, peak_mb, rss0 = _time_steps(step, steps, warmup, device)
    queue.put({"name": variant["name"], "ms": statistics.median(times) * 1e3,
               "ms_min": min(times) * 1e3, "clips_per_s": b / statistics.median(times), "peak_mb": peak_mb,
               "rss_before_steps_mb": rss0 / 1024, "device": device.type})


def _time_steps(step, steps: int, warmup: int, device) -> tuple[list[float], float, int]:
    """Run ``step`` ``warmup`` times, then time ``steps`` of it: (seconds per step, peak MB, peak RSS
    in KiB before the timed steps)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the warm-up steps already reached the step's peak
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return times, peak_mb, rss0


def _cached_targets(tri, x, d) -> tuple[dict, torch.Tensor | None]:
    """Targets shaped as ``targets.TargetReader`` returns them, from one real forward of each frozen model."""
    from tmad_ray.distill.trimodel import frozen_targets
    from tmad_ray.distill.trimodel import token_grid

    grid = token_grid(tri.core.student.config)
    n = grid[0] * grid[1] * grid[2]
    query = None
    if d.attn_query_tokens and d.attn_query_tokens < n:
        query = torch.stack([torch.randperm(n, device=x.device)[:d.attn_query_tokens] for _ in range(len(x))])
    cached = {}
    for name, f in tri.frozen.items():
        layers = sorted(set(f.layers) | {f.last})
        t = frozen_targets(f.model, x, layers, grid, d.asym_time or grid[0], d.asym_space, tri.needs.attn, query,
                           f.teaches_logits)
        cached[name] = {k: ({j: v.float() for j, v in val.items()} if isinstance(val, dict) else val.float())
                        for k, val in t.items()}
    return cached, query


def variants(cfg, attn_ks: list[int]) -> list[dict]:
    out = [{"name": "student", "kind": "student"}, {"name": "forwards", "kind": "forwards"},
           {"name": "tri", "kind": "tri"}]
    out += [{"name": f"tri+attn@{k}", "kind": "tri", "attn_layers": k} for k in attn_ks]
    k = attn_ks[min(1, len(attn_ks) - 1)]
    out.append({"name": f"tri+attn@{k}, output_attentions", "kind": "tri", "attn_layers": k, "output_attentions": True})
    return out


def run_step_bench(cfg, out: str, steps: int = 10, warmup: int = 2, attn_ks: list[int] | None = None,
                   threads: int | None = None) -> dict:
    (depth, _, _), patch = student_shape(cfg)
    attn_ks = attn_ks or sorted({1, min(2, depth), depth})
    for k in attn_ks:
        if not 1 <= k <= depth:
            raise ValueError(f"--attn-layers {k}: the student has {depth} blocks")
    threads = threads or torch.get_num_threads()
    rows = []
    for v in variants(cfg, attn_ks):
        rows.append(in_fresh_process(_run_variant, (cfg.model_dump(), v, steps, warmup, threads),
                                     f"bench step: variant {v['name']}"))
        print(f"  {rows[-1]['name']:<34} {rows[-1]['ms']:8.1f} ms  {rows[-1]['peak_mb']:8.0f} MB", flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["vs_student"] = r["ms"] / base
    (sd, sw, sh), patch = student_shape(cfg)
    result = {
        "benchmark": "step",
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
                    "device": rows[0]["device"],
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "shape": {"batch": cfg.train.batch_size, "frames": cfg.data.num_frames, "image": cfg.data.image_size,
                  "patch": patch["patch_size"], "tubelet": patch["tubelet_size"]},
        "models": {"student": f"{sd}x{sw}x{sh}",
                   "teacher": "x".join(map(str, _arch(cfg, "teacher"))),
                   "assistant": "x".join(map(str, _arch(cfg, "assistant")))},
        "steps": steps, "rows": rows,
    }
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    s, m = r["shape"], r["models"]
    lines = [
        f"batch {s['batch']} x {s['frames']}x{s['image']}² (patch {s['patch']}, tubelet {s['tubelet']}); student "
        f"{m['student']}, teacher {m['teacher']}, assistant {m['assistant']} (depth x width x heads); "
        f"{r['machine']['device']}, {r['machine']['torch_threads']} threads; median of {r['steps']} steps",
        "| variant | step ms | clips/s | vs student | peak MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['name']} | {row['ms']:.1f} | {row['clips_per_s']:.1f} | {row['vs_student']:.2f}× "
                     f"| {row['peak_mb']:.0f} |")
    return "\n".join(lines)
