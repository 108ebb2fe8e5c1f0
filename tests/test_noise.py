"""fastguide.noise: seeded_noise (x_T) and step_noise (a stochastic solver's per-step z). Sample b's noise depends
only on seeds[b] (not on the batch's order or composition), the same seed gives the same noise, step noise is
not the seed's x_T, shapes are [B, *shape] and [S, B, *shape], and dtype / device are honoured."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastguide as fg
from fastguide.noise import seeded_noise, step_noise

SHAPE = (3, 5, 3)  # odd sizes
GENERATED = settings(max_examples=25, deadline=None, database=None)
SEED_LISTS = st.lists(st.integers(min_value=0, max_value=2**62), min_size=1, max_size=6)


def test_seeded_noise_rows_depend_only_on_their_seed():
    a = fg.seeded_noise([3, 9, 4], SHAPE, torch.float64)
    b = fg.seeded_noise([9], SHAPE, torch.float64)
    assert a.shape == (3, *SHAPE) and a.dtype == torch.float64
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[2])
    assert torch.equal(fg.seeded_noise([9], SHAPE, torch.float32)[0], b[0].float())
    assert abs(fg.seeded_noise(list(range(64)), SHAPE).std().item() - 1) < 0.1


@GENERATED
@given(seeds=SEED_LISTS, order=st.randoms(use_true_random=False))
def test_seeded_noise_row_b_is_the_noise_of_seeds_b_alone(seeds, order):
    x = seeded_noise(seeds, SHAPE, torch.float64)
    assert x.shape == (len(seeds), *SHAPE)
    for b, s in enumerate(seeds):
        assert torch.equal(x[b], seeded_noise([s], SHAPE, torch.float64)[0])
    perm = list(range(len(seeds)))
    order.shuffle(perm)
    assert torch.equal(seeded_noise([seeds[p] for p in perm], SHAPE, torch.float64), x[perm])
    for b in range(len(seeds)):  # rows of different seeds differ, rows of equal seeds are equal
        assert torch.equal(x[b], x[0]) == (seeds[b] == seeds[0])


def test_seeded_noise_is_the_same_for_the_same_seed_and_independent_of_the_global_rng():
    torch.manual_seed(0)
    a = seeded_noise([7, 1], (2, 4, 4))
    torch.randn(100)
    torch.manual_seed(99)
    assert torch.equal(seeded_noise([7, 1], (2, 4, 4)), a)
    assert not torch.equal(seeded_noise([8, 1], (2, 4, 4))[0], a[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "meta"])
def test_dtype_and_device_are_honoured(dtype, device):
    x = seeded_noise([5, 6], (1, 3, 2), dtype=dtype, device=device)
    z = step_noise([5, 6], 4, (1, 3, 2), dtype=dtype, device=device)
    want = torch.device(device)
    assert x.dtype == z.dtype == dtype and x.device == z.device == want
    assert x.shape == (2, 1, 3, 2) and z.shape == (4, 2, 1, 3, 2)
    if want.type == "cpu":  # drawn in float64 on the CPU, then cast: every dtype holds the same draw
        assert torch.equal(x, seeded_noise([5, 6], (1, 3, 2), torch.float64).to(dtype))
        assert torch.equal(z, step_noise([5, 6], 4, (1, 3, 2), torch.float64).to(dtype))


@GENERATED
@given(seeds=SEED_LISTS, steps=st.integers(min_value=1, max_value=5))
def test_step_noise_is_s_by_b_and_sample_b_depends_only_on_seeds_b(seeds, steps):
    z = step_noise(seeds, steps, SHAPE, torch.float64)
    assert z.shape == (steps, len(seeds), *SHAPE) and z.dtype == torch.float64
    for b, s in enumerate(seeds):
        assert torch.equal(z[:, b], step_noise([s], steps, SHAPE, torch.float64)[:, 0])
    reversed_batch = step_noise(seeds[::-1], steps, SHAPE, torch.float64)
    assert torch.equal(reversed_batch, z.flip(1))
    assert torch.equal(step_noise(seeds, steps, SHAPE, torch.float64), z)


def test_step_noise_differs_from_the_seeds_x_t_and_between_steps():
    seeds = [0, 3, 11]
    x = seeded_noise(seeds, SHAPE, torch.float64)
    z = step_noise(seeds, 6, SHAPE, torch.float64)
    for i in range(6):
        for b in range(3):
            assert (z[i, b] - x[b]).abs().max() > 0.1
    assert all((z[i] - z[i + 1]).abs().max() > 0.1 for i in range(5))
    many = step_noise(list(range(32)), 8, SHAPE)
    assert abs(many.mean().item()) < 0.05 and abs(many.std().item() - 1) < 0.05  # standard normal


@pytest.mark.parametrize("make", [lambda s: seeded_noise(s, SHAPE), lambda s: step_noise(s, 3, SHAPE)],
                         ids=["seeded_noise", "step_noise"])
def test_bad_seeds_are_refused(make):
    with pytest.raises(TypeError, match=r"^seeds: expected a sequence of ints, got int$"):
        make(5)
    with pytest.raises(ValueError, match=r"^seeds: expected non-negative ints below 2\*\*63, got \[-4\]$"):
        make([1, -4])
