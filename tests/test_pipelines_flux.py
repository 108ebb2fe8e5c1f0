"""Flux through fastguide, against ``FluxPipeline(...)`` itself; and FlowEuler's dynamic shifting against
FlowMatchEulerDiscreteScheduler's own sigmas.

Tiny random-weight pipelines built offline (fastguide/bench/tiny_pipelines.py: tiny_flux): FluxTransformer2DModel
(with and without the guidance embedding of the distilled models), a CLIP text encoder (conftest's CLIP tokenizer)
for the pooled vector, a T5 encoder (conftest's T5 tokenizer) for the tokens, an AutoencoderKL with a shift and a
scaling factor; the scheduler with dynamic shifting as Flux ships it, and with a static shift. fastguide's images
equal ``pipe(...).images`` within 1e-4 (float32) for the same prompts, negative prompts, scales, steps and per-image
generators; bad input named."""
import math

import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.diffusers_schedulers import solver_from_diffusers

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline  # noqa: E402

from fastguide.bench.tiny_pipelines import FLUX_DEV_SCHEDULER, tiny_flux  # noqa: E402
from fastguide.pipelines.flux import Flux, FluxAdapter  # noqa: E402
from pipeline_checks import TOL, as_tensor, assert_close, generators  # noqa: E402

PROMPTS, NEGATIVES = ["a cat", "a photo of the dog", "low"], ["blurry", "", "a dog"]
SIZE = dict(height=16, width=16, max_sequence_length=12)  # 8 x 8 latents: 16 packed tokens


# ------------------------------------------------------------------ FlowEuler: dynamic shifting
def _scheduler_sigmas(config, steps, mu, sigmas=None):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.double()


def _plan_sigmas(solver):
    return torch.cat([solver.plan.timesteps, torch.zeros(1, dtype=torch.float64)])


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("grid", ["scheduler's", "FluxPipeline's"])
def test_dynamic_shift_sigmas_equal_the_schedulers(time_shift_type, grid):
    config = dict(FLUX_DEV_SCHEDULER, time_shift_type=time_shift_type)
    for steps in (1, 4, 9, 28):
        sigmas = np.linspace(1.0, 1 / steps, steps) if grid == "FluxPipeline's" else None
        for mu in (0.05, 0.46, 1.15, 2.7) + ((-0.8,) if time_shift_type == "exponential" else ()):
            want = _scheduler_sigmas(config, steps, mu, sigmas)
            for solver in (fg.FlowEuler.from_diffusers(FlowMatchEulerDiscreteScheduler(**config).config, steps,
                                                       mu=mu, sigmas=sigmas),
                           fg.FlowEuler(steps, mu=mu, time_shift_type=time_shift_type, sigmas=sigmas)):
                torch.testing.assert_close(_plan_sigmas(solver), want, rtol=1e-6, atol=0)
            if steps > 1:  # (one step: sigma 1, which no shift moves)
                wrong = fg.FlowEuler(steps, mu=mu + 0.01, time_shift_type=time_shift_type, sigmas=sigmas)
                assert (_plan_sigmas(wrong) - want).abs().max() > 1e-4  # the comparison can fail


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_with_given_sigmas_equals_the_schedulers(shift):
    """FluxPipeline passes its own unshifted grid to a static-shift scheduler too (and a mu, which it ignores)."""
    for steps in (1, 5, 28):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        want = _scheduler_sigmas(dict(shift=shift), steps, 0.9, sigmas)
        config = FlowMatchEulerDiscreteScheduler(shift=shift).config
        for solver in (fg.FlowEuler.from_diffusers(config, steps, mu=0.9, sigmas=sigmas),
                       fg.FlowEuler(steps, shift=shift, sigmas=sigmas)):
            torch.testing.assert_close(_plan_sigmas(solver), want, rtol=1e-6, atol=0)
        torch.testing.assert_close(_plan_sigmas(fg.FlowEuler(steps, shift=shift)),
                                   _scheduler_sigmas(dict(shift=shift), steps, None), rtol=1e-6, atol=0)


