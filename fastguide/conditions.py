"""The ``[cond | null]`` pairing of one batched conditional + unconditional forward (sampler, table builds, ONNX)."""
from __future__ import annotations

import torch


def null_batch(null_cond, cond: torch.Tensor) -> torch.Tensor:
    """The null condition for each of ``cond``'s B rows: ``null_cond`` is an int label (``cond`` [B] integer
    labels) or one condition's embedding (``cond`` [B, ...]; a [B, ...] tensor is taken as it is)."""
    if isinstance(null_cond, torch.Tensor):
        null = null_cond.to(cond.device, cond.dtype)
        if null.shape == cond.shape[1:]:
            return null.unsqueeze(0).expand(cond.shape[0], *null.shape)
        if null.shape == cond.shape:
            return null
        raise ValueError(f"null_cond: expected shape {tuple(cond.shape[1:])} (one condition), got {tuple(null.shape)}")
    if cond.ndim != 1:
        raise ValueError("null_cond: conditions are tensors, so null_cond must be a tensor of one condition's shape")
    return torch.full_like(cond, int(null_cond))


def paired_conditions(cond: torch.Tensor, null_cond, cond_first: bool = True) -> torch.Tensor:
    """[2B] conditions of the batched forward: ``[cond | null]`` (``cond_first``) or ``[null | cond]``."""
    null = null_batch(null_cond, cond)
    return torch.cat([cond, null] if cond_first else [null, cond])
