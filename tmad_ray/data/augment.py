"""From cached uint8 clips to model input: random crops and flips, and ImageNet normalization.

Train clips are cached at ``data.train_short_side`` and cropped to ``data.image_size`` per step:
either a fresh random crop and flip per clip (``augment``), or, with the frozen-target cache, one
of K fixed augmentations per cached view (``aug_params``), so that the cached targets match.
Everything here runs on whatever device the clips are on.

Kept free of transformers on purpose: the training loop's module imports this, and it is imported
by every Tune trial and Ray Train controller process (they unpickle ``train_loop_per_worker``);
transformers would cost seconds per trial for code those processes never run.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUG_VERSION = 1  # in the frozen-target cache's key: a change to aug_params must change it


def normalize(clips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,T,H,W,3]`` -> float ``[B,T,3,H,W]`` with ImageNet mean/std (VideoMAE / AMD convention)."""
    x = torch.as_tensor(clips).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 1, 1, 1, 3)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 1, 1, 1, 3)
    return ((x - mean) / std).permute(0, 1, 4, 2, 3).contiguous()


def crop_flip(clips: torch.Tensor, params: list[tuple[int, int, bool]], size: int) -> torch.Tensor:
    """uint8 ``[B,T,S,S,3]`` -> normalized ``[B,T,3,size,size]`` with one (y, x, flip) per clip."""
    out = []
    for c, (y, x, f) in zip(clips, params):
        c = c[:, y:y + size, x:x + size]
        out.append(c.flip(2) if f else c)
    return normalize(torch.stack(out))


def augment(clips: torch.Tensor, size: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """uint8 ``[B,T,S,S,3]`` -> normalized ``[B,T,3,size,size]``: a random crop per clip, h-flip at 0.5."""
    b, _, h, w, _ = clips.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=gen).tolist()
    xs = torch.randint(0, w - size + 1, (b,), generator=gen).tolist()
    flips = (torch.rand(b, generator=gen) < 0.5).tolist() if flip else [False] * b
    return crop_flip(clips, list(zip(ys, xs, flips)), size)


def aug_params(video_id: str, view: int, k: int, side: int, size: int, flip: bool) -> tuple[int, int, bool]:
    """The k-th fixed augmentation of a cached view: crop offset (y, x) in a ``side``² clip and h-flip,
    a pure function of its arguments (the same on every rank, every run)."""
    h = hashlib.sha256("#".join(map(str, ("aug", AUG_VERSION, video_id, view, k))).encode()).digest()
    room = side - size + 1
    return (int.from_bytes(h[0:4], "little") % room, int.from_bytes(h[4:8], "little") % room,
            bool(flip and h[8] & 1))
