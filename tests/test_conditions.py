"""fastguide.conditions: the [cond | null] (or [null | cond]) pairing of the batched forward, for integer labels
and for embedding conditions (a null of one condition's shape, broadcast, or a [B, ...] null taken as it is), and
the errors for a null that does not fit the conditions."""
import re

import pytest
import torch

from fastguide.conditions import null_batch, paired_conditions


@pytest.mark.parametrize("cond_first", [True, False])
def test_integer_labels_are_paired_with_the_null_label(cond_first):
    labels = torch.randint(0, 10, (7,))
    got = paired_conditions(labels, 10, cond_first=cond_first)
    null = torch.full((7,), 10)
    assert got.dtype == torch.int64 and got.shape == (14,)
    assert torch.equal(got, torch.cat([labels, null] if cond_first else [null, labels]))
    assert torch.equal(paired_conditions(labels, torch.tensor(10), cond_first), got)  # a 0-d tensor label too
    assert torch.equal(null_batch(10, labels), null)


def test_cond_first_is_the_default():
    labels = torch.randint(0, 5, (3,))
    assert paired_conditions(labels, 5)[:3].tolist() == labels.tolist()


@pytest.mark.parametrize("cond_first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_embedding_null_of_one_conditions_shape_is_broadcast(cond_first, dtype):
    cond = torch.randn(4, 3, 6, dtype=dtype)
    null = torch.randn(3, 6, dtype=torch.float64)
    got = paired_conditions(cond, null, cond_first)
    assert got.shape == (8, 3, 6) and got.dtype == dtype
    halves = (got[:4], got[4:]) if cond_first else (got[4:], got[:4])
    assert torch.equal(halves[0], cond)
    for row in halves[1]:
        assert torch.equal(row, null.to(dtype))  # cast to the conditions' dtype


@pytest.mark.parametrize("cond_first", [True, False])
def test_a_per_sample_embedding_null_is_taken_as_it_is(cond_first):
    cond = torch.randn(5, 8)
    null = torch.randn(5, 8)  # e.g. one negative-prompt embedding per sample
    got = paired_conditions(cond, null, cond_first)
    assert torch.equal(got, torch.cat([cond, null] if cond_first else [null, cond]))
    assert torch.equal(null_batch(null, cond), null)


@pytest.mark.parametrize("null", [torch.randn(4), torch.randn(2, 5), torch.randn(3, 5, 1), torch.randn(5, 1)])
def test_an_embedding_null_of_the_wrong_shape_is_refused(null):
    cond = torch.randn(3, 5)
    with pytest.raises(ValueError, match=r"^null_cond: expected shape \(5,\) \(one condition\), got "
                                         + re.escape(str(tuple(null.shape))) + "$"):
        paired_conditions(cond, null)


def test_an_int_null_with_embedding_conditions_is_refused():
    with pytest.raises(ValueError, match=r"^null_cond: conditions are tensors, so null_cond must be a tensor of one "
                                         r"condition's shape$"):
        paired_conditions(torch.randn(2, 5), 3)
