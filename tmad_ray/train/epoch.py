"""One epoch on one worker: the training pass (gradient accumulation under DDP) and the validation
pass (view-averaged predictions). ``w`` is the worker's ``Worker`` (``tmad_ray.train.worker``)."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from tmad_ray.data.augment import augment, crop_flip, normalize
from tmad_ray.train import evaluate as ev


def accumulation(step: int, steps: int, grad_accum: int) -> tuple[bool, int]:
    """(whether ``step`` (1-based) of ``steps`` ends an optimizer step, how many micro-batches that step sums).

    Groups of ``grad_accum`` micro-batches; the last group of an epoch may be shorter, and it still
    ends with a synchronized backward, so that DDP all-reduces it like every other group: an
    optimizer step on gradients that were never all-reduced would let the replicas drift apart."""
    first = (step - 1) // grad_accum * grad_accum + 1
    last = min(steps, first + grad_accum - 1)
    return step == last, last - first + 1


def train_epoch(w, epoch: int, gen: torch.Generator) -> dict:
    """One pass over this rank's clips (``w.train_shard``: ``steps`` batches); returns the loss terms
    summed over clips and the clip count (to be all-reduced), the steps, the clips seen and the step
    times. Crops, flips and sampled attention rows come from ``gen`` (seeded by seed, rank and epoch,
    so a resumed run repeats an unbroken one), or, with the frozen-target cache, from the cache."""
    t = w.cfg.train
    tri, device = w.tri, w.device
    tri.trainable.train()
    sums: dict[str, torch.Tensor] = {}
    n, step, seen, times = 0, 0, [], []
    no_sync = getattr(tri.trainable, "no_sync", None)  # DDP's; None with one worker
    for step, batch in enumerate(w.train_shard.batches(epoch), start=1):
        t0 = time.perf_counter()
        if w.fault is not None:
            w.fault(epoch, step)
        clips = torch.as_tensor(batch["clip"]).to(device)
        cached, query = None, None
        if w.targets is None:
            x = augment(clips, w.cfg.data.image_size, t.flip, gen)
            query = tri.query_rows(device, gen)
        else:  # one of the K augmentations whose frozen targets are cached
            params, query, cached = w.targets.batch(batch["video_id"], batch["view"], gen, device)
            x = crop_flip(clips, params, w.cfg.data.image_size)
        y = torch.tensor(batch["label"], device=device)
        sync, group = accumulation(step, w.train_shard.steps, t.grad_accum)
        # forward and backward inside no_sync: DDP decides in forward whether the backward all-reduces
        with (no_sync() if (not sync and no_sync) else contextlib.nullcontext()):
            with w.autocast():
                out = tri(x, y, cached=cached, query_idx=query)
            (out["loss"] / group).backward()  # the mean over the group's micro-batches
        if sync:
            optimizer_step(w, t.grad_clip)
        for k, v in out.items():
            if k != "logits":  # summed on the device: no host sync per loss term and step
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(y)
        n += len(y)
        seen += [f"{v}#{i}" for v, i in zip(batch["video_id"], batch["view"])]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if step != w.train_shard.steps:
        raise RuntimeError(f"rank trained {step} steps, expected {w.train_shard.steps}: the ranks would fall out "
                           "of step")
    return {"sums": {k: float(v) for k, v in sums.items()}, "n": n, "steps": step, "seen": seen, "step_times": times}


def optimizer_step(w, grad_clip: float | None) -> None:
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(w.tri.parameters(), grad_clip)
    w.optimizer.step()
    w.scheduler.step()
    w.optimizer.zero_grad(set_to_none=True)


def evaluate_shard(w) -> dict:
    """Per-video view-averaged predictions on this rank's val videos (``w.val_shard``): the confusion
    matrix ``[C, C]``, the summed NLL and the video count (all to be all-reduced)."""
    return evaluate_students(w, [w.tri.core.student])[0]


@torch.no_grad()
def evaluate_students(w, students: list) -> list[dict]:
    """``evaluate_shard`` for several students at once (a cohort's): the val clips are read once."""
    for s in students:
        s.eval()
    ids, probs, ys = [], [[] for _ in students], []
    for batch in w.val_shard.batches(w.cfg.train.batch_size):
        x = normalize(torch.as_tensor(batch["clip"]).to(w.device))
        with w.autocast():
            for i, s in enumerate(students):
                probs[i].append(ev.predict_probs(s, x).cpu().numpy())
        ids += list(batch["video_id"])
        ys.append(batch["label"])
    for s in students:
        s.train()
    c = len(w.labels)
    if not ids:
        return [{"confusion": np.zeros((c, c)), "nll": 0.0, "videos": 0} for _ in students]
    out = []
    for p in probs:
        _, p, y = ev.average_views(ids, np.concatenate(p), np.concatenate(ys))
        nll = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).sum())
        out.append({"confusion": ev.confusion(y, p.argmax(1), c), "nll": nll, "videos": len(y)})
    return out
