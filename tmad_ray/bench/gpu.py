"""``tmad-ray bench gpu``: the tri-model step at real sizes on one GPU, and its model FLOPs utilization.

ViT-S student (12 x 384, 6 heads), ViT-B teacher and ViT-B assistant (12 x 768, 12 heads), clips of
16 x 224² (patch 16, tubelet 2: 1568 tokens), random weights, bf16 autocast. Variants: the
tri-model without attention distillation, with attention at 3 layers (all query rows, and 256
sampled rows), and with the frozen-target cache (the frozen forwards replaced by reading targets).
Runs in a few minutes; ``--tiny`` runs the same code at toy sizes on CPU (what CI tests).

MFU counts matmul FLOPs only: per block and clip ``24·N·D² + 4·N²·D`` (QKV, projection, MLP,
scores and weighted sum); the student's step is 3x its forward (forward + backward), a frozen
model's is 1x, and it is skipped with the target cache. Peak: the GPU's dense bf16 throughput.
"""

from __future__ import annotations

import multiprocessing as mp

import torch

from tmad_ray.bench import write_result

PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
REAL = {"student": (12, 384, 6), "teacher": (12, 768, 12), "assistant": (12, 768, 12)}
TINY = {"student": (2, 32, 2), "teacher": (2, 48, 2), "assistant": (2, 48, 2)}


def vit_flops(depth: int, width: int, tokens: int) -> float:
    return depth * (24 * tokens * width ** 2 + 4 * tokens ** 2 * width)


def step_flops(archs: dict, tokens: int, batch: int, frozen: bool) -> float:
    s = 3 * vit_flops(archs["student"][0], archs["student"][1], tokens)
    f = sum(vit_flops(a[0], a[1], tokens) for k, a in archs.items() if k != "student") if frozen else 0.0
    return batch * (s + f)


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_gpu_bench(out: str, tiny: bool = False, batch: int | None = None, steps: int = 10, warmup: int = 3) -> dict:
    from tmad_ray.bench.step import _run_variant
    from tmad_ray.config import load_config

    archs = TINY if tiny else REAL
    image, frames, patch = (32, 4, 8) if tiny else (224, 16, 16)
    batch = batch or (2 if tiny else 8)
    d, w, h = archs["student"]
    cfg = load_config(None, [f"data.image_size={image}", f"data.num_frames={frames}", "models.toy_zoo=null",
                             f"models.student={{depth: {d}, width: {w}, heads: {h}, patch_size: {patch}, tubelet_size: 2}}",
                             f"train.batch_size={batch}", "distill.align_layers=[-1,-2,-3]" if not tiny else
                             "distill.align_layers=[-1,-2]"])
    tokens = (frames // 2) * (image // patch) ** 2
    k = 3 if not tiny else 2
    frozen_arch = {"teacher_arch": archs["teacher"], "assistant_arch": archs["assistant"]}
    variants = [
        {"name": "tri (β, δ)", "kind": "tri", **frozen_arch},
        {"name": f"tri + attn@{k}", "kind": "tri", "attn_layers": k, **frozen_arch},
        {"name": f"tri + attn@{k}, 256 query rows", "kind": "tri", "attn_layers": k, "query": 256, **frozen_arch},
        {"name": f"tri + attn@{k}, 256 rows, target cache", "kind": "tri", "attn_layers": k, "query": 256,
         "cached": True, **frozen_arch},
    ]
    ctx = mp.get_context("spawn")
    rows = []
    peak = peak_tflops()
    for v in variants:
        vcfg = cfg.model_copy(deep=True)
        vcfg.distill.attn_query_tokens = v.get("query")
        q = ctx.Queue()
        p = ctx.Process(target=_run_variant, args=(vcfg.model_dump(), v, steps, warmup, torch.get_num_threads(), q))
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"bench gpu: variant {v['name']} failed (exit code {p.exitcode})")
        r = q.get()
        flops = step_flops(archs, tokens, batch, frozen=not v.get("cached"))
        r["tflops"] = flops / (r["ms"] / 1e3) / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
        rows.append(r)
        print(f"  {r['name']:<40} {r['ms']:8.1f} ms  {r['clips_per_s']:7.1f} clips/s  {r['tflops']:.2f} TFLOP/s",
              flush=True)
    result = {"benchmark": "gpu", "tiny": tiny, "device": rows[0]["device"],
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "peak_bf16_tflops": peak,
              "shape": {"batch": batch, "frames": frames, "image": image, "patch": patch, "tokens": tokens},
              "archs": archs, "steps": steps, "rows": rows}
    return write_result(result, out, format_table(result))


def format_table(r: dict) -> str:
    s = r["shape"]
    lines = [f"{r['gpu'] or r['device']}; batch {s['batch']} x {s['frames']}x{s['image']}² ({s['tokens']} tokens); "
             f"student {r['archs']['student']}, teacher {r['archs']['teacher']}, assistant {r['archs']['assistant']} "
             f"(depth, width, heads); bf16 on CUDA; median of {r['steps']} steps",
             "| variant | step ms | clips/s | TFLOP/s | MFU | peak MB |", "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        lines.append(f"| {row['name']} | {row['ms']:.1f} | {row['clips_per_s']:.1f} | {row['tflops']:.3f} | {mfu} | "
                     f"{row['peak_mb']:.0f} |")
    return "\n".join(lines)
