"""Ratio-table builds (fastguide.table_build): RatioSums from accumulate_ratio_sums against hand-computed and
closed-form values, both estimators, class separation and independence of the batch layout, per-class selection,
bad build arguments, the near-zero rule and clamp, finalize, saved sums, checkpoint/resume, and builds for
embedding conditions through ConditionIdModel.

The analytic model: for condition c the model returns the exact epsilon of Gaussian data N(m_c, s_c^2)
(per element), m(x_t) = k_c (x_t - a m_c) with a = sqrt(abar_t), s = sqrt(1 - abar_t), k_c = s / (a^2 s_c^2 + s^2);
the null label K uses (m_u, s_u). The dataset's images of class c all equal mu_c, so x_t = a mu_c + s eps, and
with the empirical noise moments e = mean(eps), q = mean(eps^2) over the N images of a class:

    mean m_c       = k_c (a d_c + s e)                        d_c = mu_c - m_c, d_u = mu_c - m_u
    mean m_u       = k_u (a d_u + s e)
    mean m_c m_u   = k_c k_u (a^2 d_c d_u + a s (d_c + d_u) e + s^2 q)
    mean m_u^2     = k_u^2 (a^2 d_u^2 + 2 a s d_u e + s^2 q)

(population values: e = 0, q = 1).
"""
import json
import math

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.adapters import ConditionIdModel
from fastguide.table_build import RatioSums, accumulate_ratio_sums, ratio_estimate, select_per_class

# The analytic problem below is also the model of test_table.py and of the `fastguide build-table` runs of
# test_table_build_distributed.py, which import it from here (a subprocess imports it, so it is a module's code,
# not a conftest fixture).
SCHED = fg.NoiseSchedule.linear()
GRID = np.array([10, 150, 300, 500])
SHAPE = (1, 2, 3)


