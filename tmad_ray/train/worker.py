"""What one Ray Train worker holds for a run, and how it is built.

``RunSpec`` is what the driver hands every worker (plain data: the experiment as a dict, the
labels, the clip-cache entries of its videos, where to log). ``setup_worker`` turns it into a
``Worker``: the tri-model (student + projectors under DDP, frozen teacher and assistant), the
optimizer and schedule, this rank's train and val shards, and the frozen-target reader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from tmad_ray.data.loader import EvalShard, TrainShard
from tmad_ray.distill.targets import TargetCache, TargetReader
from tmad_ray.distill.trimodel import TriModel

STATE_FILE = "state.pt"    # in every checkpoint: what a restarted worker resumes from
STUDENT_DIR = "student"    # in every checkpoint: the student, loadable with from_pretrained


@dataclass
class RunSpec:
    """The driver's side of a run, for every worker (``train_loop_config={"spec": RunSpec(...)}``)."""

    cfg: dict                       # the experiment (``Config.model_dump()``)
    labels: list[str]               # class names; class id = index
    train_entries: dict[str, str]   # video id -> clip-cache key
    val_entries: dict[str, str]
    train_labels: dict[str, int]    # video id -> class id
    val_labels: dict[str, int]
    log_path: str | None = None     # rank 0's JSON-lines log of the run
    # the trial's MLflow child run, logged by rank 0: {"uri", "run_id"} or, in a study,
    # {"uri", "experiment_id", "study", "trial"} (found by its tags)
    mlflow: dict | None = None
    targets_key: str | None = None  # the frozen-target cache, with distill.cache_targets
    started_at: float | None = None  # when the run began on the driver's side (the trial's first line)
    fit_at: float | None = None     # when the trial function handed over to TorchTrainer.fit()
    # a cohort (``search.cohort_size`` > 1): each student's recipe by its trial id, the study's
    # cohort hub (``tmad_ray.search.cohorts``, an actor handle) and where its trials log
    recipes: dict[str, dict] | None = None
    hub: object | None = None
    trials_dir: str | None = None


@dataclass
class Worker:
    """One worker's share of the run."""

    cfg: object                     # tmad_ray.config.Config
    labels: list[str]
    rank: int
    world: int
    device: torch.device
    autocast: object                # () -> context manager: bf16 autocast on CUDA, nothing on CPU
    tri: TriModel | None            # None in a cohort's worker: each of its members has its own
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    train_shard: TrainShard
    val_shard: EvalShard
    targets: TargetReader | None    # cached frozen targets, or None: the frozen models run every step
    fault: object                   # test-only: (epoch, step) -> None, may kill the process
    run_log: "RunLog"
    once: dict = field(default_factory=dict)  # per attempt: shard overlap, student latency
    members: list = field(default_factory=list)  # a cohort's students (tmad_ray.train.cohort.Member); tri is None


