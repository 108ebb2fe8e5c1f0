"""fastguide.storage: read_safetensors reads back exactly what atomic_save wrote (tensors and metadata, as
strings); a missing, unreadable or wrong-format file is an error naming the argument and what the file should be;
atomic_save never leaves a truncated file or a temporary file behind, and refuses a missing directory."""
import re

import pytest
import safetensors.torch
import torch

from fastguide import storage
from fastguide.storage import atomic_save, read_safetensors


def random_tensors():
    return {"ratios": torch.rand(3, 4, 2, 5, dtype=torch.float64) + 0.5,
            "half": torch.randn(7).half(),
            "brain": torch.randn(2, 3).bfloat16(),
            "count": torch.randint(1, 1000, (3, 4)),
            "strided": torch.randn(4, 6).t()}  # not contiguous: saved as its values


def test_round_trip_of_tensors_and_metadata(tmp_path):
    tensors = random_tensors()
    path = tmp_path / "a.safetensors"
    atomic_save(tensors, path, {"format": "fastguide.test", "format_version": 1, "delta": 1e-6, "note": "x y"})
    back, meta = read_safetensors(path, "path", "test file", fmt="fastguide.test")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert meta == {"format": "fastguide.test", "format_version": "1", "delta": "1e-06", "note": "x y"}
    assert read_safetensors(str(path), "path", "test file")[1] == meta  # a str path and no format check


def test_overwriting_replaces_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    atomic_save({"x": torch.randn(3)}, path, {})
    new = {"y": torch.randn(2, 2)}
    atomic_save(new, path, {"k": "v"})
    back, meta = read_safetensors(path, "path", "file")
    assert back.keys() == {"y"} and torch.equal(back["y"], new["y"]) and meta == {"k": "v"}


def test_a_missing_file_names_the_argument_and_what_it_should_be(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=r"^checkpoint: ratio sums file .*nope\.safetensors not found$"):
        read_safetensors(missing, "checkpoint", "ratio sums")
    with pytest.raises(FileNotFoundError, match=r"^model: digits model file .* not found \(run `fastguide train`\)$"):
        read_safetensors(missing, "model", "digits model", hint=" (run `fastguide train`)")
    with pytest.raises(FileNotFoundError, match=r"^path: table file .* not found$"):
        read_safetensors(tmp_path, "path", "table")  # a directory is not a file


@pytest.mark.parametrize("content", [b"not a safetensors file", b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"])
def test_a_junk_file_is_not_a_readable_safetensors_file(tmp_path, content):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(content)
    with pytest.raises(ValueError, match=r"^classifier: .*junk\.safetensors is not a readable safetensors file \("):
        read_safetensors(junk, "classifier", "digits classifier")


def test_a_file_of_another_format_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic_save({"ratios": torch.rand(2, 2)}, path, {"format": "fastguide.ratio_table"})
    want = re.escape(f"path: {path} is not a fastguide ratio sums (format='fastguide.ratio_table', "
                     "expected 'fastguide.ratio_sums')")
    with pytest.raises(ValueError, match=f"^{want}$"):
        read_safetensors(path, "path", "ratio sums", fmt="fastguide.ratio_sums")
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3)}, str(plain))  # no metadata at all
    with pytest.raises(ValueError, match=r"^model: .* is not a fastguide digits model \(format=None, "):
        read_safetensors(plain, "model", "digits model", fmt="fastguide.digits_unet")


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "sums.safetensors"
    old = {"sum_c": torch.randn(2, 3)}
    atomic_save(old, path, {"batches_done": 4})
    before = path.read_bytes()

    def dies(fd):  # the temporary file is written but cannot be made durable: the write fails
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "fsync", dies)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"sum_c": torch.randn(2, 3)}, path, {"batches_done": 6})
    assert path.read_bytes() == before
    back, meta = read_safetensors(path, "checkpoint", "ratio sums")
    assert torch.equal(back["sum_c"], old["sum_c"]) and meta == {"batches_done": "4"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sums.safetensors"]  # no temporary file left
    with pytest.raises(OSError, match="disk full"):  # a first write that fails leaves no file at all
        atomic_save(old, tmp_path / "new.safetensors", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sums.safetensors"]


def test_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: directory .*no_such_dir does not exist$"):
        atomic_save({"x": torch.randn(2)}, tmp_path / "no_such_dir" / "t.safetensors", {})
    assert not (tmp_path / "no_such_dir").exists()
