"""``tmad-ray bench cohort``: what a training step costs a cohort of K students, for K = 1, 2, 4, 8.

On each shape (the embedded default's, and the rehearsal's: ViT-B teacher, ViT-S assistant and
student, 16×224², batch 2 a worker), models with random weights (timing does not depend on them;
nothing is downloaded), one batch; K students with the config's kind of recipe (every term on,
the layer sets of the search in turn). A step is what ``train.cohort_loop`` runs per micro-batch:
the shared teacher and assistant forwards once (``shared_targets``), then each student's forward,
backward and AdamW step. Each K runs in a fresh process, so its peak memory (CUDA's peak allocation,
else the process's peak RSS) is its own.

Reported per K: the cohort's step, the same K students' steps one after another as trials alone
(each with its own frozen forwards; in the same process, after the cohort's), their ratio, the
frozen forwards' share of the cohort's step, the peak memory, and training throughput as students
per hour: ``3600 K / (startup + steps × step)`` for the cohort, ``3600 K / (K × startup + steps ×
alone)`` for the trials alone, with ``steps`` the optimizer steps of one of the config's trials and
``startup`` a trial's measured start-up on this machine (``bench/startup.json``): a cohort pays it
once. It is the training steps' throughput, not a study's: evaluation, decode and the search are
left out.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tmad_ray.bench import in_fresh_process, write_result

SIZES = (1, 2, 4, 8)
LABELS = ["A", "B1", "B2", "G"]


def _recipes(cfg, k: int) -> list[dict]:
    sets = cfg.search.align_layer_sets
    return [{"alpha": 1.0, "beta": 1.0, "gamma": 0.5, "delta": 0.5 if cfg.distill.relations else 0.0,
             "temperature": 4.0, "align_layers": sets[i % len(sets)]} for i in range(k)]


def _run_size(cfg_dict: dict, k: int, steps: int, warmup: int, threads: int, queue) -> None:
    from tmad_ray import recipe
    from tmad_ray.bench.step import _time_steps, build_models
    from tmad_ray.config import config_from_dict
    from tmad_ray.distill.trimodel import TriModel, shared_targets
    from tmad_ray.train import cohort

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)
    student, teacher, assistant = build_models(cfg, LABELS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher, assistant = teacher.to(device), assistant.to(device)
    members = []
    for i, params in enumerate(_recipes(cfg, k)):
        mcfg = recipe.apply(cfg, params)
        tri = TriModel(copy.deepcopy(student) if i else student, teacher, assistant, mcfg.distill, LABELS)
        tri.trainable.to(device)
        members.append(cohort.Member(str(i), mcfg, tri, torch.optim.AdamW(tri.parameters(), lr=1e-4)))
    b, d = cfg.train.batch_size, cfg.data
    x = torch.randn(b, d.num_frames, 3, d.image_size, d.image_size, device=device)
    y = torch.randint(0, len(LABELS), (b,), device=device)
    gen = torch.Generator().manual_seed(0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    frozen_s: list[float] = []

    def step():
        query = cohort.query_rows(members, device, gen)
        t0 = time.perf_counter()
        with autocast():
            targets = shared_targets([m.tri for m in members], x, query)
        if device.type == "cuda":
            torch.cuda.synchronize()
        frozen_s.append(time.perf_counter() - t0)
        cohort.forward_backward(members, x, y, query, autocast=autocast, targets=targets)
        cohort.optimizer_steps(members, grad_clip=1.0)

    times, peak_mb, _ = _time_steps(step, steps, warmup, device)  # (the peak: the cohort's, before the rest)
    step_s = statistics.median(times)
    frozen = statistics.median(frozen_s[warmup:])
    alone = 0.0  # the same students one after another, each with its own frozen forwards: trials alone
    for m in members:
        def step_alone(m=m):
            query = cohort.query_rows([m], device, gen)
            cohort.forward_backward([m], x, y, query, autocast=autocast)
            cohort.optimizer_steps([m], grad_clip=1.0)
        alone += statistics.median(_time_steps(step_alone, steps, warmup, device)[0])
    queue.put({"k": k, "step_s": step_s, "per_student_s": step_s / k, "alone_s": alone, "step_speedup": alone / step_s,
               "frozen_s": frozen, "frozen_share": frozen / step_s, "peak_mb": peak_mb, "device": device.type})


def trial_steps(cfg, clips: int) -> int:
    """Optimizer steps of one trial of ``cfg`` with ``clips`` training clips an epoch."""
    t = cfg.train
    per_rank = math.ceil(clips / t.num_workers / t.batch_size)
    return math.ceil(per_rank / t.grad_accum) * t.epochs


def measure(cfg, label: str, clips: int, startup_s: float, steps: int, warmup: int, threads: int,
            sizes=SIZES, say=print) -> dict:
    """Every K of ``sizes`` on ``cfg``'s shapes, each in a fresh process."""
    rows = []
    for k in sizes:
        rows.append(in_fresh_process(_run_size, (cfg.model_dump(), k, steps, warmup, threads),
                                     f"bench cohort: K={k} on {label}"))
        r = rows[-1]
        say(f"  {label:<16} K={k}: step {r['step_s'] * 1e3:8.1f} ms ({r['alone_s'] * 1e3:8.1f} ms alone, "
            f"{r['step_speedup']:.2f}x), frozen {r['frozen_share']:.0%}, peak {r['peak_mb']:.0f} MB")
    n = trial_steps(cfg, clips)
    for r in rows:  # a cohort pays one start-up; its students alone pay one each
        r["students_per_hour"] = 3600 * r["k"] / (startup_s + n * r["step_s"])
        r["students_per_hour_alone"] = 3600 * r["k"] / (r["k"] * startup_s + n * r["alone_s"])
        r["vs_alone"] = r["students_per_hour"] / r["students_per_hour_alone"]
    d = cfg.data
    return {"label": label, "batch": cfg.train.batch_size, "frames": d.num_frames, "image": d.image_size,
            "trial_steps": n, "startup_s": startup_s, "rows": rows}


