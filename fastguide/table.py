"""ReCFG ratio tables: storage and lookup.

A table is a [K+1, T, *latent_shape] array of ratios R[c, t] between the conditional and unconditional
model outputs m_c, m_u (raw outputs, in the model's own parametrization: the guided step combines raw
outputs), estimated over x_t ~ q_t(x_t | c), i.e. dataset images of condition c forward-noised to t
(:mod:`fastguide.table_build` builds them; its docstring has the two estimators).

Row K (the last) is the mean row, estimated from the sums pooled over all conditions, for conditions
not in the table when asked to. ``timesteps`` are the model-time values the rows were estimated at
(training indices for discrete schedules); a sampler timestep between two grid points is served by linear
interpolation of the two neighbouring rows (exact on grid points).

A table is stored as a safetensors file (tensors ``ratios`` and ``timesteps``, string metadata with its build
facts); docs/tables.md has the details.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from fastguide.checks import count_non_finite
from fastguide.storage import atomic_save, check_metadata_agrees, metadata_field, read_safetensors

UNKNOWN_LABEL_RULES = ("error", "mean")
STORAGE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                  "bfloat16": torch.bfloat16}
TABLE_FORMAT = "fastguide.ratio_table"
FORMAT_VERSION = 1
STEP_ROWS_MEMO = 64  # sampler timestep grids whose table rows a table keeps
# Metadata a table writes itself; a caller's metadata may not redefine these.
RESERVED_KEYS = {"format", "format_version", "estimator", "schedule_fingerprint", "num_train_timesteps", "timesteps",
                 "num_classes", "has_mean_row", "samples_per_class", "latent_shape", "dtype", "delta", "clamp",
                 "near_zero_count", "clamped_count", "elements", "seed", "model_fingerprint", "data_fingerprint"}


# ====================================================================== the table
class RatioTable:
    """``ratios`` [K (+1 mean row), T, *latent_shape]; ``timesteps`` [T] the model times of its rows (None: one
    row per sampler step); ``metadata``: str -> str build facts (see docs/tables.md)."""

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
                raise ValueError(f"timesteps: expected {ratios.shape[1]} values (the table's T), "
                                 f"got shape {tuple(ts.shape)}")
            if ts.numel() > 1 and not bool((ts[1:] > ts[:-1]).all()):
                raise ValueError("timesteps: expected strictly increasing values")
            timesteps = ts
        self.timesteps = timesteps
        self.metadata = dict(metadata or {})
        self._step_rows_memo: dict = {}  # (sampler timesteps, this grid) -> step_rows' result

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

    @property
    def estimator(self) -> str | None:
        return self.metadata.get("estimator")

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
        key = None
        if isinstance(sampler_timesteps, torch.Tensor):  # a plan's timesteps: the same tensor call after call
            grid = self.timesteps  # the rows depend on both grids: each by identity and in-place version
            key = (id(sampler_timesteps), sampler_timesteps._version, out_of_range, id(grid),
                   None if grid is None else grid._version, self.ratios.shape[1])
            hit = self._step_rows_memo.get(key)
            if hit is not None and hit[0] is sampler_timesteps and hit[1] is grid:
                return hit[2]
        result = self._step_rows(sampler_timesteps, out_of_range)
        if key is not None:
            if len(self._step_rows_memo) >= STEP_ROWS_MEMO:
                self._step_rows_memo.clear()
            self._step_rows_memo[key] = (sampler_timesteps, self.timesteps, result)
        return result

    def _step_rows(self, sampler_timesteps, out_of_range: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = np.asarray(sampler_timesteps, dtype=np.float64).reshape(-1)
        if self.timesteps is None:
            if len(t) != self.ratios.shape[1]:
                raise ValueError(f"table: has {self.ratios.shape[1]} timestep rows but the solver has {len(t)} steps "
                                 "(a table without timesteps is indexed by sampler step)")
            idx = np.arange(len(t))
            return torch.from_numpy(np.stack([idx, idx], 1)), torch.zeros(len(t), dtype=torch.float64)
        return grid_rows(self.timesteps.numpy(), t, out_of_range)

    def lookup(self, labels: torch.Tensor, sampler_timesteps, unknown_label: str = "error",
               out_of_range: str = "error") -> torch.Tensor:
        """[S, B, *latent_shape] float64 ratios per sampler timestep and label (interpolated; for inspection)."""
        rows = self.rows_for(labels, unknown_label)
        steps, w = self.step_rows(sampler_timesteps, out_of_range)
        table = self.ratios.detach().cpu().double()
        r0, r1 = table[rows][:, steps[:, 0]], table[rows][:, steps[:, 1]]  # [B, S, ...]
        wv = w.view(1, -1, *([1] * len(self.latent_shape)))
        return (r0 + wv * (r1 - r0)).transpose(0, 1)

    # ------------------------------------------------------------------ checks
    def check_compatible(self, schedule=None, latent_shape=None) -> None:
        """Raise ValueError if the table was built for another schedule or latent shape."""
        if latent_shape is not None and tuple(int(s) for s in latent_shape) != self.latent_shape:
            raise ValueError(f"table: ratio table is for latents of shape {self.latent_shape}, "
                             f"expected {tuple(int(s) for s in latent_shape)}")
        if schedule is None:
            return
        if not hasattr(schedule, "fingerprint"):
            raise TypeError(f"schedule: expected a fastguide.NoiseSchedule, got {type(schedule).__name__}")
        built_for = self.metadata.get("schedule_fingerprint")
        if built_for is None:
            raise ValueError("table: has no schedule fingerprint, so it cannot be checked against the schedule "
                             "(load it without schedule= to skip the check)")
        if built_for != schedule.fingerprint():
            n = self.metadata.get("num_train_timesteps", "?")
            raise ValueError(f"table: built for schedule {built_for} (num_train_timesteps={n}), but the given schedule "
                             f"is {schedule.fingerprint()} (num_train_timesteps={schedule.num_train_timesteps}); "
                             "rebuild the table for this schedule")

    # ------------------------------------------------------------------ storage
    def save(self, path, metadata: dict | None = None) -> None:
        """Write a safetensors file: tensors ``ratios`` (and ``timesteps``), string metadata (atomic write).
        A table with NaN / inf ratios is refused."""
        bad = count_non_finite(self.ratios)
        if bad:
            raise ValueError(f"ratios: {bad} of {self.ratios.numel()} entries are NaN/inf; refusing to save {path}")
        meta = {k: v for k, v in self.metadata.items() if k not in ("format", "format_version")}
        meta.update(_user_metadata(metadata, meta))
        meta.update(format=TABLE_FORMAT, format_version=str(FORMAT_VERSION), has_mean_row=flag(self.has_mean_row),
                    num_classes=str(self.num_classes), latent_shape=json.dumps(list(self.latent_shape)),
                    dtype=dtype_name(self.ratios.dtype))
        tensors = {"ratios": self.ratios}
        if self.timesteps is not None:
            tensors["timesteps"] = self.timesteps.double()
            meta["timesteps"] = json.dumps(plain_numbers(self.timesteps))
        atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path, schedule=None, latent_shape=None, device="cpu", dtype=None) -> "RatioTable":
        """Load a table written by :meth:`save`; with ``schedule`` / ``latent_shape``, check it was built for them."""
        tensors, meta = read_versioned(path, TABLE_FORMAT, "ratio table")
        if "ratios" not in tensors:
            raise ValueError(f"path: {path} has no 'ratios' tensor")
        ratios, timesteps = tensors["ratios"], tensors.get("timesteps")
        has_mean_row = _check_table_metadata(meta, ratios, timesteps, path)
        bad = count_non_finite(ratios)
        if bad:
            raise ValueError(f"path: {path} holds {bad} NaN/inf ratios of {ratios.numel()}; rebuild the table")
        if dtype is not None:
            ratios = ratios.to(storage_dtype(dtype))
        try:
            table = cls(ratios.to(device), timesteps, has_mean_row=has_mean_row, metadata=meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"path: {path} is not a valid ratio table ({e})") from None
        table.check_compatible(schedule, latent_shape)
        return table

    # ------------------------------------------------------------------ inspection
    def timestep_stats(self, quantiles=(0.01, 0.25, 0.5, 0.75, 0.99), include_mean_row: bool = False) -> list[dict]:
        """Per table timestep: mean, std, min, max and quantiles of the ratios over conditions and elements."""
        rows = self.ratios if include_mean_row or not self.has_mean_row else self.ratios[:-1]
        data = rows.detach().cpu().double().transpose(0, 1).reshape(self.ratios.shape[1], -1).numpy()
        out = []
        for k, vals in enumerate(data):
            q = np.quantile(vals, quantiles)
            entry = {"t": None if self.timesteps is None else float(self.timesteps[k]), "mean": float(vals.mean()),
                     "std": float(vals.std()), "min": float(vals.min()), "max": float(vals.max())}
            entry.update({f"q{round(p * 100):02d}": float(v) for p, v in zip(quantiles, q)})
            out.append(entry)
        return out

    def __repr__(self):
        est = f", estimator={self.estimator!r}" if self.estimator else ""
        return (f"RatioTable(classes={self.num_classes}, T={self.ratios.shape[1]}, shape={self.latent_shape}, "
                f"dtype={self.ratios.dtype}{est})")


# ====================================================================== storage helpers
def _check_table_metadata(meta: dict, ratios: torch.Tensor, timesteps, path) -> bool:
    """Refuse metadata that contradicts the tensors it describes; returns has_mean_row."""
    flag_text = meta.get("has_mean_row", "1")
    if flag_text not in ("0", "1"):
        raise ValueError(f"path: {path} has has_mean_row metadata {flag_text!r}; expected '0' or '1'")
    has_mean_row = flag_text == "1"
    facts = {"num_classes": (int, ratios.shape[0] - has_mean_row),
             "latent_shape": (json.loads, list(ratios.shape[2:])), "dtype": (str, dtype_name(ratios.dtype)),
             "timesteps": (json.loads, None if timesteps is None else plain_numbers(timesteps))}
    check_metadata_agrees(meta, facts, path)
    return has_mean_row


def read_versioned(path, fmt: str, what: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a fastguide file of format ``fmt`` (a ratio table or ratio sums) whose format
    version this fastguide reads."""
    tensors, meta = read_safetensors(path, "path", what, fmt)
    version = metadata_field(meta, "format_version", int, path) if "format_version" in meta else 0
    if version > FORMAT_VERSION:
        raise ValueError(f"path: {path} has format version {version}; this fastguide reads <= {FORMAT_VERSION}")
    return tensors, meta


