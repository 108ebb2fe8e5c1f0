"""ReCFG ratio tables: build (accumulate sums) and finalize (estimators); :mod:`fastguide.table` stores and
looks up the result.

A table's ratios R[c, t] between the conditional and unconditional model outputs m_c, m_u are estimated over
x_t ~ q_t(x_t | c), i.e. dataset images of condition c forward-noised to t:

    "paper":          R = E[m_c] / E[m_u]                (arXiv 2410.18737)
    "least_squares":  R = E[m_c m_u] / E[m_u^2]          (the authors' released code)

Building keeps float64 sums (sum m_c, sum m_u, sum m_c m_u, sum m_u^2, count) per condition, timestep and
element (:class:`RatioSums`); both estimators are finalized from the same sums, the mean row from the sums
pooled over all conditions. The noise for the j-th selected image of condition c comes from its own generator
seeded by (seed, c, j) (:func:`image_noise`), so the sums do not depend on the batch size, on the dataset order,
or on how the work is sharded over ``torch.distributed`` ranks, and a resumed build replays exactly.
docs/tables.md has the details.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastguide.checks import check_int, check_lo_hi, check_model_output, count_non_finite
from fastguide.conditions import paired_conditions
from fastguide.interrupts import Interrupted, deferred_sigint
from fastguide.kernels.reference import compute_dtype_for
from fastguide.schedule import FlowSchedule
from fastguide.storage import atomic_save, check_metadata_agrees
from fastguide.table import FORMAT_VERSION, RatioTable, flag, read_versioned, storage_dtype

ESTIMATORS = ("least_squares", "paper")
SUMS_FORMAT = "fastguide.ratio_sums"
SUM_NAMES = ("sum_c", "sum_u", "sum_cu", "sum_uu")


# ====================================================================== the sums
class RatioSums:
    """Float64 sums per condition, timestep and element: the sufficient statistics of both estimators.

    ``sum_c, sum_u, sum_cu, sum_uu``: [K, T, *latent_shape] float64 (sum m_c, sum m_u, sum m_c m_u, sum m_u^2);
    ``count``: [K, T] int64; ``timesteps``: [T] ascending (int64 training indices, or float64 sigmas of a flow
    model's table); ``metadata``: str -> str build facts.
    """

    def __init__(self, sum_c, sum_u, sum_cu, sum_uu, count, timesteps, metadata: dict | None = None):
        self.sum_c, self.sum_u, self.sum_cu, self.sum_uu = sum_c, sum_u, sum_cu, sum_uu
        self.count = count
        ts = np.asarray(timesteps)
        self.timesteps = ts.astype(np.int64) if np.issubdtype(ts.dtype, np.integer) else ts.astype(np.float64)
        self.metadata = dict(metadata or {})
        shape = tuple(sum_c.shape)
        for name in SUM_NAMES:
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float64 or tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected a float64 tensor of shape {shape}")
        if len(shape) < 3 or tuple(count.shape) != shape[:2] or count.dtype != torch.int64:
            raise ValueError(f"count: expected an int64 tensor of shape {shape[:2]}, "
                             f"got {tuple(count.shape)} {count.dtype}")
        if self.timesteps.shape != (shape[1],):
            raise ValueError(f"timesteps: expected {shape[1]} values, got shape {self.timesteps.shape}")

    @classmethod
    def zeros(cls, num_classes: int, timesteps, latent_shape, device="cpu", metadata=None) -> "RatioSums":
        shape = (num_classes, len(timesteps), *latent_shape)
        sums = [torch.zeros(shape, dtype=torch.float64, device=device) for _ in SUM_NAMES]
        count = torch.zeros(shape[:2], dtype=torch.int64, device=device)
        return cls(*sums, count, timesteps, metadata)

    @property
    def num_classes(self) -> int:
        return self.sum_c.shape[0]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.sum_c.shape[2:])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{n: getattr(self, n) for n in SUM_NAMES}, "count": self.count}

    def all_reduce_(self, group=None) -> "RatioSums":
        """Sum the partial sums of all ranks of ``group`` in place (float64 / int64, so exact up to rounding)."""
        import torch.distributed as dist

        for t in self.tensors().values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return self

    # ------------------------------------------------------------------ estimators
    def finalize(self, estimator: str = "least_squares", *, delta: float = 1e-6, clamp=None,
                 dtype=torch.float32) -> RatioTable:
        """The ratio table (class rows + mean row) for ``estimator`` from these sums.

        Near-zero rule: where |denominator| < ``delta`` (the denominator as a mean: E[m_u] for "paper",
        E[m_u^2] for "least_squares"), R = 1 (plain CFG at that element). ``clamp=(lo, hi)`` then clips R.
        The counts of affected elements are in the table's metadata (near_zero_count, clamped_count).
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator!r}")
        delta = _check_delta(delta)
        clamp = _check_clamp(clamp)
        dtype = storage_dtype(dtype)
        if bool((self.count <= 0).any()):
            raise ValueError("sums: some (condition, timestep) cells have no samples; the build is incomplete")
        self.check_finite("sums:")
        num, den = (self.sum_c, self.sum_u) if estimator == "paper" else (self.sum_cu, self.sum_uu)
        num = torch.cat([num, num.sum(0, keepdim=True)]).cpu()
        den = torch.cat([den, den.sum(0, keepdim=True)]).cpu()
        count = torch.cat([self.count, self.count.sum(0, keepdim=True)]).cpu().double()
        count = count.view(*count.shape, *([1] * len(self.latent_shape)))
        ratios, near_zero, clamped = ratio_estimate(num / count, den / count, delta, clamp)
        meta = {k: v for k, v in self.metadata.items() if k not in ("format", "format_version", "batches_done",
                                                                  "batches_total", "build_key", "rank", "world_size")}
        meta.update(estimator=estimator, delta=repr(delta), clamp=json.dumps(clamp), near_zero_count=str(near_zero),
                    clamped_count=str(clamped), elements=str(ratios.numel()))
        return RatioTable(ratios.to(dtype), self.timesteps, has_mean_row=True, metadata=meta)

    def check_finite(self, where: str) -> None:
        """Raise if any sum is NaN / inf (a model that produced them was refused at accumulation; a file edited
        or damaged since would otherwise finalize into a NaN table)."""
        bad = {n: count_non_finite(getattr(self, n)) for n in SUM_NAMES}
        if any(bad.values()):
            listed = ", ".join(f"{n}: {k}" for n, k in bad.items() if k)
            raise ValueError(f"{where} NaN/inf sums ({listed} of {self.sum_c.numel()} entries each); rebuild them")

    # ------------------------------------------------------------------ storage
    def save(self, path, metadata: dict | None = None) -> None:
        self.check_finite(f"sums: refusing to save {path}:")
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta.update(format=SUMS_FORMAT, format_version=str(FORMAT_VERSION), num_classes=str(self.num_classes),
                    latent_shape=json.dumps(list(self.latent_shape)), timesteps=json.dumps(self.timesteps.tolist()))
        tensors = {**self.tensors(), "timesteps": torch.from_numpy(self.timesteps.copy())}
        atomic_save(tensors, path, meta)

    @classmethod
    def load(cls, path, device="cpu") -> "RatioSums":
        tensors, meta = read_versioned(path, SUMS_FORMAT, "ratio-sums / checkpoint")
        missing = [n for n in (*SUM_NAMES, "count", "timesteps") if n not in tensors]
        if missing:
            raise ValueError(f"path: {path} lacks tensors {missing}")
        facts = {"num_classes": (int, tensors["count"].shape[0]), "timesteps": (json.loads, tensors["timesteps"].tolist()),
                 "latent_shape": (json.loads, list(tensors["sum_c"].shape[2:]))}
        check_metadata_agrees(meta, facts, path)
        try:
            sums = cls(*[tensors[n].to(device) for n in SUM_NAMES], tensors["count"].to(device),
                       tensors["timesteps"].numpy(), meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"path: {path} holds inconsistent sums ({e})") from None
        sums.check_finite(f"path: {path} holds")
        return sums

    def __repr__(self):
        return (f"RatioSums(classes={self.num_classes}, T={len(self.timesteps)}, shape={self.latent_shape}, "
                f"samples={int(self.count.sum())})")


