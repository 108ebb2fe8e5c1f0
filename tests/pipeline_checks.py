"""What the pipeline tests (test_pipelines*.py) share: per-image generators and the comparison of fastguide's
images with a pipeline's own (imported by those files, as test_table.py imports gaussian_models)."""
import numpy as np
import torch

TOL = 1e-4  # relative to max(1, |pipe|), float32


def generators(seeds=(1, 2, 3)):
    return [torch.Generator().manual_seed(s) for s in seeds]


def as_tensor(images):
    if isinstance(images, list):  # PIL images
        return torch.stack([torch.from_numpy(np.asarray(im).astype(np.float32)) for im in images])
    return torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)


def relative_error(got, want) -> float:
    got, want = as_tensor(got), as_tensor(want)
    assert got.shape == want.shape
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def assert_close(got, want, tol=TOL):
    err = relative_error(got, want)
    assert err <= tol, f"max |fastguide - pipe| / max(1, |pipe|) = {err:.3g} > {tol}"
