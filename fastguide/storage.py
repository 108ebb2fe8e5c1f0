"""safetensors files: one checked reader and one atomic, durable writer for everything fastguide saves (ratio
tables and sums, the digits assets, training checkpoints). No pickle anywhere."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def read_safetensors(path, arg: str, what: str, fmt: str | None = None, hint: str = ""
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file in one pass. A missing or unreadable file, or (with ``fmt``) a
    file whose ``format`` metadata is not ``fmt``, is an error naming ``arg`` and ``what`` the file should be."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: {what} file {path} not found{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{arg}: {path} is not a readable safetensors file ({e})") from None
    if fmt is not None and meta.get("format") != fmt:
        raise ValueError(f"{arg}: {path} is not a fastguide {what} (format={meta.get('format')!r}, expected {fmt!r})")
    return tensors, meta


def atomic_save(tensors: dict[str, torch.Tensor], path, metadata: dict) -> None:
    """Write to a temporary file next to ``path``, fsync, then rename over it: a killed writer leaves the old
    file (or none), never a truncated one. Metadata values are written as strings."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"path: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in metadata.items()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