def ratio_estimate(num: torch.Tensor, den: torch.Tensor, delta: float, clamp=None) -> tuple[torch.Tensor, int, int]:
    """R = num / den with the near-zero rule (|den| < delta -> 1) and an optional clamp; also the two counts."""
    near_zero = den.abs() < delta
    ratios = torch.where(near_zero, torch.ones_like(num), num / torch.where(near_zero, torch.ones_like(den), den))
    clamped = 0
    if clamp is not None:
        lo, hi = clamp
        clamped = int(((ratios < lo) | (ratios > hi)).sum())
        ratios = ratios.clamp(lo, hi)
    return ratios, int(near_zero.sum()), clamped


# ====================================================================== building
def image_noise_seed(seed: int, cond_id: int, index: int) -> int:
    """The generator seed of the j-th (``index``) selected image of condition ``cond_id`` (well mixed, < 2**63)."""
    state = np.random.SeedSequence([int(seed), int(cond_id), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 32 | int(state[1])) % (2**63))


def image_noise(seed: int, cond_id: int, index: int, num_timesteps: int, shape) -> torch.Tensor:
    """[T, *shape] float64 standard normal noise of one image, row k for the k-th (ascending) table timestep."""
    gen = torch.Generator().manual_seed(image_noise_seed(seed, cond_id, index))
    return torch.randn((num_timesteps, *shape), generator=gen, dtype=torch.float64)


