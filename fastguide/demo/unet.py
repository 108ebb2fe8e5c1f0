"""A small class-conditional UNet for 8x8 images: eps = model(x [N,1,8,8], t [N] float, cond [N] long).

Two resolutions (8x8 and 4x4), residual blocks whose GroupNorm output is shifted and scaled by an
embedding of (timestep, class). Class id ``num_classes`` is the null (unconditional) label.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float timestep (training index) [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    def __init__(self, channels: int = 32, num_classes: int = 10, in_channels: int = 1, emb_dim: int = 128):
        super().__init__()
        c, c2 = channels, 2 * channels
        self.config = {"channels": channels, "num_classes": num_classes, "in_channels": in_channels, "emb_dim": emb_dim}
        self.num_classes = num_classes
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # + the null label
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, emb_dim)
        self.downsample = nn.Conv2d(c, c2, 3, stride=2, padding=1)  # 8x8 -> 4x4
        self.mid1 = ResBlock(c2, c2, emb_dim)
        self.mid2 = ResBlock(c2, c2, emb_dim)
        self.upsample = nn.ConvTranspose2d(c2, c, 2, stride=2)  # 4x4 -> 8x8
        self.up1 = ResBlock(2 * c, c, emb_dim)
        self.up2 = ResBlock(c, c, emb_dim)
        self.norm_out = nn.GroupNorm(8, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        emb_t = timestep_embedding(t, self.class_emb.embedding_dim)
        emb = F.silu(self.time_mlp(emb_t.to(x.dtype)) + self.class_emb(cond.long()))
        h0 = self.conv_in(x)
        h1 = self.down1(h0, emb)
        h = self.downsample(h1)
        h = self.mid2(self.mid1(h, emb), emb)
        h = self.upsample(h)
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        h = self.up2(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
