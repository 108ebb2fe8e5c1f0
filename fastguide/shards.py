"""Many samples into shards, data-parallel over torchrun ranks, resumable.

    manifest = sample_shards(sampler, labels_of, out_dir, num=50_000, latent_shape=(4, 32, 32), request={...})

Sample i starts from the noise of seed ``seed + i`` (its per-step noise too, for stochastic solvers) and is
sampled in shard ``i // shard_size``, a fixed batch. Ranks take shards round-robin (shard k on rank k % world), so
every sample depends only on its seed and its shard, never on how many processes ran: world sizes 1, 2 and 3
write identical files (tested). Each shard is one safetensors file written atomically (samples, labels, indices,
seeds); ``manifest.json`` records the request (what was asked for: a rerun with another request is refused) and,
once every shard is on disk, the shard list. A killed or interrupted run, rerun with the same request, skips the
shards already written, so no index is missing or duplicated; Ctrl-C finishes the shard in progress first.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from fastguide.checks import check_int
from fastguide.interrupts import Interrupted, deferred_sigint
from fastguide.noise import seeded_noise
from fastguide.storage import atomic_save, atomic_write_text, read_safetensors
from fastguide.table_build import dist_barrier, dist_rank_world

MANIFEST = "manifest.json"
SHARD_FORMAT = "fastguide-sample-shard"
MANIFEST_FORMAT = "fastguide-sample-manifest-v1"


@dataclass(frozen=True)
class ShardLayout:
    """Which samples each shard holds: ``num`` samples, ``shard_size`` per shard (the last one shorter), sample i
    seeded by ``seed + i``."""

    num: int
    shard_size: int
    seed: int = 0

    def __post_init__(self):
        check_int(self.num, "num", low=1)
        check_int(self.shard_size, "shard_size", low=1)
        check_int(self.seed, "seed", low=0)

    @property
    def count(self) -> int:
        return -(-self.num // self.shard_size)

    def indices(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num))

    def path(self, out_dir: Path, k: int) -> Path:
        return out_dir / f"shard-{k:05d}.safetensors"


def request_fingerprint(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:16]


def _check_manifest(path: Path, request: dict, layout: ShardLayout) -> None:
    """An existing manifest must be for the same request and layout (a resumed run); anything else is refused."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"out: {path} is not a readable sample manifest ({e})") from None
    if old.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"out: {path} is not a fastguide sample manifest (format={old.get('format')!r})")
    mine = {"request": request, "num": layout.num, "shard_size": layout.shard_size, "seed": layout.seed}
    diff = sorted(k for k in mine if old.get(k) != mine[k])
    if diff:
        raise ValueError(f"out: {path.parent} holds samples of another request (different {', '.join(diff)}); "
                         "choose another --out or remove it")


def _shard_done(path: Path, k: int, layout: ShardLayout, fingerprint: str) -> bool:
    """A shard file written by this request with the indices it should hold (anything else is redone). Reads only
    the indices, not the samples."""
    if not path.is_file():
        return False
    try:
        tensors, meta = read_safetensors(path, "out", "sample shard", SHARD_FORMAT, keys=("indices",))
    except ValueError:
        return False
    want = torch.tensor(list(layout.indices(k)), dtype=torch.int64)
    return meta.get("request") == fingerprint and torch.equal(tensors.get("indices", torch.empty(0)), want)