def test_dynamic_shift_whole_sample_equals_the_scheduler():
    """A toy velocity model stepped by the scheduler itself and by the Sampler (the plan's coefficients)."""
    def velocity(x, sigma):
        return torch.tanh(x * (1 + sigma.view(-1, 1, 1, 1))) - 0.3 * x

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    steps, mu = 7, 0.8
    scheduler.set_timesteps(steps, mu=mu)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, (t / 1000).expand(2)), t, x).prev_sample
    solver = solver_from_diffusers(scheduler, steps, mu=mu)
    got = fg.Sampler(lambda x, s, c: velocity(x, s), solver, backend="torch", progress=False).sample(
        noise, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(got, x, rtol=0, atol=1e-5)


def test_dynamic_shift_bad_input():
    dynamic = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    with pytest.raises(ValueError, match=r"^mu: the config sets use_dynamic_shifting=True"):
        fg.FlowEuler.from_diffusers(dynamic.config, 4)
    with pytest.raises(ValueError, match=r"^mu: the config sets use_dynamic_shifting=True"):
        solver_from_diffusers(dynamic, 4)
    for mu in (math.nan, math.inf, "1", True):
        with pytest.raises(ValueError, match=r"^mu: expected a finite float"):
            fg.FlowEuler(4, mu=mu)
    with pytest.raises(ValueError, match=r"^mu: expected a finite float > 0 \(linear"):
        fg.FlowEuler(4, mu=0.0, time_shift_type="linear")
    with pytest.raises(ValueError, match=r"^time_shift_type: expected one of"):
        fg.FlowEuler(4, mu=1.0, time_shift_type="cubic")
    with pytest.raises(ValueError, match=r"^config: time_shift_type"):
        fg.FlowEuler.from_diffusers({**dynamic.config, "time_shift_type": "cubic"}, 4, mu=1.0)
    with pytest.raises(ValueError, match=r"^shift: 3.0 with mu"):
        fg.FlowEuler(4, shift=3.0, mu=1.0)
    with pytest.raises(ValueError, match=r"^sigmas: expected 4 finite values in \(0, 1\]"):
        fg.FlowEuler(4, sigmas=[1.0, 0.5, 0.25])
    with pytest.raises(ValueError, match=r"^sigmas: expected 2 finite values in \(0, 1\]"):
        fg.FlowEuler(2, mu=1.0, sigmas=[1.0, 0.0])
    with pytest.raises(TypeError, match=r"^sigmas: expected 2 numbers"):
        fg.FlowEuler(2, sigmas=["a", "b"])
    with pytest.raises(ValueError, match=r"^kw: this solver takes its options from the scheduler config"):
        solver_from_diffusers(dynamic, 4, mu=1.0, eta=0.5)
    with pytest.raises(ValueError, match=r"^config: use_karras_sigmas=True is not supported"):
        fg.FlowEuler.from_diffusers({**dynamic.config, "use_karras_sigmas": True}, 4, mu=1.0)


# ------------------------------------------------------------------ the Flux pipeline
@pytest.fixture(scope="module")
def distilled_pipe(clip_tokenizer, t5_tokenizer):
    """FLUX.1-dev-like: the guidance embedding, dynamic shifting."""
    return tiny_flux(True, clip_tokenizer, t5_tokenizer, seed=1)


@pytest.fixture(scope="module")
def plain_pipe(clip_tokenizer, t5_tokenizer):
    """No guidance embedding (FLUX.1-schnell-like, and what true CFG is for): a static shift by default."""
    return tiny_flux(False, clip_tokenizer, t5_tokenizer, seed=2)


def both(pipe, fast, prompts=PROMPTS, **kw):
    """(fastguide's, the pipeline's) output for the same call, each with fresh per-prompt generators."""
    kw = {**SIZE, "output_type": "np", **kw}
    want = pipe(prompts, generator=generators(range(1, len(prompts) + 1)), **kw).images
    got = fast(prompts, generator=generators(range(1, len(prompts) + 1)), **kw)
    return got, want


def test_distilled_guidance_equals_the_pipelines_own(distilled_pipe):
    """The guidance embedding carries guidance_scale; one forward a step (no negative prompt, no CFG)."""
    fast = Flux(distilled_pipe)
    outputs = []
    for steps, scale in ((3, 3.5), (5, 8.0)):
        got, want = both(distilled_pipe, fast, num_inference_steps=steps, guidance_scale=scale)
        assert_close(got, want)
        assert as_tensor(want).std() > 0.01  # not a constant image
        outputs.append(fast(PROMPTS, generator=generators(), num_inference_steps=3, guidance_scale=scale,
                            output_type="latent", **SIZE))
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)  # the scale reaches the transformer