def build_trimodel(cfg, labels: list[str]) -> TriModel:
    """Student (seeded) and, when a distillation term is on, the frozen teacher and assistant."""
    from tmad_ray.models.hf import frozen_roles, load_models

    torch.manual_seed(cfg.train.seed)  # DDP broadcasts rank 0's weights anyway; this makes runs repeatable
    models = load_models(cfg, labels, ("student", *frozen_roles(cfg.distill)))
    # the projectors from a seed of their own, not from what loading the frozen models drew: a cohort's
    # student (which loads none of them) starts from the same projectors as it does alone
    torch.manual_seed(cfg.train.seed + 1)
    return TriModel(models["student"], models.get("teacher"), models.get("assistant"), cfg.distill, labels)


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool = False) -> list[dict]:
    """AdamW's groups: weight decay on matrices (linear and patch-embedding weights), none on biases,
    norm weights and other 1-D parameters, as Hugging Face's Trainer and most recipes do (decaying a
    LayerNorm's gain towards 0 only fights the normalization). ``decay_all``: one group, everything
    decayed (``train.decay_all_params``, tmad_ray's old way, kept for the ablation that measured the
    difference). Frozen parameters are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": trainable, "weight_decay": weight_decay}]
    return [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def redecoder(cfg, mode: str):
    """What a shard calls on a corrupt cache entry: decode the video again (``mode``'s views), rewrite it."""
    from tmad_ray.data.clips import ViewSpec
    from tmad_ray.data.pipeline import redecode_entry

    return partial(redecode_entry, cfg.storage.clip_cache, cfg.data.root,
                   dataclasses.asdict(ViewSpec.from_config(cfg.data, mode)))


def setup_worker(cfg, spec: RunSpec, rank: int, world: int, device: torch.device, prepare_model, checkpoint,
                 phases: dict) -> tuple[Worker, dict | None]:
    """Models (``prepare_model``: Ray Train's, DDP when world > 1), optimizer, schedule, shards and
    targets, restored from ``checkpoint`` (Ray Train's, or None). Returns the worker and the
    checkpoint's state (None for a fresh run); times its phases into ``phases``."""
    mark = time.time()
    tri = build_trimodel(cfg, spec.labels)
    phases["models_s"], mark = time.time() - mark, time.time()
    # student + projectors: to the device, DDP when world > 1 (see ddp_kwargs for unused parameters)
    tri.wrap(lambda m: prepare_model(m, parallel_strategy_kwargs=ddp_kwargs(cfg)))
    phases["ddp_s"], mark = time.time() - mark, time.time()
    optimizer = adamw(cfg, tri)
    train_shard, val_shard = make_shards(cfg, spec, rank, world)
    scheduler = schedule(cfg, optimizer, train_shard.steps)
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(os.path.join(d, STATE_FILE), map_location=device, weights_only=True)
        tri.core.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    targets = None
    if spec.targets_key:
        d = cfg.distill
        targets = TargetReader(TargetCache(cfg.storage.clip_cache, spec.targets_key), spec.train_entries,
                               d.target_views, keep=tri.target_layers(), budget_mb=d.target_cache_reader_mb)
    else:
        tri.frozen_to(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext
    w = Worker(cfg, spec.labels, rank, world, device, autocast, tri, optimizer, scheduler, train_shard, val_shard,
               targets, kill_switch(cfg, rank), RunLog(spec.log_path if rank == 0 else None))
    phases["data_and_checkpoint_s"] = time.time() - mark
    return w, state


def adamw(cfg, tri: TriModel) -> torch.optim.Optimizer:
    """AdamW over the student and projectors, at ``train.lr`` (a recipe's own lr when searched)."""
    t = cfg.train
    return torch.optim.AdamW(param_groups(tri, t.weight_decay, t.decay_all_params), lr=t.lr)


def schedule(cfg, optimizer, shard_steps: int):
    """Warm-up and cosine decay over the run's optimizer steps (``shard_steps`` micro-batches an epoch)."""
    t = cfg.train
    steps = math.ceil(shard_steps / t.grad_accum) * t.epochs
    return cosine_with_warmup(optimizer, int(t.warmup_ratio * steps), steps)


def make_shards(cfg, spec: RunSpec, rank: int, world: int) -> tuple[TrainShard, EvalShard]:
    """This rank's share of the cached train clips (a seeded order that changes every epoch) and val clips."""
    t = cfg.train
    train_shard = TrainShard(cfg.storage.clip_cache, spec.train_entries, spec.train_labels, rank=rank, world=world,
                             seed=t.seed, views=cfg.data.cached_train_views, epoch_views=cfg.data.train_views,
                             clip_bytes=train_clip_bytes(cfg),
                             batch_size=t.batch_size, hold_mb=t.hold_in_memory_mb, window_clips=t.shuffle_window_clips,
                             redecode=redecoder(cfg, "train"))
    val_shard = EvalShard(cfg.storage.clip_cache, spec.val_entries, spec.val_labels, rank=rank, world=world,
                          hold_mb=t.hold_in_memory_mb, redecode=redecoder(cfg, "eval"))
    return train_shard, val_shard


def save_checkpoint(w: Worker, epoch: int, metrics: dict, directory: str) -> None:
    """``state.pt`` (trainable = student + projectors, optimizer, scheduler, epoch, config, labels,
    numeric metrics) and the student as a transformers directory (``student/``), loadable as it is."""
    # Imported here, not at the top: Tune trials and Train controllers import this module too, and
    # transformers would add seconds to every trial's start for code only the workers run.
    from tmad_ray.train.export import export_student

    torch.save({"trainable": w.tri.core.state_dict(), "optimizer": w.optimizer.state_dict(),
                "scheduler": w.scheduler.state_dict(), "epoch": epoch, "config": w.cfg.model_dump(),
                "labels": w.labels, "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}},
               os.path.join(directory, STATE_FILE))
    export_student(w.tri.core.student, w.cfg.data, os.path.join(directory, STUDENT_DIR),
                   extra={"epoch": epoch, "val_accuracy": metrics.get("val_accuracy")})


def cosine_with_warmup(optimizer, warmup_steps: int, total_steps: int):
    """Linear warm-up to the base lr, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def ddp_kwargs(cfg) -> dict:
    """Arguments for DDP. With α = 0 no loss reaches the classifier (nor the blocks after the deepest
    aligned layer), and DDP's reducer then waits for their gradients forever unless told that some
    parameters may go unused (which costs a graph traversal per step, so only then)."""
    return {"find_unused_parameters": cfg.distill.alpha == 0}


def train_clip_bytes(cfg) -> int:
    """Bytes of one cached train clip: ``T × S × S × 3`` uint8 with S = ``data.train_short_side``."""
    d = cfg.data
    return d.num_frames * d.train_short_side ** 2 * 3


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


class RunLog:
    """Rank 0's JSON-lines log of the run (attempts, epochs, metrics, start-up); other ranks write nothing."""

    def __init__(self, path: str | None):
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(self, **fields) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": time.time(), "pid": os.getpid(), **fields}) + "\n")
