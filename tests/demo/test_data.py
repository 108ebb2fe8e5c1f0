"""The digits data (fastguide.demo.data): the held-out split is fixed, stratified and disjoint from training."""
import numpy as np
import torch

from fastguide.demo.data import load_digits_split, stratified_heldout_mask


def test_split_is_fixed_stratified_and_disjoint(split):
    again = load_digits_split()
    assert torch.equal(split.heldout_images, again.heldout_images)
    assert split.train_images.shape == (1438, 1, 8, 8) and split.heldout_images.shape == (359, 1, 8, 8)
    assert float(split.train_images.min()) == -1.0 and float(split.train_images.max()) == 1.0
    from sklearn.datasets import load_digits
    y = load_digits().target
    held_counts = np.bincount(split.heldout_labels.numpy(), minlength=10)
    assert held_counts.tolist() == [int(round(0.2 * n)) for n in np.bincount(y)]
    mask = stratified_heldout_mask(y, 0.2, 0)
    assert not np.array_equal(mask, stratified_heldout_mask(y, 0.2, 1))  # the seed matters
    # no image appears in both halves (digits has a few exact duplicates, so compare by index via the mask)
    assert mask.sum() == 359 and (~mask).sum() == 1438