def sample_shards(sampler, labels_of: Callable[[torch.Tensor], torch.Tensor], out_dir, *, num: int,
                  latent_shape, request: dict, shard_size: int = 256, seed: int = 0, device="cpu",
                  dtype=torch.float32, progress: bool = True) -> dict:
    """Sample ``num`` samples with ``sampler`` (a fastguide.Sampler) into ``out_dir``; returns the manifest.

    ``labels_of(indices [n] int64) -> conditions [n]`` gives each sample its condition from its index alone.
    ``latent_shape``: one sample's (C, H, W). ``request``: a JSON-able description of everything that decides the
    samples besides the layout (model, rule, scale, solver, steps, ...); it is stored in the manifest and a
    rerun into the same directory must match it. Inside an initialized torch.distributed process group the
    shards are shared round-robin over the ranks; rank 0 writes the manifest.
    """
    layout = ShardLayout(num, shard_size, seed)
    shape = tuple(check_int(n, "latent_shape", low=1) for n in latent_shape)
    try:
        request = json.loads(json.dumps(request))  # as the manifest will hold it (tuples become lists)
    except TypeError as e:
        raise TypeError(f"request: expected a JSON-able dict describing the samples ({e})") from None
    out = Path(out_dir)
    rank, world = dist_rank_world()
    manifest_path = out / MANIFEST
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if manifest_path.exists():
            _check_manifest(manifest_path, request, layout)
        else:
            _write_manifest(manifest_path, request, layout, shards=None)
    dist_barrier()
    if rank != 0:
        _check_manifest(manifest_path, request, layout)
    fingerprint = request_fingerprint({"request": request, "num": num, "shard_size": shard_size, "seed": seed})
    mine = [k for k in range(layout.count) if k % world == rank]
    todo = [k for k in mine if not _shard_done(layout.path(out, k), k, layout, fingerprint)]
    stochastic = sampler.solver.plan.stochastic
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", desc=f"sampling (rank {rank})",
               disable=not progress)
    done = 0
    with deferred_sigint() as stop:
        for k in todo:
            indices = torch.tensor(list(layout.indices(k)), dtype=torch.int64)
            seeds = [seed + int(i) for i in indices]
            noise = seeded_noise(seeds, shape, dtype=dtype, device=device)
            labels = labels_of(indices)
            x = sampler.sample(noise, labels.to(device), seeds=seeds if stochastic else None, progress=False)
            atomic_save({"samples": x.cpu(), "labels": labels.cpu(), "indices": indices,
                         "seeds": torch.tensor(seeds, dtype=torch.int64)}, layout.path(out, k),
                        {"format": SHARD_FORMAT, "request": fingerprint, "shard": k}, arg="out")
            done += 1
            bar.update(1)
            if stop:
                bar.close()
                raise Interrupted(done, out)
    bar.close()
    dist_barrier()
    manifest = {"shards": [layout.path(out, k).name for k in range(layout.count)]}
    if rank == 0:
        missing = [k for k in range(layout.count) if not _shard_done(layout.path(out, k), k, layout, fingerprint)]
        if missing:
            raise RuntimeError(f"out: shards {missing[:5]} are missing after every rank finished")
        manifest = _write_manifest(manifest_path, request, layout, shards=manifest["shards"])
    return manifest


def _write_manifest(path: Path, request: dict, layout: ShardLayout, shards) -> dict:
    manifest = {"format": MANIFEST_FORMAT, "request": request, "num": layout.num, "shard_size": layout.shard_size,
                "seed": layout.seed, "complete": shards is not None, "shards": shards or []}
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n", arg="out")
    return manifest


def iter_shards(out_dir, rank: int = 0, world: int = 1):
    """(k, samples, labels, indices) of each shard k with k % world == rank of a complete sample directory, in
    order (a rank's share, for statistics reduced over the ranks afterwards)."""
    out = Path(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"out: {out} has no {MANIFEST} (not a fastguide sample directory)")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise ValueError(f"out: {out} is not complete yet (rerun the same command to finish it)")
    for k in range(rank, len(manifest["shards"]), world):
        tensors = read_safetensors(out / manifest["shards"][k], "out", "sample shard", SHARD_FORMAT)[0]
        yield k, tensors["samples"], tensors["labels"], tensors["indices"]


def load_shards(out_dir) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(samples [N, ...], labels [N], indices [N]) of a complete sample directory, in index order."""
    parts = list(iter_shards(out_dir))
    samples, labels, indices = (torch.cat([p[i] for p in parts]) for i in (1, 2, 3))
    if not torch.equal(indices, torch.arange(indices.numel())):
        raise ValueError(f"out: {out_dir}'s shards do not hold indices 0..{indices.numel() - 1} exactly once")
    return samples, labels, indices