def select_per_class(labels: torch.Tensor, num_classes: int, samples_per_class: int):
    """The first ``samples_per_class`` images of each condition: (dataset indices ascending, their ids, their
    rank within their condition). Raises if a condition has too few images."""
    lab = labels.detach().cpu().to(torch.int64).numpy()
    counts = np.bincount(lab, minlength=num_classes)
    short = [(c, int(counts[c])) for c in range(num_classes) if counts[c] < samples_per_class]
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in short[:5])
        raise ValueError(f"samples_per_class: {samples_per_class} images per class requested, but {listed}"
                         f"{' ...' if len(short) > 5 else ''}")
    rank = np.empty_like(lab)
    seen = np.zeros(num_classes, dtype=np.int64)
    for i, c in enumerate(lab):  # rank of each image within its class, in dataset order
        rank[i] = seen[c]
        seen[c] += 1
    keep = np.nonzero(rank < samples_per_class)[0]
    return keep, lab[keep], rank[keep]


def accumulate_ratio_sums(model, schedule, images, labels, *, timesteps, num_classes, samples_per_class, null_cond,
                          batch_size=256, seed=0, device="cpu", progress=True, checkpoint=None, checkpoint_every=20,
                          cond_first=True, model_fingerprint=None) -> RatioSums:
    """Forward-noise the first ``samples_per_class`` images of each condition at every table timestep and sum
    the model's conditional / unconditional outputs per condition (float64, never mixing conditions).

    model(x [2B, *shape], t [2B] float training index, cond [2B] long) -> [2B, *shape]; one forward per
    (image batch, timestep) with the labels ``[labels | null_cond]`` (``cond_first``) or ``[null | labels]``.
    ``labels`` are integer condition ids in [0, num_classes). Inside ``torch.distributed`` (initialized
    process group) image batches are shared round-robin over the ranks and the sums all-reduced.
    ``checkpoint``: a path for periodic partial sums (every ``checkpoint_every`` image batches, atomic);
    if it exists and matches this build, the build resumes from it (per rank: ``PATH.rank{r}of{w}``). Ctrl-C
    finishes the image batch in progress, writes the checkpoint (when there is one) and raises
    :class:`fastguide.interrupts.Interrupted`; a second Ctrl-C stops at once, keeping the last checkpoint.
    """
    images, labels, grid = _check_build_inputs(model, schedule, images, labels, timesteps, num_classes,
                                               samples_per_class, null_cond, batch_size, checkpoint_every, seed)
    rank, world = dist_rank_world()
    keep, ids, ranks = select_per_class(labels, num_classes, samples_per_class)
    mine = [np.arange(i, min(i + batch_size, len(keep))) for i in range(0, len(keep), batch_size)][rank::world]
    shape = tuple(images.shape[1:])
    meta = _build_metadata(schedule, images[torch.from_numpy(keep)], ids, samples_per_class, seed, cond_first,
                           model, model_fingerprint)
    build_key = _build_key(meta, grid, num_classes, shape, batch_size, rank, world)
    ckpt_path = None if checkpoint is None else _rank_path(checkpoint, rank, world)
    sums, done = _resume_or_zeros(ckpt_path, build_key, num_classes, grid, shape, device, meta)
    plan = _NoisingPlan(schedule, grid, images.dtype, torch.device(device), int(null_cond), bool(cond_first), int(seed))
    per_batch = [len(b) * len(grid) for b in mine]
    bar = tqdm(total=sum(per_batch), initial=sum(per_batch[:done]), unit="img", desc="ratio table",
               disable=not progress or rank != 0, smoothing=0.1)
    with torch.no_grad(), deferred_sigint() as interrupted, bar:
        for b in range(done, len(mine)):
            sel = mine[b]
            plan.accumulate_batch(sums, model, images[torch.from_numpy(keep[sel])], ids[sel], ranks[sel], b,
                                  on_forward=bar.update)
            last = (b + 1) % checkpoint_every == 0 or b + 1 == len(mine)
            if ckpt_path is not None and (last or interrupted):
                _write_checkpoint(sums, ckpt_path, b + 1, len(mine), build_key, rank, world)
            if interrupted:
                raise Interrupted(b + 1, ckpt_path)
    if world > 1:
        sums.all_reduce_()
    return sums