def rehearsal_config():
    from tmad_ray.config import load_config

    return load_config(Path(__file__).resolve().parents[2] / "experiments" / "xd_violence_small.yaml",
                       ["models.student={size: vit-s}", "train.batch_size=2", "data.root=unused"])


def run_cohort_bench(cfg, out: str, steps: int = 5, warmup: int = 1, rehearsal_steps: int = 2,
                     threads: int | None = None, say=print) -> dict:
    from tmad_ray.data.manifest import load_manifest
    from tmad_ray.data.synthetic import ensure_synthetic

    threads = threads or torch.get_num_threads()
    startup = _startup_s()
    ensure_synthetic(cfg.data)
    d = cfg.data
    clips = len(load_manifest(d.root, d.label_mode, d.val_fraction, d.split_seed).rows["train"]) * d.train_views
    shapes = [measure(cfg, "embedded default", clips, startup, steps, warmup, threads, say=say)]
    rehearsal = rehearsal_config()
    # the rehearsal's data is 10 videos; a trial of XD-Violence's size (3,954 train videos) sets the steps
    shapes.append(measure(rehearsal, "rehearsal shapes", 3954, startup, rehearsal_steps, warmup, threads, say=say))
    result = {"benchmark": "cohort",
              "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "platform": platform.platform(),
                          "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
              "steps": steps, "rehearsal_steps": rehearsal_steps, "shapes": shapes}
    return write_result(result, out, format_table(result))


def _startup_s() -> float:
    """A trial's start-up on this machine, to its first step: ``bench/startup.json``'s median with
    Ray's defaults and 2 workers (``tmad-ray bench startup`` measures it)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "startup.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `tmad-ray bench startup` first (the cohort bench uses its start-up)")
    return float(json.loads(path.read_text())["variants"]["ray_defaults_2_workers"]["to_loop_median_s"])


def format_table(r: dict) -> str:
    lines = [f"{r['machine']['cpus']} CPUs, {r['machine']['torch_threads']} threads"
             + (f", {r['machine']['gpu']}" if r["machine"]["gpu"] else "") + "; random weights; median step"]
    for s in r["shapes"]:
        lines += ["", f"**{s['label']}**: batch {s['batch']} × {s['frames']}×{s['image']}²; a trial = {s['trial_steps']} "
                  f"optimizer steps + {s['startup_s']:.1f} s start-up",
                  "| K | cohort step (s) | per student (s) | the K alone (s) | step speed-up | frozen share | peak MB | "
                  "students/hour | alone | vs alone |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in s["rows"]:
            lines.append(f"| {row['k']} | {row['step_s']:.3f} | {row['per_student_s']:.3f} | {row['alone_s']:.3f} | "
                         f"{row['step_speedup']:.2f}× | {row['frozen_share']:.0%} | {row['peak_mb']:.0f} | "
                         f"{row['students_per_hour']:.3g} | {row['students_per_hour_alone']:.3g} | "
                         f"{row['vs_alone']:.2f}× |")
    return "\n".join(lines)