@pytest.mark.parametrize("scheduler", ["static shift", "dynamic shift"])
def test_true_cfg_equals_the_pipelines_own(plain_pipe, scheduler):
    shipped = plain_pipe.scheduler
    try:
        if scheduler == "dynamic shift":
            plain_pipe.scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
        fast = Flux(plain_pipe)
        got, want = both(plain_pipe, fast, negative_prompt=NEGATIVES, true_cfg_scale=4.0, num_inference_steps=4)
        assert_close(got, want)
        plain, _ = both(plain_pipe, fast, num_inference_steps=4)
        assert not np.allclose(got, plain, atol=1e-3)  # the negatives are used
        assert_close(fast(PROMPTS, NEGATIVES, true_cfg_scale=1.0, num_inference_steps=4, generator=generators(),
                          output_type="np", **SIZE), plain)  # the pipeline's do_true_cfg: scale > 1 only
    finally:
        plain_pipe.scheduler = shipped


def test_true_cfg_with_the_guidance_embedding(distilled_pipe):
    fast = Flux(distilled_pipe)
    got, want = both(distilled_pipe, fast, negative_prompt="blurry", true_cfg_scale=2.5, guidance_scale=2.0,
                     num_inference_steps=3)
    assert_close(got, want)


def test_output_types(distilled_pipe):
    fast = Flux(distilled_pipe)
    for output_type in ("pt", "latent", "pil"):
        got, want = both(distilled_pipe, fast, PROMPTS[:2], num_inference_steps=2, output_type=output_type)
        assert_close(got, want, tol=1.0 / 255 if output_type == "pil" else TOL)  # PIL: one 8-bit level
    assert got[0].size == (16, 16)
    latents = fast(PROMPTS[:2], seeds=[1, 2], num_inference_steps=2, output_type="latent", **SIZE)
    assert latents.shape == (2, 16, 16)  # packed as the pipeline returns them: [B, (H/2)(W/2), 4C]


def test_image_sizes_and_sequence_lengths(distilled_pipe):
    """Each size its own mu (one solver per steps and mu), each max_sequence_length its own text tokens; with a
    scheduler whose mu moves fast with the size (16, 32 and 64 packed tokens)."""
    shipped = distilled_pipe.scheduler
    try:
        distilled_pipe.scheduler = FlowMatchEulerDiscreteScheduler(**{**FLUX_DEV_SCHEDULER, "base_image_seq_len": 4,
                                                                      "max_image_seq_len": 64, "max_shift": 2.5})
        fast = Flux(distilled_pipe)
        for kw in (SIZE, dict(height=16, width=32), dict(height=32, width=16, max_sequence_length=20),
                   dict(height=32, width=32)):
            got, want = both(distilled_pipe, fast, PROMPTS[:2], num_inference_steps=3, **{**SIZE, **kw})
            assert_close(got, want)
    finally:
        distilled_pipe.scheduler = shipped


def test_the_adapter_alone_with_a_sampler(distilled_pipe):
    """FluxAdapter without the fast pipeline: a Sampler over packed conditions, the pipeline's latents."""
    adapter = FluxAdapter.from_pipeline(distilled_pipe, guidance_scale=5.0)
    cond = FluxAdapter.encode_for(distilled_pipe, PROMPTS[:2], max_sequence_length=12)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sampler = adapter.sampler(adapter.solver(4, image_seq_len=16), backend="torch", progress=False)
    with torch.no_grad():
        got = sampler.sample(noise, cond)
    want = distilled_pipe(PROMPTS[:2], latents=FluxPipeline._pack_latents(noise, 2, 4, 8, 8), num_inference_steps=4,
                          guidance_scale=5.0, output_type="latent", **SIZE).images
    assert_close(FluxPipeline._pack_latents(got, 2, 4, 8, 8), want)