def noising_kind(schedule) -> str:
    return "flow" if isinstance(schedule, FlowSchedule) else "discrete"


class _NoisingPlan:
    """The fixed part of a build: grid, noising coefficients, dtypes, device and the forward layout."""

    def __init__(self, schedule, grid, model_dtype, device, null_cond: int, cond_first: bool, seed: int):
        if isinstance(schedule, FlowSchedule):
            self.signal, self.noise_scale = schedule.noising(grid)
        else:
            abar = schedule.alphas_cumprod.double()[torch.from_numpy(grid)]
            self.signal, self.noise_scale = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
        self.grid = grid
        self.model_dtype, self.device = model_dtype, device
        self.t_dtype = compute_dtype_for(model_dtype)
        self.null_cond, self.cond_first, self.seed = null_cond, cond_first, seed

    def accumulate_batch(self, sums: RatioSums, model, x0, ids, ranks, batch: int, on_forward=None) -> None:
        """Noise one image batch at every grid timestep; one 2B-row forward per timestep; add into ``sums``."""
        x0 = x0.to(self.device, torch.float64)
        cls_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(self.device)
        noise = torch.stack([image_noise(self.seed, c, j, len(self.grid), x0.shape[1:]) for c, j in zip(ids, ranks)], 1)
        cond2 = paired_conditions(cls_ids, self.null_cond, self.cond_first)
        for k, t in enumerate(self.grid.tolist()):
            x_t = (self.signal[k] * x0 + self.noise_scale[k] * noise[k].to(self.device)).to(self.model_dtype)
            x2 = torch.cat([x_t, x_t])
            out = model(x2, torch.full((x2.shape[0],), float(t), dtype=self.t_dtype, device=self.device), cond2)
            _accumulate(sums, k, out, x2, cls_ids, self.cond_first, batch, float(t))
            if on_forward is not None:
                on_forward(len(ids))


def _build_metadata(schedule, selected_images, ids, samples_per_class, seed, cond_first, model, model_fingerprint):
    meta = {"schedule_fingerprint": schedule.fingerprint(), "noising": noising_kind(schedule),
            "samples_per_class": str(samples_per_class), "seed": str(int(seed)),
            "data_fingerprint": _data_fingerprint(selected_images, ids), "cond_first": flag(cond_first)}
    if not isinstance(schedule, FlowSchedule):
        meta["num_train_timesteps"] = str(schedule.num_train_timesteps)
    if model_fingerprint is None and isinstance(model, torch.nn.Module):
        model_fingerprint = module_fingerprint(model)
    if model_fingerprint:
        meta["model_fingerprint"] = str(model_fingerprint)
    return meta


def _accumulate(sums: RatioSums, k: int, out, x2, cls_ids, cond_first: bool, batch: int, t: float) -> None:
    check_model_output(out, x2)
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"model: output contained NaN/inf (image batch {batch}, t={t:g})")
    half = x2.shape[0] // 2
    m_c, m_u = (out[:half], out[half:]) if cond_first else (out[half:], out[:half])
    # index_add by condition id: conditions sharing a batch land in their own rows, never mixed.
    sums.sum_c[:, k].index_add_(0, cls_ids, m_c)
    sums.sum_u[:, k].index_add_(0, cls_ids, m_u)
    sums.sum_cu[:, k].index_add_(0, cls_ids, m_c * m_u)
    sums.sum_uu[:, k].index_add_(0, cls_ids, m_u * m_u)
    sums.count[:, k].index_add_(0, cls_ids, torch.ones_like(cls_ids))


# ---------------------------------------------------------------------- checkpoint / resume
def _rank_path(path, rank: int, world: int) -> Path:
    path = Path(path)
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}of{world}")


def _resume_or_zeros(path, build_key, num_classes, grid, shape, device, meta) -> tuple[RatioSums, int]:
    if path is None or not Path(path).exists():
        return RatioSums.zeros(num_classes, grid, shape, device, meta), 0
    sums = RatioSums.load(path, device=device)
    if sums.metadata.get("build_key") != build_key:
        raise ValueError(f"checkpoint: {path} belongs to a different build (other model, data, schedule, timesteps, "
                         "seed, batch size or number of ranks); delete it or pick another --checkpoint path")
    done = int(sums.metadata["batches_done"])
    sums.metadata = dict(meta)
    return sums, done


