"""scikit-learn's bundled 8x8 digits (1797 images, 10 classes, offline), scaled to [-1, 1], with a fixed split.

The held-out split is stratified: for each class, a permutation drawn from ``numpy.random.RandomState(seed)``
(a generator whose stream numpy keeps stable across versions) puts the first ``round(heldout_fraction * n_c)``
images of that class in the held-out set. The same seed therefore gives the same split everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUM_CLASSES = 10
NULL_LABEL = 10  # the unconditional ("null") condition the diffusion model is trained with
IMAGE_SHAPE = (1, 8, 8)
PIXEL_MAX = 16.0  # load_digits pixel values are integers in [0, 16]


@dataclass(frozen=True)
class DigitsSplit:
    train_images: torch.Tensor  # [N_train, 1, 8, 8] float32 in [-1, 1]
    train_labels: torch.Tensor  # [N_train] int64
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """load_digits pixels in [0, 16] -> [-1, 1]."""
    return pixels / (PIXEL_MAX / 2) - 1.0


def stratified_heldout_mask(labels: np.ndarray, heldout_fraction: float, seed: int) -> np.ndarray:
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction: expected a value in (0, 1), got {heldout_fraction}")
    rng = np.random.RandomState(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        take = int(round(heldout_fraction * len(idx)))
        mask[idx[rng.permutation(len(idx))[:take]]] = True
    return mask


def load_digits_split(heldout_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The digits split every fastguide model and metric uses (default: 20% held out, seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = to_unit_range(bunch.images.astype(np.float64)).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    held = stratified_heldout_mask(labels, heldout_fraction, seed)
    t = torch.from_numpy
    return DigitsSplit(t(images[~held]), t(labels[~held]), t(images[held]), t(labels[held]))