def test_seeds_and_rules(plain_pipe):
    fast = Flux(plain_pipe)
    kw = dict(num_inference_steps=3, output_type="latent", **SIZE)
    seeded = fast(PROMPTS, seeds=[4, 5, 6], **kw)
    alone = fast([PROMPTS[1]], seeds=[5], **kw)[0]
    assert_close(alone, seeded[1])
    assert not torch.allclose(alone, seeded[2], atol=1e-2)
    cfg = fast(PROMPTS, NEGATIVES, true_cfg_scale=3.0, seeds=[4, 5, 6], **kw)
    assert_close(fast(PROMPTS, NEGATIVES, guidance=fg.CFG(3.0), seeds=[4, 5, 6], **kw), cfg)  # the same rule
    zero_star = fast(PROMPTS, NEGATIVES, guidance=fg.CFGZeroStar(3.0), seeds=[4, 5, 6], **kw)
    assert not torch.allclose(zero_star, cfg, atol=1e-4)
    empty = fast(PROMPTS, guidance=fg.CFG(3.0), seeds=[4, 5, 6], **kw)  # a rule's default negative: ""
    assert_close(empty, fast(PROMPTS, [""] * 3, true_cfg_scale=3.0, seeds=[4, 5, 6], **kw))


def test_bad_input(distilled_pipe, plain_pipe):
    fast = Flux(distilled_pipe)
    kw = dict(num_inference_steps=2, **SIZE)
    with pytest.raises(ValueError, match=r"^negative_prompt: expected a string or 3 strings"):
        fast(PROMPTS, negative_prompt=["a", "b"], true_cfg_scale=2.0, **kw)
    with pytest.raises(ValueError, match=r"^generator: a list of 2 generators for 3 images"):
        fast(PROMPTS, generator=generators((1, 2)), **kw)
    with pytest.raises(ValueError, match=r"^seeds: pass seeds or generator, not both"):
        fast(PROMPTS, generator=generators(), seeds=[1, 2, 3], **kw)
    with pytest.raises(ValueError, match=r"^output_type: expected one of"):
        fast(PROMPTS, output_type="jpeg", **kw)
    with pytest.raises(ValueError, match=r"^num_inference_steps: expected an int >= 1"):
        fast(PROMPTS, **{**kw, "num_inference_steps": 0})
    with pytest.raises(TypeError, match=r"^prompt: expected a string or a non-empty list"):
        fast([], **kw)
    with pytest.raises(ValueError, match=r"^height, width: expected positive multiples of 4"):
        fast(PROMPTS, **{**kw, "height": 18})
    with pytest.raises(ValueError, match=r"^max_sequence_length: expected an int in \[1, 512\]"):
        fast(PROMPTS, **{**kw, "max_sequence_length": 513})
    for name, value in (("guidance_scale", math.nan), ("true_cfg_scale", "2"), ("guidance_scale", True)):
        with pytest.raises(ValueError, match=rf"^{name}: expected a finite number"):
            fast(PROMPTS, **{name: value}, **kw)
    with pytest.raises(ValueError, match=r"^true_cfg_scale: pass guidance= \(a fastguide rule\) or true_cfg_scale"):
        fast(PROMPTS, NEGATIVES, guidance=fg.CFG(2.0), true_cfg_scale=2.0, **kw)
    with pytest.raises(TypeError, match=r"^guidance: expected a fastguide guidance rule"):
        fast(PROMPTS, guidance="cfg", **kw)
    for unsupported in ("sigmas", "num_images_per_prompt", "ip_adapter_image", "prompt_embeds", "latents"):
        with pytest.raises(TypeError, match=unsupported):  # not taken: what the fast pipeline cannot reproduce
            fast(PROMPTS, **{unsupported: None}, **kw)
    from diffusers import FlowMatchHeunDiscreteScheduler

    shipped = plain_pipe.scheduler
    try:
        plain_pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=3.0)
        with pytest.raises(ValueError, match=r"^pipe: scheduler FlowMatchHeunDiscreteScheduler is not supported"):
            Flux(plain_pipe)
    finally:
        plain_pipe.scheduler = shipped
    adapter = FluxAdapter.from_pipeline(distilled_pipe)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(TypeError, match=r"^cond: expected a float tensor \[1, L \+ 1, 32\]"):
        adapter(x, torch.ones(1), torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match=r"^x: expected \[N, 4, H, W\] latents with even H, W"):
        adapter(torch.zeros(1, 4, 7, 8), torch.ones(1), torch.zeros(1, 5, 32))
    with pytest.raises(TypeError, match=r"^transformer: expected a diffusers.FluxTransformer2DModel"):
        FluxAdapter(torch.nn.Linear(2, 2))
