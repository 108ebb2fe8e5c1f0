"""What fastguide saves: byte-identical files for identical content, and no NaN/inf or self-contradicting file is
written, loaded or finalized silently (tables, sums, checkpoints, the digits assets)."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fastguide as fg
from fastguide.cli import main
from fastguide.demo import digits
from fastguide.demo.train import DiffusionConfig, save_checkpoint
from fastguide.demo.unet import DigitsUNet
from fastguide.storage import atomic_save, safetensors_bytes
from fastguide.table_build import RatioSums

SUMS = digits.asset_path(digits.SUMS_FILE)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rewrite(src, dst, tensors=None, **meta_changes):
    """A copy of a safetensors file with some tensors or metadata changed (written by safetensors itself)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    meta.update(meta_changes)
    save_file(data, str(dst), metadata={k: v for k, v in meta.items() if v is not None})
    return dst


# ---------------------------------------------------------------------- byte-identical
def test_identical_content_gives_identical_bytes(tmp_path):
    sums = RatioSums.load(SUMS)
    table = sums.finalize("least_squares")
    model, ema = DigitsUNet(8), DigitsUNet(8)
    opt = torch.optim.AdamW(model.parameters())
    cfg = DiffusionConfig(channels=8)
    writers = {"table": lambda p: table.save(p, metadata={"b": "2", "a": "1"}),
               "sums": sums.save,
               "checkpoint": lambda p: save_checkpoint(p, 3, cfg, model, ema, opt, 1.5)}
    for name, write in writers.items():
        digests = set()
        for k in range(4):
            path = tmp_path / f"{name}{k}.safetensors"
            write(path)
            digests.add(sha(path))
        assert len(digests) == 1, name
    # the same metadata in another insertion order is the same file too
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    atomic_save({"x": torch.arange(3.0), "y": torch.ones(2)}, a, {"k1": "v", "k2": "w"})
    atomic_save({"y": torch.ones(2), "x": torch.arange(3.0)}, b, {"k2": "w", "k1": "v"})
    assert sha(a) == sha(b)


def test_the_canonical_header_is_a_valid_safetensors_file(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "h": torch.randn(2).half()}
    path = tmp_path / "c.safetensors"
    path.write_bytes(safetensors_bytes(tensors, {"z": "1", "m": "ünïcode"}))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"z": "1", "m": "ünïcode"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v)
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data 8-byte aligned


# ---------------------------------------------------------------------- non-finite values
def nan_sums() -> RatioSums:
    sums = RatioSums.load(SUMS)
    sums.sum_uu[1, 2, 0, 3, 4] = float("inf")
    sums.sum_c[0, 0, 0, 0, 0] = float("nan")
    return sums


def test_non_finite_sums_are_refused_at_finalize_and_save(tmp_path):
    with pytest.raises(ValueError, match=r"^sums: NaN/inf sums \(sum_c: 1, sum_uu: 1 of \d+ entries each\)"):
        nan_sums().finalize("paper")
    path = tmp_path / "s.safetensors"
    with pytest.raises(ValueError, match=rf"^sums: refusing to save {path}: NaN/inf sums"):
        nan_sums().save(path)
    assert not path.exists()


def test_non_finite_sums_and_tables_are_refused_at_load(tmp_path):
    bad_sums = nan_sums()
    path = rewrite(SUMS, tmp_path / "s.safetensors", {"sum_c": bad_sums.sum_c, "sum_uu": bad_sums.sum_uu})
    with pytest.raises(ValueError, match=rf"^path: {path} holds NaN/inf sums \(sum_c: 1, sum_uu: 1 of"):
        RatioSums.load(path)
    table_path = digits.asset_path(digits.TABLE_FILES["least_squares"])
    ratios = fg.RatioTable.load(table_path).ratios.clone()
    ratios[3, 1, 0, 2, 2] = float("nan")
    ratios[0, 0, 0, 0, 0] = float("-inf")
    bad = rewrite(table_path, tmp_path / "t.safetensors", {"ratios": ratios})
    with pytest.raises(ValueError, match=rf"^path: {bad} holds 2 NaN/inf ratios of {ratios.numel()}"):
        fg.RatioTable.load(bad)
    with pytest.raises(ValueError, match=r"^ratios: 2 of \d+ entries are NaN/inf; refusing to save"):
        fg.RatioTable(ratios, torch.arange(ratios.shape[1]).double()).save(tmp_path / "t2.safetensors")
    assert main(["table-info", str(bad)]) == 2


def test_table_info_json_is_strict_json(tmp_path, capsys):
    assert main(["table-info", str(digits.asset_path(digits.TABLE_FILES["paper"])), "--json"]) == 0
    info = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert info["num_classes"] == 10


# ---------------------------------------------------------------------- contradictions
TABLE = digits.asset_path(digits.TABLE_FILES["least_squares"])


@pytest.mark.parametrize("key,value,message", [
    ("has_mean_row", "yes", "has_mean_row metadata 'yes'; expected '0' or '1'"),
    ("has_mean_row", "0", r"num_classes metadata '10' vs the tensors' 11"),
    ("num_classes", "9", r"num_classes metadata '9' vs the tensors' 10"),
    ("num_classes", "ten", r"malformed 'num_classes' metadata value 'ten'"),
    ("latent_shape", "[1, 8]", r"latent_shape metadata '\[1, 8\]'"),
    ("latent_shape", "[1, 8", r"malformed 'latent_shape' metadata value"),
    ("dtype", "float16", "dtype metadata 'float16'"),
    ("timesteps", "[0, 1]", "timesteps metadata '\\[0, 1\\]'"),
    ("format_version", "x", "malformed 'format_version' metadata value 'x'"),
])
def test_table_metadata_that_contradicts_the_tensors_is_refused(tmp_path, key, value, message):
    bad = rewrite(TABLE, tmp_path / "t.safetensors", **{key: value})
    with pytest.raises(ValueError, match=rf"^path: {bad} .*{message}"):
        fg.RatioTable.load(bad)


@pytest.mark.parametrize("key,value", [("num_classes", "3"), ("latent_shape", "[2, 8, 8]"), ("timesteps", "[1]"),
                                       ("timesteps", "{")])
def test_sums_metadata_that_contradicts_the_tensors_is_refused(tmp_path, key, value):
    bad = rewrite(SUMS, tmp_path / "s.safetensors", **{key: value})
    with pytest.raises(ValueError, match=rf"^path: {bad} .*{key}"):
        RatioSums.load(bad)


def test_model_files_with_broken_metadata_name_the_file_and_key(tmp_path):
    unet = digits.asset_path(digits.UNET_FILE)
    for config, message in (("{", "malformed 'config' metadata"), ('{"channels": "x"}', "does not match"),
                            (None, "has no 'config' metadata")):
        bad = rewrite(unet, tmp_path / "u.safetensors", config=config)
        with pytest.raises(ValueError, match=rf"^model: {bad} .*{message}"):
            digits.load_digits_model(bad)
