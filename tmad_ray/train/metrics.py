"""What a worker measures and how the ranks agree on it: all-reduced sums, replica drift, shard
overlap, memory, student latency, the epoch's metrics dict, the printed epoch table, and the
start-up phases of a run (event ``startup`` in its log).

Only rank 0's report reaches Tune, so every metric is all-reduced (or gathered) first.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.distributed as dist

from tmad_ray.train import evaluate as ev


def all_reduce(values: np.ndarray | list, op=None) -> np.ndarray:
    """Sum (or ``op``) a float64 array over ranks; identity without a process group."""
    t = torch.as_tensor(np.asarray(values, np.float64))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.numpy()


def per_rank(value: float, rank: int, world: int) -> list[float]:
    """Every rank's ``value``, in rank order (an all-reduce of one-hot rows)."""
    return all_reduce(np.eye(world)[rank] * value).tolist()


@torch.no_grad()
def replica_drift(module: torch.nn.Module) -> float:
    """The largest difference of any trainable parameter between any two ranks (0.0 when DDP keeps the
    replicas identical, as it must; 0.0 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    flat = torch.cat([p.detach().float().reshape(-1) for p in module.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max().cpu())


def shard_overlap(seen: list[str], world: int) -> int:
    """How many clips more than one rank trained on in this epoch (0 when the shards partition the data)."""
    if world == 1 or not dist.is_initialized():
        return 0
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen)
    return sum(len(set(s)) for s in everyone) - len(set().union(*everyone))


def peak_memory_mb(device) -> float:
    """This process's peak memory: the accelerator's peak allocation on CUDA, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def student_latency_ms(student, cfg, device, repeats: int = 5) -> float:
    """Median time of the student's forward on one clip, on the training device (an objective for NSGA-II)."""
    d = cfg.data
    x = torch.randn(1, d.num_frames, 3, d.image_size, d.image_size, device=device)
    student.eval()
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        student(pixel_values=x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    student.train()
    return float(np.median(times[1:]) * 1e3)


def epoch_metrics(w, epoch: int, tr: dict, va: dict, train_s: float, first: bool) -> dict:
    """The epoch's report, the same on every rank: loss terms per clip, val accuracy / macro-F1 / loss
    from the summed confusion matrix, throughput of the slowest rank, per-rank step times and memory,
    replica drift; on an attempt's ``first`` epoch also the shard overlap and the student's latency
    (else ``w.once``, kept from then). ``w``: the ``Worker``; ``tr`` / ``va``: this rank's
    ``train_epoch`` / ``evaluate_shard``."""
    keys = sorted(tr["sums"])
    summed = all_reduce([tr["sums"][k] for k in keys] + [tr["n"], va["nll"], va["videos"]])
    cm = all_reduce(va["confusion"]).astype(np.int64)
    slowest = float(all_reduce([train_s], op=dist.ReduceOp.MAX if dist.is_initialized() else None)[0])
    if first:
        w.once = {"train_shard_overlap": shard_overlap(tr["seen"], w.world), "student_latency_ms": float(
            all_reduce([student_latency_ms(w.tri.core.student, w.cfg, w.device) if w.rank == 0 else 0.0])[0])}
    n_clips, nll, n_videos = summed[len(keys)], summed[len(keys) + 1], summed[len(keys) + 2]
    m = ev.metrics_from_confusion(cm, w.labels)
    return {"epoch": epoch, **{f"train_{k}": float(v / max(n_clips, 1)) for k, v in zip(keys, summed)},
            "lr": w.scheduler.get_last_lr()[0], "clips_per_s": float(n_clips / max(slowest, 1e-9)),
            "student_latency_ms": w.once["student_latency_ms"],
            "student_params_m": sum(p.numel() for p in w.tri.core.student.parameters()) / 1e6,
            "train_clips": int(n_clips),
            "train_clips_per_rank": [int(round(v)) for v in per_rank(tr["n"], w.rank, w.world)],
            "train_shard_overlap": w.once["train_shard_overlap"], "train_steps": tr["steps"],
            "step_s_per_rank": per_rank(float(np.median(tr["step_times"])), w.rank, w.world),
            "peak_memory_mb_per_rank": [round(v, 1) for v in per_rank(peak_memory_mb(w.device), w.rank, w.world)],
            "replica_drift": replica_drift(w.tri.trainable),
            "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
            "val_loss": float(nll / max(n_videos, 1)), "val_videos": int(n_videos),
            "val_per_class": {k: (float("nan") if v is None else v) for k, v in m["per_class"].items()},
            "val_confusion": cm.tolist()}


EPOCH_COLUMNS = [("epoch", "{:>5d}"), ("train_loss", "{:>10.4f}"), ("train_ce", "{:>8.4f}"),
                 ("val_loss", "{:>8.4f}"), ("val_accuracy", "{:>7.3f}"), ("val_macro_f1", "{:>6.3f}"),
                 ("clips_per_s", "{:>8.1f}"), ("epoch_s", "{:>7.1f}")]
EPOCH_HEADER = f"{'epoch':>5} {'train_loss':>10} {'train_ce':>8} {'val_loss':>8} {'val_acc':>7} {'val_f1':>6} " \
               f"{'clips/s':>8} {'time_s':>7}"


def epoch_row(metrics: dict, header: bool = False) -> str:
    """One line of the per-epoch table (with the header line first when asked)."""
    row = " ".join(fmt.format(metrics[k]) for k, fmt in EPOCH_COLUMNS)
    return f"{EPOCH_HEADER}\n{row}" if header else row


def driver_phases(started_at: float | None, fit_at: float | None, entered: float) -> dict:
    """The start-up phases before the worker's loop began, from the times the driver side handed over:
    ``trial_setup_s`` (trial function -> ``TorchTrainer.fit()``), ``ray_train_start_s`` (-> this
    loop), and within it, where /proc says when this process was born, ``controller_s`` (the
    controller's start, the worker's scheduling) and ``worker_process_s`` (Python, Ray, torch,
    Ray Train, the process group). Empty when the driver side gave no times."""
    if not started_at:
        return {}
    handed = fit_at or started_at
    phases = {"trial_setup_s": handed - started_at, "ray_train_start_s": entered - handed}
    born = process_started_at()  # this worker's process: Ray Train starts a new one per run
    if born is not None and handed <= born + 1 <= entered + 1:
        phases["controller_s"] = max(0.0, born - handed)
        phases["worker_process_s"] = entered - max(born, handed)
    return phases


def process_started_at() -> float | None:
    """When this process was created (epoch seconds, within ~1 s: Linux counts from the boot second),
    or None where /proc cannot say."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
