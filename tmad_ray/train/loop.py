"""``train_loop_per_worker``: one DDP distillation run over the clip cache (Ray Train V2).

Setup (models, DDP, optimizer, data, resume) -> per epoch: train, evaluate, report -> done.
Every rank calls ``ray.train.report`` each epoch (it is a barrier); rank 0 alone attaches the
checkpoint and writes the log. Metrics are all-reduced before reporting, because only rank 0's
reach Tune.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tmad_ray.data.loader import EvalShard, TrainShard
from tmad_ray.data.normalize import normalize
from tmad_ray.distill.targets import TargetCache, TargetReader, crop_flip
from tmad_ray.distill.trimodel import TriModel
from tmad_ray.train import evaluate as ev

STATE_FILE = "state.pt"
STUDENT_DIR = "student"


# ---------------------------------------------------------------------------------------- setup


def build_trimodel(cfg, labels: list[str]) -> TriModel:
    """Student (seeded) and, when a distillation term is on, the frozen teacher and assistant."""
    from tmad_ray.models.hf import build_student, check_tokenization, load_assistant, load_teacher

    d = cfg.distill
    torch.manual_seed(cfg.train.seed)  # DDP broadcasts rank 0's weights anyway; this makes runs repeatable
    student = build_student(cfg.models.student, cfg.data, labels)
    models = {"student": student}
    if d.beta > 0 or d.gamma > 0 or d.delta > 0:
        if d.teacher_weight > 0:
            models["teacher"] = load_teacher(cfg.models.teacher.name)
        if d.assistant_weight > 0:
            models["assistant"] = load_assistant(cfg.models, cfg.data)
    check_tokenization(models, cfg.data)
    return TriModel(student, models.get("teacher"), models.get("assistant"), d, labels)


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def augment(clips: torch.Tensor, size: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[B,T,S,S,3]`` on the device -> normalized ``[B,T,3,size,size]``: random crop per clip, h-flip."""
    b, _, h, w, _ = clips.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=gen).tolist()
    flips = (torch.rand(b, generator=gen) < 0.5).tolist() if flip else [False] * b
    return crop_flip(clips, list(zip(ys, xs, flips)), size)


def ddp_kwargs(cfg) -> dict:
    """Arguments for DDP. With α = 0 no loss reaches the classifier (nor the blocks after the deepest
    aligned layer), and DDP's reducer then waits for their gradients forever unless told that some
    parameters may go unused (which costs a graph traversal per step, so only then)."""
    return {"find_unused_parameters": cfg.distill.alpha == 0}


def train_clip_bytes(cfg) -> int:
    """Bytes of one cached train clip: ``T × S × S × 3`` uint8 with S = ``data.train_short_side``."""
    d = cfg.data
    return d.num_frames * d.train_short_side ** 2 * 3


