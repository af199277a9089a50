"""Normalization of uint8 clips for the models, on whatever device the clips are on.

Kept apart from the model code on purpose: the training loop's module is imported by every Tune
trial and Ray Train controller process (they unpickle ``train_loop_per_worker``), and importing
transformers there costs seconds per trial for code those processes never run.
"""

from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(clips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[B,T,H,W,3]`` -> float ``[B,T,3,H,W]`` with ImageNet mean/std (VideoMAE / AMD convention)."""
    x = torch.as_tensor(clips).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 1, 1, 1, 3)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 1, 1, 1, 3)
    return ((x - mean) / std).permute(0, 1, 4, 2, 3).contiguous()