class GaussianEps:
    """Exact eps of per-element Gaussian data; row K of means/stds is the unconditional model."""

    def __init__(self, schedule, means, stds):
        self.abar = schedule.alphas_cumprod
        self.means, self.stds = means.double(), stds.double()
        self.calls = 0

    def coefficients(self, t):
        abar = self.abar[torch.as_tensor(t).long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def __call__(self, x, t, c):
        self.calls += 1
        a, s = self.coefficients(t.cpu())
        a, s = a.view(-1, *[1] * (x.ndim - 1)), s.view(-1, *[1] * (x.ndim - 1))
        m, sd = self.means[c.cpu()], self.stds[c.cpu()].view(-1, *[1] * (x.ndim - 1))
        return (s * (x.double().cpu() - a * m) / (a * a * sd * sd + s * s)).to(x.dtype)


def make_problem(num_classes=2, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    # data means >= 0.5 while the unconditional model's mean is -2: E[m_u] stays away from 0 (paper estimator)
    mu = torch.randn((num_classes, *shape), generator=g, dtype=torch.float64).abs() * 1.5 + 0.5
    model_means = torch.cat([mu + 0.7 * torch.randn(mu.shape, generator=g, dtype=torch.float64),
                             torch.zeros(1, *shape, dtype=torch.float64) - 2.0])  # row K: unconditional
    model_stds = torch.tensor([0.5 + 0.25 * c for c in range(num_classes)] + [1.5], dtype=torch.float64)
    return mu, GaussianEps(SCHED, model_means, model_stds)


def dataset(mu, n_per_class, order="interleaved", extra=0):
    """Images equal to their class mean; 'interleaved' mixes the classes in every batch."""
    k = mu.shape[0]
    labels = torch.arange(k).repeat(n_per_class + extra) if order == "interleaved" else \
        torch.arange(k).repeat_interleave(n_per_class + extra)
    return mu[labels].clone(), labels


def documented_noise(seed, c, j, num_t, shape):
    """The noise spec of docs/tables.md, written out independently of fastguide.table_build."""
    s = np.random.SeedSequence([seed, c, j]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(((int(s[0]) << 32) | int(s[1])) % 2**63)
    return torch.randn((num_t, *shape), generator=gen, dtype=torch.float64)


def moment_means(model, mu, c, k, e, q):
    """The four means of the docstring for class c at grid index k, given noise moments e, q."""
    a, s = (v.item() for v in model.coefficients(GRID[k]))
    kc = s / (a * a * model.stds[c].item() ** 2 + s * s)
    ku = s / (a * a * model.stds[-1].item() ** 2 + s * s)
    dc, du = mu[c] - model.means[c], mu[c] - model.means[-1]
    return (kc * (a * dc + s * e), ku * (a * du + s * e),
            kc * ku * (a * a * dc * du + a * s * (dc + du) * e + s * s * q),
            ku * ku * (a * a * du * du + 2 * a * s * du * e + s * s * q))


def build(model, images, labels, n, **kw):
    kw = {"timesteps": GRID, "num_classes": int(labels.max()) + 1, "samples_per_class": n,
          "null_cond": int(labels.max()) + 1, "batch_size": 16, "seed": 3, "progress": False, **kw}
    return accumulate_ratio_sums(model, SCHED, images, labels, **kw)


# ---------------------------------------------------------------------- estimators
@pytest.fixture(scope="module")
def hand_problem():
    mu, model = make_problem(num_classes=3)
    images, labels = dataset(mu, 40, order="interleaved", extra=2)  # 2 extra images/class must be ignored
    sums = build(model, images, labels, 40, batch_size=7)  # batches straddle classes
    return mu, model, sums


def hand_sums(mu, model, n, seed=3):
    """Expected per-class sums [K, T, *shape] from the documented noise, by the formulas above."""
    k_cls, out = mu.shape[0], {name: [] for name in ("c", "u", "cu", "uu")}
    for c in range(k_cls):
        noise = torch.stack([documented_noise(seed, c, j, len(GRID), SHAPE) for j in range(n)])  # [n, T, ...]
        rows = [moment_means(model, mu, c, k, noise[:, k].mean(0), (noise[:, k] ** 2).mean(0))
                for k in range(len(GRID))]
        for i, name in enumerate(out):
            out[name].append(torch.stack([r[i] for r in rows]) * n)
    return {name: torch.stack(v) for name, v in out.items()}


def test_sums_match_hand_computed_values(hand_problem):
    mu, model, sums = hand_problem
    want = hand_sums(mu, model, 40)
    torch.testing.assert_close(sums.sum_c, want["c"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums.sum_u, want["u"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums.sum_cu, want["cu"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sums.sum_uu, want["uu"], rtol=1e-10, atol=1e-12)
    assert torch.equal(sums.count, torch.full((3, len(GRID)), 40))
    assert sums.timesteps.tolist() == GRID.tolist()


@pytest.mark.parametrize("estimator", ["paper", "least_squares"])
def test_both_estimators_and_mean_row_match_hand_computed_tables(hand_problem, estimator):
    mu, model, sums = hand_problem
    want = hand_sums(mu, model, 40)
    num, den = (want["c"], want["u"]) if estimator == "paper" else (want["cu"], want["uu"])
    expected = torch.cat([num / den, (num.sum(0) / den.sum(0)).unsqueeze(0)])  # mean row: pooled sums
    table = sums.finalize(estimator, delta=0.0, dtype=torch.float64)
    assert table.ratios.shape == (4, len(GRID), *SHAPE) and table.has_mean_row and table.num_classes == 3
    torch.testing.assert_close(table.ratios, expected, rtol=1e-9, atol=1e-12)
    assert table.metadata["estimator"] == estimator and table.metadata["near_zero_count"] == "0"
    assert table.timesteps.tolist() == GRID.tolist()


def vertex_bound(f, n):
    """max |f(e, q) - f(0, 1)| over the 5-sigma box of the noise moments: e = mean of n N(0,1) draws
    (sd 1/sqrt(n)), q = mean of their squares (sd sqrt(2/n)). Each estimator is a ratio of functions affine
    in (e, q) with a denominator of fixed sign on the box, hence quasi-linear, so its extremes over the box
    are at the vertices. Failure probability per element < 2 * 5.7e-7."""
    be, bq = 5 / math.sqrt(n), 5 * math.sqrt(2 / n)
    ref = f(0.0, 1.0)
    return max(np.max(np.abs(f(e, 1 + dq) - ref)) for e in (-be, be) for dq in (-bq, bq))


def test_estimators_converge_to_closed_form_within_justified_tolerance():
    n = 3000
    mu, model = make_problem(num_classes=2, seed=5)
    images, labels = dataset(mu, n, order="interleaved")
    sums = build(model, images, labels, n, batch_size=500)
    paper, ls = (sums.finalize(est, delta=0.0, dtype=torch.float64).ratios for est in ("paper", "least_squares"))
    for c in range(2):
        for k in range(len(GRID)):
            def f_paper(e, q, c=c, k=k):
                m = moment_means(model, mu, c, k, e, q)
                return (m[0] / m[1]).numpy()

            def f_ls(e, q, c=c, k=k):
                m = moment_means(model, mu, c, k, e, q)
                return (m[2] / m[3]).numpy()

            for got, f in ((paper, f_paper), (ls, f_ls)):
                be = 5 / math.sqrt(n)
                den_sign = [np.sign(moment_means(model, mu, c, k, e, 1.0)[1].numpy()) for e in (-be, be)]
                assert (den_sign[0] == den_sign[1]).all(), "test setup: paper denominator must not cross 0"
                tol = vertex_bound(f, n)
                err = np.max(np.abs(got[c, k].numpy() - f(0.0, 1.0)))
                assert err <= tol, (c, k, err, tol)
    # the two estimators genuinely differ here, by far more than the tolerance: the test can tell them apart
    assert (paper[:2] - ls[:2]).abs().max() > 0.5


# ---------------------------------------------------------------------- class separation and independence
def test_mixed_class_batches_equal_class_sorted_batches():
    mu, model = make_problem(num_classes=3, seed=1)
    mixed = build(model, *dataset(mu, 20, order="interleaved"), 20, batch_size=5)
    sorted_ = build(model, *dataset(mu, 20, order="sorted"), 20, batch_size=64)
    one_by_one = build(model, *dataset(mu, 20, order="sorted"), 20, batch_size=1)
    for other in (sorted_, one_by_one):
        for name, t in mixed.tensors().items():
            torch.testing.assert_close(t, other.tensors()[name], rtol=1e-12, atol=1e-13)
    # the classes really are different (a mixing bug would move these rows toward each other)
    table = mixed.finalize("least_squares")
    assert (table.ratios[0] - table.ratios[1]).abs().max() > 0.1


def test_one_batched_forward_per_batch_and_timestep_with_cond_first_layout():
    mu, model = make_problem(num_classes=2)
    seen = []

    def spy(x, t, c):
        seen.append((x.shape[0], c.clone(), t.clone()))
        return model(x, t, c)

    images, labels = dataset(mu, 6, order="interleaved")
    build(spy, images, labels, 6, batch_size=5)  # 12 images -> batches of 5, 5, 2
    assert len(seen) == 3 * len(GRID)
    rows, c, t = seen[0]
    assert rows == 10 and c[:5].tolist() == labels[:5].tolist() and c[5:].tolist() == [2] * 5
    assert t.dtype == torch.float64 and t.tolist() == [float(GRID[0])] * 10  # float64 images -> float64 t
    uncond_first = []
    build(lambda x, t, c: (uncond_first.append(c.clone()), model(x, t, c))[1], images, labels, 6, batch_size=5,
          cond_first=False)
    assert uncond_first[0][:5].tolist() == [2] * 5 and uncond_first[0][5:].tolist() == labels[:5].tolist()


def test_cond_first_false_gives_same_sums():
    mu, model = make_problem(num_classes=2)
    images, labels = dataset(mu, 8)
    a, b = build(model, images, labels, 8), build(model, images, labels, 8, cond_first=False)
    for name, t in a.tensors().items():
        assert torch.equal(t, b.tensors()[name]), name


def test_selection_takes_first_n_per_class_and_reports_short_classes():
    labels = torch.tensor([1, 0, 1, 1, 0, 2, 0, 1])
    keep, ids, rank = select_per_class(labels, 3, 1)
    assert keep.tolist() == [0, 1, 5] and ids.tolist() == [1, 0, 2] and rank.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="class 2 has 1"):
        select_per_class(labels, 3, 2)
    mu, model = make_problem(num_classes=2)
    images, labels = dataset(mu, 4)
    with pytest.raises(ValueError, match="samples_per_class.*class 0 has 4"):
        build(model, images, labels, 5)


@pytest.mark.parametrize("kw, match", [
    ({"timesteps": [10, 10]}, "timesteps: expected distinct"),
    ({"timesteps": [5, 1000]}, r"timesteps: expected training indices in \[0, 999\]"),
    ({"timesteps": [1.5, 3.0]}, "timesteps: expected integer"),
    ({"num_classes": 1}, r"labels: expected condition ids in \[0, 1\)"),
    ({"batch_size": 0}, "batch_size"),
    ({"seed": -1}, "seed"),
])
def test_bad_build_arguments_raise_clear_errors(kw, match):
    mu, model = make_problem(num_classes=2)
    images, labels = dataset(mu, 4)
    with pytest.raises(ValueError, match=match):
        build(model, images, labels, 4, **kw)


def test_bad_model_output_raises():
    mu, model = make_problem(num_classes=2)
    images, labels = dataset(mu, 4)
    with pytest.raises(ValueError, match=r"model: output shape \(16, 1, 1, 3\) != input shape \(16, 1, 2, 3\)"):
        build(lambda x, t, c: x[:, :, :1], images, labels, 4)
    with pytest.raises(ValueError, match="NaN/inf"):
        build(lambda x, t, c: x * float("nan"), images, labels, 4)
    with pytest.raises(TypeError, match="null_cond"):
        build(model, images, labels, 4, null_cond=torch.zeros(3))


# ---------------------------------------------------------------------- near-zero rule, clamp, finalize
def test_near_zero_rule_and_clamp_are_applied_and_counted():
    num = torch.tensor([[2.0, 3.0, 1.0, -8.0]], dtype=torch.float64)
    den = torch.tensor([[1.0, 1e-9, -1e-9, 2.0]], dtype=torch.float64)
    r, near, clamped = ratio_estimate(num, den, delta=1e-6)
    assert r.tolist() == [[2.0, 1.0, 1.0, -4.0]] and near == 2 and clamped == 0
    r, near, clamped = ratio_estimate(num, den, delta=1e-6, clamp=(-2.0, 1.5))
    assert r.tolist() == [[1.5, 1.0, 1.0, -2.0]] and near == 2 and clamped == 2
    r, near, _ = ratio_estimate(num, den, delta=0.0)
    assert near == 0 and r[0, 1].item() == 3e9


def test_finalize_records_rule_in_metadata_and_validates_arguments():
    k, t = 2, 3
    sums = RatioSums.zeros(k, [0, 5, 9], (1, 1, 2))
    sums.count += 4
    sums.sum_c += 4.0
    sums.sum_u += 8.0
    sums.sum_u[0, 1, 0, 0, 1] = 4e-8  # mean 1e-8: near zero for delta=1e-6
    sums.sum_cu += 2.0
    sums.sum_uu += 4.0
    table = sums.finalize("paper", delta=1e-6, clamp=(0.0, 0.75))
    assert table.ratios[0, 1, 0, 0, 1].item() == 1.0 - 0.25  # R = 1 by the rule, then clamped to 0.75
    assert table.ratios[1, 0, 0, 0, 0].item() == 0.5
    # clamped: that element (R = 1) and the mean row's at the same place (pooled 8 / (8 + 4e-8) ~ 1)
    assert table.ratios[2, 1, 0, 0, 1].item() == 0.75
    assert table.metadata["near_zero_count"] == "1" and table.metadata["clamped_count"] == "2"
    assert json.loads(table.metadata["clamp"]) == [0.0, 0.75] and float(table.metadata["delta"]) == 1e-6
    assert table.metadata["elements"] == str((k + 1) * t * 2)
    with pytest.raises(ValueError, match="estimator"):
        sums.finalize("ratio")
    with pytest.raises(ValueError, match="clamp"):
        sums.finalize("paper", clamp=(2.0, 1.0))
    with pytest.raises(ValueError, match="delta"):
        sums.finalize("paper", delta=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        sums.finalize("paper", dtype=torch.int32)
    sums.count[1, 2] = 0
    with pytest.raises(ValueError, match="no samples"):
        sums.finalize("paper")


# ---------------------------------------------------------------------- saved sums, checkpoint / resume
def test_sums_round_trip_and_finalize_both_estimators_from_one_build(tmp_path):
    mu, model = make_problem(num_classes=2)
    sums = build(model, *dataset(mu, 5), 5)
    sums.save(tmp_path / "s.safetensors")
    back = RatioSums.load(tmp_path / "s.safetensors")
    for name, t in sums.tensors().items():
        assert torch.equal(back.tensors()[name], t)
    for est in ("paper", "least_squares"):
        assert torch.equal(back.finalize(est).ratios, sums.finalize(est).ratios)


class Crash(RuntimeError):
    pass


def test_killed_build_resumes_to_the_identical_sums(tmp_path):
    mu, model = make_problem(num_classes=3)
    images, labels = dataset(mu, 10)  # 30 images, batch 4 -> 8 batches x 4 timesteps = 32 calls
    full = build(model, images, labels, 10, batch_size=4)
    ckpt = tmp_path / "ckpt.safetensors"

    def dies_after(n):
        def m(x, t, c):
            if m.calls >= n:
                raise Crash("killed")
            m.calls += 1
            return model(x, t, c)
        m.calls = 0
        return m

    with pytest.raises(Crash):
        build(dies_after(13), images, labels, 10, batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    partial = RatioSums.load(ckpt)
    assert partial.metadata["batches_done"] == "2" and partial.metadata["batches_total"] == "8"
    with pytest.raises(Crash):  # a second crash, later, after resuming once
        build(dies_after(4 * 3 + 1), images, labels, 10, batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    assert RatioSums.load(ckpt).metadata["batches_done"] == "4"
    calls_before = model.calls
    resumed = build(model, images, labels, 10, batch_size=4, checkpoint=ckpt, checkpoint_every=2)
    assert model.calls - calls_before == 4 * len(GRID)  # only the 4 remaining batches ran
    for name, t in full.tensors().items():
        assert torch.equal(resumed.tensors()[name], t), name
    assert torch.equal(resumed.finalize("paper").ratios, full.finalize("paper").ratios)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind
    with pytest.raises(ValueError, match="checkpoint: .* different build"):
        build(model, images, labels, 10, batch_size=4, checkpoint=ckpt, seed=4)


# ---------------------------------------------------------------------- non-class conditions
def test_condition_ids_for_embedding_models_and_mean_row_fallback():
    mu, model = make_problem(num_classes=3)
    emb = torch.randn(5, 7, dtype=torch.float64)  # 5 "prompts"; the model keys on the embedding
    null_emb = torch.zeros(7, dtype=torch.float64)

    def emb_model(x, t, e):  # maps an embedding back to its class row: a stand-in for a text encoder's output
        table = torch.cat([emb, null_emb[None]])
        idx = (e[:, None, :] - table[None]).abs().sum(-1).argmin(1)
        return model(x, t, torch.where(idx >= 3, 3, idx))

    wrapped = ConditionIdModel(emb_model, emb, null_emb)
    images, labels = dataset(mu, 6)
    grid = np.array([0, 500, 999])
    via_ids = build(wrapped, images, labels, 6, num_classes=3, null_cond=wrapped.null_id, timesteps=grid)
    direct = build(model, images, labels, 6, num_classes=3, null_cond=3, timesteps=grid)
    for name, t in direct.tensors().items():
        assert torch.equal(via_ids.tensors()[name], t), name
    table = via_ids.finalize("least_squares")
    guide = fg.ReCFG(2.0, table=table, unknown_label="mean")
    assert table.rows_for(torch.tensor([0, 4]), "mean").tolist() == [0, 3]  # prompt 4 has no row: mean row
    out = fg.Sampler(wrapped, fg.DDIM(SCHED, steps=4), guide, null_cond=wrapped.null_id, progress=False).sample(
        fg.seeded_noise([1, 2], SHAPE, dtype=torch.float64), torch.tensor([0, 4]))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="null_embedding"):
        ConditionIdModel(emb_model, emb, torch.zeros(3))
