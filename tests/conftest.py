"""Shared test setup: the Triton interpreter switch, the per-test seed, and the toy models and fixtures that more
than one test file uses (tests take them as fixtures; nothing imports this module)."""
import os

# The Triton interpreter must be chosen before any @triton.jit runs, so before fastguide.kernels is imported.
# On a CUDA machine set FASTGUIDE_TEST_CUDA=1 to run the same kernel tests on the GPU instead.
if not os.environ.get("FASTGUIDE_TEST_CUDA"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastguide as fg  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny models
    run 10-50x slower with 2 threads on a shared 2-core machine (spin waits); results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ a mix + label-embedding eps model
class ToyEps:
    """A deterministic nonlinear conditional eps model whose conditional and null outputs differ:
    tanh(mix x + emb[cond] / 2 + t / 1000), mix a fixed [C, C] channel mix (entries N(0, 1/4)) and emb a fixed
    [num_labels, *shape] label embedding, both drawn in float64 from ``seed`` and cast to x's dtype. Records
    the batch size of every call in ``batch_sizes``."""

    def __init__(self, shape, num_labels: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(shape[0], shape[0], generator=gen, dtype=torch.float64) / 2
        self.label_emb = torch.randn(num_labels, *shape, generator=gen, dtype=torch.float64)
        self.batch_sizes = []

    def __call__(self, x, t, cond):
        self.batch_sizes.append(x.shape[0])
        h = (self.mix.to(x.dtype)[None, :, :, None, None] * x[:, None]).sum(2)
        h = h + self.label_emb.to(x.dtype)[cond] / 2 + (t.to(x.dtype) / 1000).view(-1, 1, 1, 1)
        return torch.tanh(h)


@pytest.fixture
def toy_eps():
    """The ToyEps class: ToyEps(shape, num_labels, seed) builds one for a file's own latents."""
    return ToyEps


TOY_SHAPE, TOY_NULL = (3, 5, 3), 4


@pytest.fixture
def toy_model():
    """The ToyEps of test_sampler.py and test_loop.py: [3, 5, 3] latents, labels 0..4 (4 is the null label),
    seed 21."""
    return ToyEps(TOY_SHAPE, TOY_NULL + 1, seed=21)


@pytest.fixture
def sampler_for(toy_model):
    """sampler_for(solver, guidance=CFG(2.5), **kw): a Sampler of toy_model with null label 4 on the torch
    backend, progress bar off unless kw says otherwise."""

    def make(solver, guidance=None, **kw):
        kw.setdefault("progress", False)
        return fg.Sampler(toy_model, solver, guidance or fg.CFG(2.5), null_cond=TOY_NULL, backend="torch", **kw)

    return make


# ------------------------------------------------------------------ the input-checking kit
class TanhKit:
    """What the bad-input tests of several files share: ``model(x, t, cond) = tanh(x + t / 1000)`` (it ignores
    cond), [2, 3, 3] latents, ``LABELS`` [0, 1] with the null label 3, ``noise(batch)`` (float64 randn from the
    global RNG) and ``sampler(guidance=CFG(2.0), solver=DDIM(linear, 4 steps), **kw)`` on the torch backend with
    the progress bar off."""

    SHAPE = (2, 3, 3)
    NULL = 3
    SCHEDULE = fg.NoiseSchedule.linear()

    def __init__(self):
        self.LABELS = torch.tensor([0, 1])

    @staticmethod
    def model(x, t, cond):
        return torch.tanh(x + (t / 1000).view(-1, 1, 1, 1).to(x.dtype))

    def sampler(self, guidance=None, solver=None, **kw):
        kw.setdefault("null_cond", self.NULL)
        return fg.Sampler(self.model, solver or fg.DDIM(self.SCHEDULE, steps=4), guidance or fg.CFG(2.0),
                          backend="torch", progress=False, **kw)

    def noise(self, batch=2):
        return torch.randn(batch, *self.SHAPE, dtype=torch.float64)


@pytest.fixture
def tanh_kit():
    return TanhKit()


# ------------------------------------------------------------------ a small conv net (compiled-sampler tests)
class TinyNet(torch.nn.Module):
    """A small nonlinear conditional eps model (conv + label and time embeddings) on 2-channel latents."""

    CHANNELS = 2

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(self.CHANNELS, self.CHANNELS, 3, padding=1)
        self.emb = torch.nn.Embedding(11, self.CHANNELS)

    def forward(self, x, t, c):
        h = self.conv(x) + self.emb(c)[:, :, None, None] + (t / 1000.0)[:, None, None, None]
        return torch.tanh(h)


class TinyNetSetup(NamedTuple):
    net: TinyNet
    solver: fg.DDIM
    table: fg.RatioTable  # ReCFG ratios for labels 0..9 + the null label 10, 6 steps, [2, 5, 6] latents
    batch: int
    shape: tuple


@pytest.fixture(scope="module")
def tiny_net():
    """(net, solver, table, batch, shape): TinyNet (seed 0, eval mode; null label 10), DDIM(linear, 6 steps), a
    random ratio table near 1, and the batch 4 and [2, 5, 6] latents the tests sample. One per test module."""
    torch.manual_seed(0)
    net = TinyNet().eval()
    sched = fg.NoiseSchedule.linear()
    solver = fg.DDIM(sched, steps=6)
    shape = (TinyNet.CHANNELS, 5, 6)
    table = fg.RatioTable(1 + 0.3 * torch.rand(11, 6, *shape))
    return TinyNetSetup(net, solver, table, 4, shape)


@pytest.fixture
def eager_sample():
    """eager_sample(net, solver, guide, noise, labels, **kw): an uncompiled Sampler's sample (null label 10)."""

    def sample(net, solver, guide, noise, labels, **kw):
        return fg.Sampler(net, solver, guide, null_cond=10, progress=False).sample(noise, labels, **kw)

    return sample


# ------------------------------------------------------------------ ReCFG by sampler step
@pytest.fixture
def per_step_table():
    """per_step_table(table, model_times): the ratios [K, S, ...] a RatioTable gives at each of S model times,
    interpolated here independently (np.interp over the table's grid), for a table indexed by sampler step."""
    import numpy as np

    def rows(table, model_times):
        grid = table.timesteps.numpy()
        pos = np.interp(np.asarray(model_times, dtype=np.float64), grid, np.arange(len(grid)))
        i0 = np.minimum(np.floor(pos).astype(int), len(grid) - 2)
        w = torch.from_numpy(pos - i0).view(1, -1, *([1] * (table.ratios.ndim - 2))).to(table.ratios.dtype)
        r = table.ratios
        return r[:, i0] + w * (r[:, i0 + 1] - r[:, i0])

    return rows


# ------------------------------------------------------------------ the digits demo
@pytest.fixture(scope="module")
def split():
    """The digits data split (train / held-out images and labels)."""
    from fastguide.demo.data import load_digits_split

    return load_digits_split()


# ------------------------------------------------------------------ tokenizers for tiny offline pipelines
@pytest.fixture(scope="session")
def clip_tokenizer(tmp_path_factory):
    """A CLIPTokenizer (77 tokens) from vocabulary files written here (fastguide/bench/tiny_pipelines.py: ids < 520,
    so it fits a text encoder with vocab_size 1000)."""
    from fastguide.bench.tiny_pipelines import clip_tokenizer

    return clip_tokenizer(tmp_path_factory.mktemp("clip_vocab"))


@pytest.fixture(scope="session")
def t5_tokenizer():
    """A T5TokenizerFast over a small word-level vocabulary (<pad> 0, </s> 1, <unk> 2, then a few words; ids < 12),
    built in memory: what T5-conditioned pipelines (Flux, PixArt, SD3's third encoder) call as their tokenizer."""
    from fastguide.bench.tiny_pipelines import t5_tokenizer

    return t5_tokenizer()