def peak_memory_mb(device) -> float:
    """This process's peak memory: the accelerator's peak allocation on CUDA, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


def all_reduce(values: np.ndarray | list, op=None) -> np.ndarray:
    """Sum (or ``op``) a float64 array over ranks; identity without a process group."""
    t = torch.as_tensor(np.asarray(values, np.float64))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.numpy()


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


def shard_overlap(seen: list[str], world: int) -> int:
    """How many clips more than one rank trained on in this epoch (0 when the shards partition the data)."""
    if world == 1 or not dist.is_initialized():
        return 0
    everyone: list = [None] * world
    dist.all_gather_object(everyone, seen)
    return sum(len(set(s)) for s in everyone) - len(set().union(*everyone))


# ---------------------------------------------------------------------------------------- epoch parts


def accumulation(step: int, steps: int, grad_accum: int) -> tuple[bool, int]:
    """(whether ``step`` (1-based) of ``steps`` ends an optimizer step, how many micro-batches that step sums).

    Groups of ``grad_accum`` micro-batches; the last group of an epoch may be shorter, and it still
    ends with a synchronized backward, so that DDP all-reduces it like every other group: an
    optimizer step on gradients that were never all-reduced would let the replicas drift apart."""
    first = (step - 1) // grad_accum * grad_accum + 1
    last = min(steps, first + grad_accum - 1)
    return step == last, last - first + 1


def train_epoch(tri: TriModel, shard, optimizer, scheduler, cfg, device, epoch: int, gen: torch.Generator,
                autocast, fault=None, targets=None) -> dict:
    """One pass over this rank's clips (``shard``: a ``TrainShard``, ``shard.steps`` batches); returns
    summed loss terms and counts (to be all-reduced) and the step times."""
    t = cfg.train
    tri.trainable.train()
    sums: dict[str, torch.Tensor] = {}
    n, step, seen, times = 0, 0, [], []
    no_sync = getattr(tri.trainable, "no_sync", None)  # DDP's; None with one worker
    for step, batch in enumerate(shard.batches(epoch), start=1):
        t0 = time.perf_counter()
        if fault is not None:
            fault(epoch, step)
        clips = torch.as_tensor(batch["clip"]).to(device)
        cached, query = None, None
        if targets is None:
            x = augment(clips, cfg.data.image_size, t.flip, gen)
        else:  # one of the K augmentations whose frozen targets are cached
            params, query, cached = targets.batch(batch["video_id"], batch["view"], gen, device)
            x = crop_flip(clips, params, cfg.data.image_size)
        y = torch.tensor(batch["label"], device=device)
        sync, group = accumulation(step, shard.steps, t.grad_accum)
        # forward and backward inside no_sync: DDP decides in forward whether the backward all-reduces
        with (no_sync() if (not sync and no_sync) else contextlib.nullcontext()):
            with autocast():
                out = tri(x, y, cached=cached, query_idx=query)
            (out["loss"] / group).backward()  # the mean over the group's micro-batches
        if sync:
            _optimizer_step(tri, optimizer, scheduler, t.grad_clip)
        for k, v in out.items():
            if k != "logits":  # summed on the device: no host sync per loss term and step
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
        n += len(y)
        seen += [f"{v}#{w}" for v, w in zip(batch["video_id"], batch["view"])]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if step != shard.steps:
        raise RuntimeError(f"rank trained {step} steps, expected {shard.steps}: the ranks would fall out of step")
    return {"sums": {k: float(v) for k, v in sums.items()}, "n": n, "steps": step, "seen": seen, "step_times": times}


def _optimizer_step(tri, optimizer, scheduler, grad_clip) -> None:
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(tri.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def evaluate_shard(student, shard: EvalShard, labels: list[str], device, batch_size: int, autocast) -> dict:
    """Per-video view-averaged predictions on this rank's val videos: confusion matrix and NLL sum."""
    student.eval()
    ids, probs, ys = [], [], []
    for batch in shard.batches(batch_size):
        x = normalize(torch.as_tensor(batch["clip"]).to(device))
        with autocast():
            probs.append(ev.predict_probs(student, x).cpu().numpy())
        ids += list(batch["video_id"])
        ys.append(batch["label"])
    student.train()
    c = len(labels)
    if not ids:
        return {"confusion": np.zeros((c, c)), "nll": 0.0, "videos": 0}
    _, p, y = ev.average_views(ids, np.concatenate(probs), np.concatenate(ys))
    nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).sum())
    return {"confusion": ev.confusion(y, p.argmax(1), c), "nll": nll, "videos": len(y)}


def save_checkpoint(tri: TriModel, optimizer, scheduler, epoch: int, cfg, labels, metrics: dict, directory: str) -> None:
    """``state.pt`` (trainable = student + projectors, optimizer, scheduler, epoch, config) and the
    student as a transformers directory (``student/``), loadable as it is."""
    # Imported here, not at the top: Tune trials and Train controllers import this module too, and
    # transformers would add seconds to every trial's start for code only the workers run.
    from tmad_ray.train.export import export_student

    torch.save({"trainable": tri.core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "config": cfg.model_dump(), "labels": labels,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}},
               os.path.join(directory, STATE_FILE))
    export_student(tri.core.student, cfg.data, os.path.join(directory, STUDENT_DIR),
                   extra={"epoch": epoch, "val_accuracy": metrics.get("val_accuracy")})


def kill_switch(cfg, rank: int):
    """Test-only (``faults.kill_worker_at``): exit this worker process abruptly at (epoch, step), once."""
    at = cfg.faults.kill_worker_at
    if at is None or rank != cfg.faults.kill_worker_rank:
        return None
    marker = Path(cfg.storage.output_dir) / f"killed_{cfg.name}_e{at[0]}s{at[1]}"

    def maybe_kill(epoch: int, step: int) -> None:
        if (epoch, step) == tuple(at) and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
            # Ray Train's controller collects reports by polling workers every 2 s
            # (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a worker that dies sooner after a report takes
            # that report's checkpoint with it. Wait past two polls so the test checks resuming,
            # not that race.
            time.sleep(5)
            os._exit(1)
    return maybe_kill


# ---------------------------------------------------------------------------------------- the loop


