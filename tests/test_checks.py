"""fastguide.checks: every argument validator accepts good values (returned in the documented form) and rejects
bad ones with a TypeError / ValueError whose message starts with the argument's name. The int, steps, scale,
lo/hi and seeds validators are also driven with generated values (hypothesis)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastguide.checks import (check_cond, check_int, check_interval, check_lo_hi, check_model_output, check_noise,
                              check_scale, check_seeds, check_steps)

GENERATED = settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ folder in the repo
NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NOT_A_NUMBER = st.one_of(st.text(max_size=4), st.none(), st.lists(st.integers(), max_size=2), st.just(object()))


# ------------------------------------------------------------------ check_int
@GENERATED
@given(value=st.integers(min_value=-10**6, max_value=10**6), low=st.integers(min_value=-5, max_value=5))
def test_check_int_returns_ints_at_or_above_low(value, low):
    if value >= low:
        got = check_int(value, "n", low)
        assert got == value and type(got) is int
        got = check_int(np.int64(value), "n", low)  # numpy ints too, returned as int
        assert got == value and type(got) is int
    else:
        with pytest.raises(ValueError, match=rf"^n: expected an int >= {low}, got {value}$"):
            check_int(value, "n", low)


@GENERATED
@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), NOT_A_NUMBER,
                       st.integers(max_value=-1)))
def test_check_int_rejects_what_is_not_a_non_negative_int(value):
    with pytest.raises(ValueError, match=r"^batch_size: expected an int >= 0, got "):
        check_int(value, "batch_size", 0)


def test_check_int_without_a_bound_takes_any_int_and_names_no_bound():
    assert check_int(-7, "seed") == -7
    with pytest.raises(ValueError, match=r"^seed: expected an int, got 1\.5$"):
        check_int(1.5, "seed")
    with pytest.raises(ValueError, match=r"^seed: expected an int, got True$"):
        check_int(True, "seed")


# ------------------------------------------------------------------ check_steps
@GENERATED
@given(steps=st.integers(min_value=1, max_value=1000), extra=st.integers(min_value=0, max_value=1000))
def test_check_steps_accepts_one_up_to_the_training_steps(steps, extra):
    assert check_steps(steps) is None
    assert check_steps(np.int32(steps), steps + extra) is None
    too_many = steps + 1 + extra
    with pytest.raises(ValueError, match=rf"^steps: expected <= num_train_timesteps \({steps}\), got {too_many}$"):
        check_steps(too_many, steps)


@GENERATED
@given(steps=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), NOT_A_NUMBER))
def test_check_steps_rejects_what_is_not_an_int(steps):
    with pytest.raises(TypeError, match=r"^steps: expected an int, got "):
        check_steps(steps)


@GENERATED
@given(steps=st.integers(max_value=0))
def test_check_steps_rejects_fewer_than_one(steps):
    with pytest.raises(ValueError, match=rf"^steps: expected >= 1, got {steps}$"):
        check_steps(steps)


# ------------------------------------------------------------------ check_scale
@GENERATED
@given(scale=st.one_of(st.floats(min_value=0, max_value=1e30), st.integers(min_value=0, max_value=10**9)))
def test_check_scale_returns_a_finite_non_negative_number_as_a_float(scale):
    got = check_scale(scale, "w")
    assert type(got) is float and got == scale


@GENERATED
@given(values=st.lists(st.floats(min_value=0, max_value=6e4, width=32), min_size=1, max_size=6),  # fp16-finite
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]))
def test_check_scale_returns_a_per_sample_tensor_as_float64_on_the_cpu(values, dtype):
    scale = torch.tensor(values, dtype=dtype)
    got = check_scale(scale)
    assert got.dtype == torch.float64 and got.device.type == "cpu" and got.shape == scale.shape
    assert torch.equal(got, scale.double())


def test_check_scale_takes_integer_per_sample_tensors():
    got = check_scale(torch.tensor([1, 3], dtype=torch.int32))
    assert got.dtype == torch.float64 and got.tolist() == [1.0, 3.0]


@GENERATED
@given(scale=st.one_of(NON_FINITE, st.floats(max_value=-1e-300), st.integers(max_value=-1)))
def test_check_scale_rejects_negative_and_non_finite_numbers(scale):
    with pytest.raises(ValueError, match=r"^scale: expected a finite value >= 0, got "):
        check_scale(scale)


@GENERATED
@given(scale=st.one_of(st.booleans(), NOT_A_NUMBER))
def test_check_scale_rejects_bools_and_non_numbers(scale):
    with pytest.raises(TypeError, match=r"^g: expected a float or a \[B\] tensor, got "):
        check_scale(scale, "g")


@GENERATED
@given(values=st.lists(st.floats(min_value=0, max_value=10), min_size=1, max_size=5),
       bad=st.one_of(NON_FINITE, st.floats(min_value=-1e6, max_value=-1e-6)), where=st.integers(0, 4))
def test_check_scale_rejects_a_tensor_with_a_negative_or_non_finite_value(values, bad, where):
    values[where % len(values)] = bad
    with pytest.raises(ValueError, match=r"^scale: expected finite values >= 0$"):
        check_scale(torch.tensor(values, dtype=torch.float64))


@pytest.mark.parametrize("scale", [torch.ones(2, 1), torch.tensor(2.0), torch.tensor([True, False]),
                                   torch.tensor([1 + 1j])])
def test_check_scale_rejects_a_tensor_that_is_not_1d_real(scale):
    with pytest.raises(ValueError, match=r"^scale: expected a float or a 1-D \[B\] tensor, got shape "):
        check_scale(scale)


# ------------------------------------------------------------------ check_lo_hi, check_interval
@GENERATED
@given(a=st.floats(allow_nan=False), b=st.floats(allow_nan=False))
def test_check_lo_hi_returns_an_ordered_pair_and_rejects_a_reversed_one(a, b):
    lo, hi = min(a, b), max(a, b)
    got = check_lo_hi([lo, hi], "clamp", "a (lo, hi) pair")
    assert got == (lo, hi) and all(type(v) is float for v in got)
    assert check_interval(np.array([lo, hi])) == (lo, hi)
    if lo < hi:
        with pytest.raises(ValueError, match=r"^clamp: expected lo <= hi, got "):
            check_lo_hi((hi, lo), "clamp", "a (lo, hi) pair")


@pytest.mark.parametrize("value", [5, None, (1.0,), (1.0, 2.0, 3.0), ("a", "b"), [[1, 2], [3, 4]]])
def test_check_lo_hi_rejects_what_is_not_a_pair_of_numbers(value):
    if value is not None:  # None is no interval (below)
        with pytest.raises(TypeError, match=r"^interval: expected a \(lo, hi\) pair of model times, got "):
            check_interval(value)
    with pytest.raises(TypeError, match=r"^clamp: expected two bounds, got "):
        check_lo_hi(value, "clamp", "two bounds")


def test_check_interval_none_means_no_interval():
    assert check_interval(None) is None
    assert check_interval((300, 700)) == (300.0, 700.0)
    with pytest.raises(ValueError, match=r"^interval: expected lo <= hi, got \(700\.0, 300\.0\)$"):
        check_interval((700, 300))


# ------------------------------------------------------------------ check_seeds
@GENERATED
@given(seeds=st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=8))
def test_check_seeds_returns_a_list_of_ints_from_any_sequence(seeds):
    for given_as in (seeds, tuple(seeds), torch.tensor(seeds, dtype=torch.int64), np.array(seeds, dtype=np.int64)):
        got = check_seeds(given_as)
        assert got == seeds and all(type(s) is int for s in got)
    assert check_seeds(seeds, len(seeds)) == seeds


@GENERATED
@given(seeds=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=6),
       negative=st.integers(max_value=-1), where=st.integers(0, 5))
def test_check_seeds_rejects_negative_seeds(seeds, negative, where):
    seeds[where % len(seeds)] = negative
    with pytest.raises(ValueError, match=rf"^seeds: expected non-negative ints below 2\*\*63, got \[{negative}"):
        check_seeds(seeds)


@GENERATED
@given(seeds=st.lists(st.integers(min_value=0, max_value=100), max_size=6), batch=st.integers(0, 6))
def test_check_seeds_wants_one_seed_per_sample(seeds, batch):
    if batch == len(seeds):
        assert check_seeds(seeds, batch) == seeds
    else:
        with pytest.raises(ValueError, match=rf"^seeds: expected {batch} seeds \(one per sample\), got {len(seeds)}$"):
            check_seeds(seeds, batch)


@GENERATED
@given(bad=st.one_of(st.just(math.nan), st.text(alphabet="abcxyz._ ", min_size=1, max_size=4), st.none(),
                     st.lists(st.integers(), min_size=1, max_size=2), st.just(object())),
       seeds=st.lists(st.integers(min_value=0, max_value=100), max_size=3))
def test_check_seeds_rejects_entries_that_are_not_numbers(bad, seeds):
    with pytest.raises(TypeError, match=rf"^seeds: expected a sequence of ints, got {type(bad).__name__} "):
        check_seeds([*seeds, bad])


@pytest.mark.parametrize("seeds", [5, None, 2.0])
def test_check_seeds_rejects_a_single_value(seeds):
    with pytest.raises(TypeError, match=rf"^seeds: expected a sequence of ints, got {type(seeds).__name__}$"):
        check_seeds(seeds)


# ------------------------------------------------------------------ check_noise
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_check_noise_returns_float_4d_noise_contiguous(dtype):
    x = torch.randn(3, 5, 4, 2).to(dtype)
    assert check_noise(x) is x  # already contiguous: returned as it is
    strided = torch.randn(2, 4, 5, 3).to(dtype).transpose(1, 2)
    got = check_noise(strided)
    assert got.is_contiguous() and torch.equal(got, strided)


@pytest.mark.parametrize("noise, exc, match", [
    (np.ones((2, 1, 3, 3)), TypeError, r"^noise: expected a torch\.Tensor \[B, C, H, W\], got ndarray$"),
    (torch.randn(2, 3, 3), ValueError, r"^noise: expected 4 dims \[B, C, H, W\], got shape \(2, 3, 3\)$"),
    (torch.randn(1, 2, 3, 3, 1), ValueError, r"^noise: expected 4 dims"),
    (torch.randint(0, 5, (2, 1, 3, 3)), TypeError,
     r"^noise: expected float64/float32/float16/bfloat16, got torch\.int64$"),
    (torch.randn(0, 1, 3, 3), ValueError, r"^noise: expected a non-empty batch, got shape \(0, 1, 3, 3\)$"),
    (torch.randn(2, 1, 0, 3), ValueError, r"^noise: expected a non-empty batch"),
])
def test_check_noise_rejects_bad_noise(noise, exc, match):
    with pytest.raises(exc, match=match):
        check_noise(noise)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_noise_scans_values_only_when_asked(bad):
    x = torch.randn(2, 1, 3, 3)
    x[1, 0, 2, 1] = bad
    with pytest.raises(ValueError, match=r"^noise: contains NaN or inf$"):
        check_noise(x)
    assert check_noise(x, values=False) is x  # the sampler then checks it with the sample's sums


# ------------------------------------------------------------------ check_cond
@pytest.mark.parametrize("labels", [[3, 0, 2], (3, 0, 2), np.array([3, 0, 2]),
                                    torch.tensor([3, 0, 2], dtype=torch.int32),
                                    torch.tensor([3, 0, 2], dtype=torch.uint8)])
def test_check_cond_returns_integer_labels_as_int64(labels):
    got = check_cond(labels, 3, torch.device("cpu"))
    assert got.dtype == torch.int64 and got.tolist() == [3, 0, 2]


def test_check_cond_keeps_embeddings_and_moves_conditions_to_the_device():
    emb = torch.randn(4, 7, dtype=torch.float64)
    got = check_cond(emb, 4, "cpu")
    assert got is emb
    labels = torch.randint(0, 9, (4,))
    meta = check_cond(labels, 4, torch.device("meta"))
    assert meta.device.type == "meta" and meta.shape == (4,) and meta.dtype == torch.int64


def test_check_cond_rejects_a_single_int():
    with pytest.raises(TypeError, match=r"^cond: expected a \[B\] tensor or list of labels \(B=3\), got a single int; "
                                        r"use torch\.full\(\(B,\), label\)"):
        check_cond(4, 3, "cpu")


@pytest.mark.parametrize("cond", [torch.tensor([0, 1]), torch.randn(4, 2), [1, 2, 3, 4], torch.tensor(1), True])
def test_check_cond_wants_one_condition_per_sample(cond):
    with pytest.raises(ValueError, match=r"^cond: expected 3 conditions \(the noise batch\), got shape "):
        check_cond(cond, 3, "cpu")


def test_check_cond_rejects_multi_dim_labels_and_non_tensors():
    with pytest.raises(ValueError, match=r"^cond: integer labels must be 1-D \[B\], got shape \(2, 3\)$"):
        check_cond(torch.randint(0, 5, (2, 3)), 2, "cpu")
    with pytest.raises(TypeError, match=r"^cond: expected a \[B\] tensor of labels, got list$"):
        check_cond([[1, 2], [3]], 2, "cpu")
    with pytest.raises(TypeError, match=r"^cond: expected a \[B\] tensor of labels, got object$"):
        check_cond(object(), 2, "cpu")


# ------------------------------------------------------------------ check_model_output
def test_check_model_output_wants_one_tensor_shaped_like_the_input():
    inp = torch.randn(6, 2, 3, 3)
    assert check_model_output(torch.randn(6, 2, 3, 3), inp) is None
    with pytest.raises(TypeError, match=r"^model: expected a tensor output, got tuple at step 3$"):
        check_model_output((inp, inp), inp, step=3)
    with pytest.raises(TypeError, match=r"^model: expected a tensor output, got list$"):
        check_model_output([inp], inp)
    learned_sigma = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=r"^model: output shape \(6, 4, 3, 3\) != input shape \(6, 2, 3, 3\) at step 0 "
                                         r"\(a learned-sigma model needs an adapter that returns the eps half\)$"):
        check_model_output(learned_sigma, inp, step=0)
