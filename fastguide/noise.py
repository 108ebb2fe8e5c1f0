"""Seeded noise: each sample's x_T and per-step noise depend only on its own seed, never on its batch or device
(drawn on the CPU in float64 from one generator per sample, then moved and cast)."""
from __future__ import annotations

import torch

from fastguide.checks import check_seeds, check_shape

_STEP_NOISE_SALT = 0x9E3779B97F4A7C15


def seeded_noise(seeds, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[B, *shape] standard normal noise where row b depends only on seeds[b] (drawn on the CPU, so the
    same seed gives the same noise on every device)."""
    seeds, shape = check_seeds(seeds, None), check_shape(shape)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def step_noise(seeds, steps: int, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[S, B, *shape] per-step noise z of a stochastic solver; sample b's noise depends only on seeds[b] (and
    differs from its x_T: the seed is mixed first)."""
    derived = [(s * 6364136223846793005 + _STEP_NOISE_SALT) % (2**63) for s in check_seeds(seeds, None)]
    rows = [torch.randn((steps, *check_shape(shape)), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in derived]
    return torch.stack(rows, 1).to(device=device, dtype=dtype)