def storage_dtype(dtype) -> torch.dtype:
    """A table storage dtype: a name or a torch dtype from :data:`STORAGE_DTYPES`."""
    if isinstance(dtype, str):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        return STORAGE_DTYPES[dtype]
    if dtype not in STORAGE_DTYPES.values():
        raise ValueError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    return dtype


def _user_metadata(metadata, existing: dict) -> dict:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata: expected a dict of str -> str, got {type(metadata).__name__}")
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or isinstance(v, (dict, list, tuple, set)) or v is None:
            raise TypeError(f"metadata: expected str keys and str/int/float/bool values, got {k!r}: {v!r}")
        v = str(v)
        if k in RESERVED_KEYS and k in existing and existing[k] != v:
            raise ValueError(f"metadata: key {k!r} is written by the table itself ({existing[k]!r}); use another name")
        out[k] = v
    return out


def plain_numbers(t: torch.Tensor) -> list:
    """A tensor's values as a list of Python ints where integral, floats otherwise (for metadata and display)."""
    return [int(v) if float(v).is_integer() else float(v) for v in t.tolist()]


def flag(b: bool) -> str:
    """A bool as metadata: "1" or "0"."""
    return "1" if b else "0"


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype's name without the "torch." prefix ("float32")."""
    return str(dtype).removeprefix("torch.")


def grid_rows(grid: np.ndarray, times, out_of_range: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
    """For each model time: the two rows (i0, i1) of an increasing time ``grid`` around it and the lerp weight w
    between them (0 on grid points); times outside the grid raise, or with ``out_of_range='clamp'`` take the
    nearest end."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
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