def _write_checkpoint(sums: RatioSums, path, done: int, total: int, build_key: str, rank: int, world: int) -> None:
    sums.save(path, metadata={"batches_done": str(done), "batches_total": str(total), "build_key": build_key,
                              "rank": str(rank), "world_size": str(world)})


def _build_key(meta: dict, grid, num_classes, shape, batch_size, rank, world) -> str:
    facts = {**meta, "timesteps": grid.tolist(), "num_classes": num_classes, "latent_shape": list(shape),
             "batch_size": batch_size, "rank": rank, "world_size": world}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------------- fingerprints
def module_fingerprint(model: torch.nn.Module) -> str:
    """A short sha256 of a module's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _data_fingerprint(images: torch.Tensor, ids: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    h.update(images.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- validation
def _check_build_inputs(model, schedule, images, labels, timesteps, num_classes, samples_per_class, null_cond,
                        batch_size, checkpoint_every, seed):
    if not callable(model):
        raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
    flow = isinstance(schedule, FlowSchedule)
    if not flow and (not hasattr(schedule, "alphas_cumprod") or not hasattr(schedule, "fingerprint")):
        raise TypeError(f"schedule: expected a fastguide.NoiseSchedule (or a FlowSchedule for flow models), got "
                        f"{type(schedule).__name__}")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim < 2:
        raise TypeError("images: expected a floating tensor [M, *latent_shape]")
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(np.asarray(labels))
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected a 1-D integer tensor [M], got shape {tuple(labels.shape)} {labels.dtype}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels: expected {images.shape[0]} labels (one per image), got {labels.shape[0]}")
    for name, v in (("num_classes", num_classes), ("samples_per_class", samples_per_class),
                    ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        check_int(v, name, 1)
    if num_classes > labels.numel():  # every condition needs images (and a huge count must not allocate)
        raise ValueError(f"num_classes: {num_classes} conditions, but only {labels.numel()} labelled images")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise ValueError(f"labels: expected condition ids in [0, {num_classes}) (num_classes), got {bad[:5].tolist()}")
    if isinstance(null_cond, bool) or not isinstance(null_cond, (int, np.integer)):
        raise TypeError(f"null_cond: expected the integer null label, got {type(null_cond).__name__} "
                        "(for embedding conditions wrap the model with fastguide.adapters.ConditionIdModel)")
    check_int(seed, "seed", 0)
    grid = _check_sigma_grid(timesteps) if flow else _check_grid(timesteps, schedule.num_train_timesteps)
    return images, labels, grid


def _check_sigma_grid(timesteps) -> np.ndarray:
    """A flow table's grid: distinct sigmas in (0, 1] (sigma = 0 is the data itself: no guidance to estimate)."""
    arr = np.asarray(timesteps)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"timesteps: expected a non-empty 1-D grid of sigmas, got shape {arr.shape} {arr.dtype}")
    grid = np.sort(arr.astype(np.float64))
    if not np.all(np.isfinite(grid)) or grid[0] <= 0 or grid[-1] > 1:
        raise ValueError(f"timesteps: expected a flow model's sigmas in (0, 1], got {grid[0]:g}..{grid[-1]:g}")
    if np.any(grid[1:] == grid[:-1]):
        raise ValueError("timesteps: expected distinct values, got duplicates")
    return grid


def _check_grid(timesteps, num_train: int) -> np.ndarray:
    arr = np.asarray(timesteps)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"timesteps: expected a non-empty 1-D grid of training indices, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError("timesteps: expected integer training indices")
    grid = np.sort(arr.astype(np.int64))
    if grid[0] < 0 or grid[-1] >= num_train:
        raise ValueError(f"timesteps: expected training indices in [0, {num_train - 1}], got {grid[0]}..{grid[-1]}")
    if np.any(grid[1:] == grid[:-1]):
        raise ValueError("timesteps: expected distinct values, got duplicates")
    return grid


def _check_delta(delta) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta < 0:
        raise ValueError(f"delta: expected a finite float >= 0, got {delta!r}")
    return float(delta)


def _check_clamp(clamp):
    if clamp is None:
        return None
    return list(check_lo_hi(clamp, "clamp", "None or a (lo, hi) pair"))


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def dist_barrier() -> None:
    """torch.distributed.barrier() inside an initialized process group; nothing in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