def train_loop_per_worker(config: dict) -> None:
    """``config``: ``cfg`` (the experiment as a dict), ``labels``, ``train_entries`` / ``val_entries``
    (video id -> clip-cache key), ``train_labels`` / ``val_labels`` (video id -> class id), ``log_path``
    (rank 0's JSON-lines log), and optionally ``mlflow`` (``{"uri", "run_id"}`` or, in a study,
    ``{"uri", "experiment_id", "study", "trial"}``: the trial's child run,
    logged by rank 0) and ``targets_key`` (the frozen-target cache, when ``distill.cache_targets``)."""
    entered = time.time()  # start-up phases, timed for the trial log (event "startup")
    import ray.train
    import ray.train.torch

    from tmad_ray.config import config_from_dict

    _quiet_report_log()

    # ---- setup
    cfg = config_from_dict(config["cfg"])
    labels: list[str] = config["labels"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    on_cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext

    phases = {"imports_s": time.time() - entered}
    mark = time.time()
    tri = build_trimodel(cfg, labels)
    phases["models_s"] = time.time() - mark
    mark = time.time()
    # student + projectors: to the device, DDP when world > 1 (see ddp_kwargs for unused parameters)
    tri.wrap(lambda m: ray.train.torch.prepare_model(m, parallel_strategy_kwargs=ddp_kwargs(cfg)))
    phases["ddp_s"] = time.time() - mark
    mark = time.time()
    t = cfg.train
    optimizer = torch.optim.AdamW(tri.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    train_shard = TrainShard(cfg.storage.clip_cache, config["train_entries"], config["train_labels"], rank=rank,
                             world=world, seed=t.seed, views=cfg.data.train_views, clip_bytes=train_clip_bytes(cfg),
                             batch_size=t.batch_size, hold_mb=t.hold_in_memory_mb, window_clips=t.shuffle_window_clips)
    val_shard = EvalShard(cfg.storage.clip_cache, config["val_entries"], config["val_labels"], rank=rank, world=world,
                          hold_mb=t.hold_in_memory_mb)
    steps = math.ceil(train_shard.steps / t.grad_accum) * t.epochs  # optimizer steps of the run
    scheduler = cosine_with_warmup(optimizer, int(t.warmup_ratio * steps), steps)

    start, best = 0, None  # best: the search metric's best so far (best_<metric> in every report)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        tri.core.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["epoch"]
        best = state["metrics"].get(f"best_{cfg.search.metric}")
    fault = kill_switch(cfg, rank)
    targets = None
    if config.get("targets_key"):
        d = cfg.distill
        targets = TargetReader(TargetCache(cfg.storage.clip_cache, config["targets_key"]), config["train_entries"],
                               d.target_views, keep=tri.target_layers(), budget_mb=d.target_cache_reader_mb)
    else:
        tri.frozen_to(device)
    log = _Log(config.get("log_path") if rank == 0 else None)
    mlflow_run = dict(config["mlflow"]) if rank == 0 and config.get("mlflow") else None  # rank 0 logs, nobody else
    phases["data_and_checkpoint_s"] = time.time() - mark
    log.write(event="start", epoch=start, world=world, resumed=checkpoint is not None)
    if config.get("started_at") and checkpoint is None:  # when the trial (or run) began on the driver side
        handed = config.get("fit_at") or config["started_at"]  # trial function -> TorchTrainer.fit()
        phases = {"trial_setup_s": handed - config["started_at"], "ray_train_start_s": entered - handed, **phases}
        born = process_started_at()  # this worker's process: Ray Train starts a new one per run
        if born is not None and handed <= born + 1 <= entered + 1:
            # within ray_train_start_s: the controller's start and the worker's scheduling, then the
            # worker process's own start (Python, Ray, torch, Ray Train, the process group)
            phases["controller_s"] = max(0.0, born - handed)
            phases["worker_process_s"] = entered - max(born, handed)
    if checkpoint is not None and start >= t.epochs:
        # Finished before its driver died: say so again, so that Tune (and the searcher) get its result.
        ray.train.report(state["metrics"])
        return

    # ---- loop
    for epoch in range(start + 1, t.epochs + 1):
        log.write(event="epoch_start", epoch=epoch)
        t0, wall0 = time.perf_counter(), time.time()
        # crops and flips drawn from (seed, rank, epoch) alone: a resumed run augments as an unbroken one
        gen = torch.Generator().manual_seed(t.seed * 7919 + rank * 104729 + epoch * 15485863)
        tr = train_epoch(tri, train_shard, optimizer, scheduler, cfg, device, epoch, gen, autocast, fault, targets)
        train_s = time.perf_counter() - t0
        va = evaluate_shard(tri.core.student, val_shard, labels, device, t.batch_size, autocast)

        # ---- report (all-reduced, so rank 0's metrics are the global ones)
        keys = sorted(tr["sums"])
        summed = all_reduce([tr["sums"][k] for k in keys] + [tr["n"], va["nll"], va["videos"]])
        cm = all_reduce(va["confusion"]).astype(np.int64)
        slowest = float(all_reduce([train_s], op=dist.ReduceOp.MAX if dist.is_initialized() else None)[0])
        shard_sizes = all_reduce(np.eye(world)[rank] * tr["n"]).astype(int).tolist()
        step_s = all_reduce(np.eye(world)[rank] * float(np.median(tr["step_times"]))).tolist()
        peak_mb = all_reduce(np.eye(world)[rank] * peak_memory_mb(device)).round(1).tolist()
        drift = replica_drift(tri.trainable)
        if epoch == start + 1:  # once per attempt: do the ranks' shares overlap? how fast is the student?
            if tr["step_times"]:  # where this attempt's first seconds went, up to its first step
                phases["first_step_s"] = tr["step_times"][0]
                began = config["started_at"] if "ray_train_start_s" in phases else entered
                phases["startup_s"] = wall0 + tr["step_times"][0] - began
                log.write(event="startup", **{k: round(v, 3) for k, v in phases.items()})
            overlap = shard_overlap(tr["seen"], world)
            latency = float(all_reduce([student_latency_ms(tri.core.student, cfg, device) if rank == 0 else 0.0])[0])
        n_clips, nll, n_videos = summed[len(keys)], summed[len(keys) + 1], summed[len(keys) + 2]
        m = ev.metrics_from_confusion(cm, labels)
        metrics = {"epoch": epoch, **{f"train_{k}": float(v / max(n_clips, 1)) for k, v in zip(keys, summed)},
                   "lr": scheduler.get_last_lr()[0], "clips_per_s": float(n_clips / max(slowest, 1e-9)),
                   "student_latency_ms": latency,
                   "student_params_m": sum(p.numel() for p in tri.core.student.parameters()) / 1e6,
                   "train_clips": int(n_clips), "train_clips_per_rank": shard_sizes, "train_shard_overlap": overlap,
                   "train_steps": tr["steps"], "step_s_per_rank": step_s, "peak_memory_mb_per_rank": peak_mb,
                   "replica_drift": drift,
                   "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                   "val_loss": float(nll / max(n_videos, 1)), "val_videos": int(n_videos),
                   "val_per_class": {k: (float("nan") if v is None else v) for k, v in m["per_class"].items()},
                   "val_confusion": cm.tolist(), "epoch_s": time.perf_counter() - t0}
        if cfg.search.metric in metrics:
            value, pick = metrics[cfg.search.metric], (max if cfg.search.mode == "max" else min)
            best = value if best is None else pick(best, value)
            metrics[f"best_{cfg.search.metric}"] = best
        log.write(event="epoch_end", **{k: v for k, v in metrics.items() if k != "val_confusion"})
        if rank == 0 and not mlflow_run:  # in a study, Tune's table shows the epochs; the trial log keeps them
            print(epoch_row(metrics, header=epoch == start + 1), flush=True)
        if mlflow_run:
            from tmad_ray import tracking

            c = tracking.client(mlflow_run["uri"])
            mlflow_run["run_id"] = tracking.trial_run_id(c, mlflow_run)  # looked up once, by its tags
            tracking.log_epoch(c, mlflow_run["run_id"], metrics, labels)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tri, optimizer, scheduler, epoch, cfg, labels, metrics, tmp)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


EPOCH_COLUMNS = [("epoch", "{:>5d}"), ("train_loss", "{:>10.4f}"), ("train_ce", "{:>8.4f}"),
                 ("val_loss", "{:>8.4f}"), ("val_accuracy", "{:>7.3f}"), ("val_macro_f1", "{:>6.3f}"),
                 ("clips_per_s", "{:>8.1f}"), ("epoch_s", "{:>7.1f}")]
EPOCH_HEADER = f"{'epoch':>5} {'train_loss':>10} {'train_ce':>8} {'val_loss':>8} {'val_acc':>7} {'val_f1':>6} " \
               f"{'clips/s':>8} {'time_s':>7}"


def epoch_row(metrics: dict, header: bool = False) -> str:
    """One line of the per-epoch table (with the header line first when asked)."""
    row = " ".join(fmt.format(metrics[k]) for k, fmt in EPOCH_COLUMNS)
    return f"{EPOCH_HEADER}\n{row}" if header else row


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


def _quiet_report_log() -> None:
    """Ray Train logs every report's full metrics at INFO under a logger named by its file path, so
    ``LoggingConfig`` does not reach it; the epoch table says the same in one line."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class _Log:
    """Rank 0's JSON-lines log of the run (attempts, epochs, metrics); other ranks write nothing."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(self, **fields) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), "pid": os.getpid(), **fields}) + "\n")
