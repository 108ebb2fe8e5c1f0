"""ReCFG ratio tables: a [K+1, T, *shape] array of R = E[m_c] / E[m_u] per condition, timestep and element.

Row K (the last) is the mean row, used for conditions not in the table when asked to.
``timesteps`` are the model-time values the rows were estimated at (training indices for discrete
schedules, flow time for flow models); a sampler timestep between two grid points is served by linear
interpolation of the two neighbouring rows (exact on grid points).
"""
from __future__ import annotations

import numpy as np
import torch

UNKNOWN_LABEL_RULES = ("error", "mean")


class RatioTable:
    def __init__(self, ratios: torch.Tensor, timesteps=None, *, has_mean_row: bool = True,
                 metadata: dict | None = None):
        if not isinstance(ratios, torch.Tensor):
            raise TypeError(f"ratios: expected a torch.Tensor [K, T, C, H, W], got {type(ratios).__name__}")
        if ratios.ndim < 3:
            raise ValueError(f"ratios: expected [K, T, *latent_shape] (>= 3 dims), got shape {tuple(ratios.shape)}")
        if not ratios.is_floating_point():
            raise TypeError(f"ratios: expected a floating tensor, got {ratios.dtype}")
        if has_mean_row and ratios.shape[0] < 2:
            raise ValueError("ratios: a table with a mean row needs at least 2 rows (one class + the mean row)")
        self.ratios = ratios
        self.has_mean_row = has_mean_row
        if timesteps is not None:
            ts = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
            if ts.ndim != 1 or ts.numel() != ratios.shape[1]:
                raise ValueError(f"timesteps: expected {ratios.shape[1]} values (the table's T), got shape {tuple(ts.shape)}")
            if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
                raise ValueError("timesteps: expected strictly increasing values")
            timesteps = ts
        self.timesteps = timesteps
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ shape facts
    @property
    def num_classes(self) -> int:
        return self.ratios.shape[0] - (1 if self.has_mean_row else 0)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.ratios.shape[2:])

    @property
    def nbytes(self) -> int:
        return self.ratios.numel() * self.ratios.element_size()

    # ------------------------------------------------------------------ lookups
    def rows_for(self, labels: torch.Tensor, unknown_label: str = "error") -> torch.Tensor:
        """Row index per label; labels outside [0, num_classes) raise, or map to the mean row if asked."""
        if unknown_label not in UNKNOWN_LABEL_RULES:
            raise ValueError(f"unknown_label: expected one of {UNKNOWN_LABEL_RULES}, got {unknown_label!r}")
        labels = labels.detach().to("cpu", torch.int64)
        outside = (labels < 0) | (labels >= self.num_classes)
        if bool(outside.any()):
            if unknown_label == "mean" and self.has_mean_row:
                return torch.where(outside, self.num_classes, labels)
            bad = labels[outside][:5].tolist()
            hint = " (or pass unknown_label='mean' to use the mean row)" if self.has_mean_row else ""
            raise ValueError(f"cond: labels {bad} are outside the ratio table's classes [0, {self.num_classes}){hint}")
        return labels

    def step_rows(self, sampler_timesteps, out_of_range: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
        """For each sampler timestep: the two table rows (i0, i1) around it and the lerp weight w.

        A table without timesteps is indexed by sampler step and must have exactly one row per step.
        """
        t = np.asarray(sampler_timesteps, dtype=np.float64).reshape(-1)
        if self.timesteps is None:
            if len(t) != self.ratios.shape[1]:
                raise ValueError(f"table: has {self.ratios.shape[1]} timestep rows but the solver has {len(t)} steps "
                                 "(a table without timesteps is indexed by sampler step)")
            idx = np.arange(len(t))
            return torch.from_numpy(np.stack([idx, idx], 1)), torch.zeros(len(t), dtype=torch.float64)
        grid = self.timesteps.numpy()
        lo, hi = grid[0], grid[-1]
        if out_of_range == "clamp":
            t = np.clip(t, lo, hi)
        elif out_of_range != "error":
            raise ValueError(f"out_of_range: expected 'error' or 'clamp', got {out_of_range!r}")
        outside = (t < lo - 1e-9 * max(1.0, abs(lo))) | (t > hi + 1e-9 * max(1.0, abs(hi)))
        if outside.any():
            raise ValueError(f"table: sampler timesteps {t[outside][:5].tolist()} are outside the table's range "
                             f"[{lo:g}, {hi:g}] (rebuild the table on a wider grid, or pass out_of_range='clamp')")
        t = np.clip(t, lo, hi)
        i1 = np.clip(np.searchsorted(grid, t, side="left"), 0, len(grid) - 1)
        exact = grid[i1] == t
        i0 = np.where(exact, i1, np.maximum(i1 - 1, 0))
        span = grid[i1] - grid[i0]
        w = np.where(span > 0, (t - grid[i0]) / np.where(span > 0, span, 1.0), 0.0)
        return torch.from_numpy(np.stack([i0, i1], 1).astype(np.int64)), torch.from_numpy(w)

    def __repr__(self):
        return (f"RatioTable(classes={self.num_classes}, T={self.ratios.shape[1]}, shape={self.latent_shape}, "
                f"dtype={self.ratios.dtype})")
