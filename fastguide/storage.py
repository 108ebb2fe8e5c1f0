"""safetensors files: one checked reader and one atomic, durable writer for everything fastguide saves (ratio
tables and sums, the digits assets, training checkpoints). No pickle anywhere.

Saved files are byte-identical for identical content: safetensors itself writes its header's keys (the
metadata and the tensor index) in no fixed order, so :func:`safetensors_bytes` re-writes the header with
sorted keys (the tensor data and its offsets are untouched; any safetensors reader reads the result).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def read_safetensors(path, arg: str, what: str, fmt: str | None = None, hint: str = "", keys=None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file in one pass (``keys``: only those of its tensors that it has). A
    missing or unreadable file, or (with ``fmt``) a file whose ``format`` metadata is not ``fmt``, is an error naming
    ``arg`` and ``what`` the file should be."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{arg}: {what} file {path} not found{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys() if keys is None or k in keys}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{arg}: {path} is not a readable safetensors file ({e})") from None
    if fmt is not None and meta.get("format") != fmt:
        raise ValueError(f"{arg}: {path} is not a fastguide {what} (format={meta.get('format')!r}, expected {fmt!r})")
    return tensors, meta


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """The safetensors serialization of ``tensors`` with string ``metadata``, its header keys sorted."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                metadata={str(k): str(v) for k, v in metadata.items()})
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def atomic_save(tensors: dict[str, torch.Tensor], path, metadata: dict, arg: str = "path") -> None:
    """Write to a temporary file next to ``path``, fsync, then rename over it: a killed writer leaves the old
    file (or none), never a truncated one."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata), arg)


def atomic_write_text(path, text: str, arg: str = "path") -> None:
    """A text file (a JSON manifest) written like :func:`atomic_save`."""
    atomic_write_bytes(path, text.encode(), arg)


def atomic_write_bytes(path, data: bytes, arg: str = "path") -> None:
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise FileNotFoundError(f"{arg}: directory {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(str(directory) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def metadata_field(meta: dict, key: str, parse, path, arg: str = "path"):
    """``meta[key]`` parsed by ``parse`` (int, float, json.loads, ...); a missing or malformed value is a
    ValueError naming the file and the key."""
    if key not in meta:
        raise ValueError(f"{arg}: {path} has no {key!r} metadata")
    try:
        return parse(meta[key])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{arg}: {path} has a malformed {key!r} metadata value {meta[key]!r} ({e})") from None


def check_metadata_agrees(meta: dict, facts: dict, path, arg: str = "path") -> None:
    """Refuse metadata that contradicts the tensors: ``facts`` maps a key to (parse, the tensors' value); a key
    the file has must parse to that value."""
    for key, (parse, actual) in facts.items():
        if key in meta and metadata_field(meta, key, parse, path, arg) != actual:
            raise ValueError(f"{arg}: {path} is inconsistent ({key} metadata {meta[key]!r} vs the tensors' {actual!r})")
