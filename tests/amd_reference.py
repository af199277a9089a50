"""An independent implementation of AMD's (VideoMAE's) ViT, written from its definition, for tests.

Fused qkv without bias plus separate q_bias / v_bias (the key has no bias), pre-norm blocks,
a fixed sinusoid position table, mean pooling + fc_norm, input B,C,T,H,W. Its state dict uses
AMD's key names, so ``save_amd`` writes files in AMD's checkpoint format.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn


def sinusoid_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    dims = torch.arange(d, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(torch.tensor(10000.0, dtype=torch.float64), 2 * torch.div(dims, 2, rounding_mode="floor") / d)
    table = torch.where(dims % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()[None]


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch, tubelet):
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))


class AmdViT(nn.Module):
    """AMD's fine-tuning ViT (mean pooling) or, with ``num_classes=0``, its encoder (final norm, no head)."""

    def __init__(self, dim=48, depth=3, heads=4, num_classes=5, image=32, patch=8, frames=4, tubelet=2):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch, tubelet)
        self.n_tokens = (frames // tubelet) * (image // patch) ** 2
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.num_classes = num_classes
        if num_classes:
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
            self.head = nn.Linear(dim, num_classes)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        with torch.no_grad():  # non-trivial norms, so a wrong mapping of them shows
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)

    def forward(self, x):  # x: B, C, T, H, W
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = x + sinusoid_table(x.shape[1], x.shape[2])
        for blk in self.blocks:
            x = blk(x)
        if self.num_classes:
            return self.head(self.fc_norm(x.mean(1)))
        return self.norm(x)


def save_amd(model: nn.Module, path, fmt: str = "module", half: bool = False, prefix: str = "") -> None:
    sd = {prefix + k: (v.half() if half else v) for k, v in model.state_dict().items()}
    if fmt == "module":
        obj = {"module": sd}
    else:
        obj = {"model": sd, "args": argparse.Namespace(model="vit_small_patch16_224", batch_size=8), "epoch": 3}
    torch.save(obj, path)
