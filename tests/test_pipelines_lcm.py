"""fastguide.pipelines.lcm: LatentConsistencyModelPipeline's own call with fastguide's sampler, against ``pipe(...)``.

A tiny random-weight pipeline built offline (fastguide/bench/tiny_pipelines.py: tiny_lcm; UNet2DConditionModel with a
guidance embedding, time_cond_proj_dim=32; a CLIP text encoder from a transformers config with conftest's CLIP
tokenizer; AutoencoderKL; LCMScheduler). fastguide's images equal ``pipe(...).images`` within 1e-4 (float32) at 1, 2
and 4 steps, two guidance scales, other original_inference_steps (per call and in the scheduler's config),
per-prompt and single generators (the scheduler's per-step noise drawn from them in its order), every output type;
per-prompt scales equal each prompt alone; per-prompt seeds; the bound can fail; bad input named."""
import types

import pytest
import torch

import fastguide as fg

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import DDIMScheduler, LCMScheduler, UNet2DConditionModel  # noqa: E402

from fastguide.bench.tiny_pipelines import SD_UNET, tiny_lcm  # noqa: E402
from fastguide.pipelines.lcm import LatentConsistency, LatentConsistencyAdapter  # noqa: E402
from pipeline_checks import TOL, as_tensor, assert_close, generators, relative_error  # noqa: E402

PROMPTS = ["a cat", "low dog", "lower"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lcm_pipe(clip_tokenizer):
    return tiny_lcm(clip_tokenizer)


@pytest.fixture(scope="module")
def fast(lcm_pipe):
    return LatentConsistency(lcm_pipe)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_images_equal_the_pipelines_own(lcm_pipe, fast, steps):
    images = []
    for scale in (8.5, 2.0):
        kw = dict(num_inference_steps=steps, guidance_scale=scale, output_type="np")
        want = lcm_pipe(PROMPTS, generator=generators(), **kw).images
        got = fast(PROMPTS, generator=generators(), **kw)
        assert_close(got, want)
        assert as_tensor(want).std() > 0.01  # not a constant image
        images.append(want)
    assert relative_error(*images) > 1e-3  # the scale reaches the UNet (its timestep_cond)


def test_lcm_other_original_inference_steps_per_call_and_in_the_config(lcm_pipe, fast):
    kw = dict(num_inference_steps=4, original_inference_steps=20, guidance_scale=6.0, output_type="latent")
    assert_close(fast(PROMPTS, generator=generators(), **kw), lcm_pipe(PROMPTS, generator=generators(), **kw).images)
    shipped = lcm_pipe.scheduler
    try:
        lcm_pipe.scheduler = LCMScheduler.from_config(shipped.config, original_inference_steps=10, timestep_scaling=1.0)
        kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np")
        assert_close(fast(PROMPTS, generator=generators(), **kw),
                     lcm_pipe(PROMPTS, generator=generators(), **kw).images)
    finally:
        lcm_pipe.scheduler = shipped


def test_lcm_every_output_type_and_a_single_generator(lcm_pipe, fast):
    """One generator gives the initial latents and then each step's noise, in the scheduler's order."""
    kw = dict(num_inference_steps=4, guidance_scale=8.5)
    for output_type in ("np", "pt", "latent", "pil"):
        want = lcm_pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type, **kw).images
        got = fast(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type, **kw)
        assert type(got) is type(want)
        assert_close(got, want, tol=1.0 / 255 if output_type == "pil" else TOL)  # PIL: one 8-bit level of rounding


def test_lcm_per_prompt_scales_equal_each_prompt_alone_and_seeds(lcm_pipe, fast):
    scales = [8.5, 2.0, 5.0]
    kw = dict(num_inference_steps=2, output_type="latent")
    got = fast(PROMPTS, guidance_scale=scales, generator=generators(), **kw)
    for i, (prompt, scale, gen) in enumerate(zip(PROMPTS, scales, generators())):
        assert_close(got[i:i + 1], lcm_pipe(prompt, guidance_scale=scale, generator=[gen], **kw).images)
    seeded = fast(PROMPTS, seeds=[4, 5, 6], **kw)
    alone = fast([PROMPTS[1]], seeds=[5], **kw)[0]  # the same noise in any batch
    assert_close(alone, seeded[1])
    assert relative_error(alone, seeded[2]) > 1e-2


def test_lcm_the_bound_can_fail(lcm_pipe, fast):
    """The embedding of w = guidance_scale (not guidance_scale - 1), or the noise of another generator after the
    same initial latents: each moves the images far past the bound."""
    kw = dict(num_inference_steps=4, output_type="np")
    want = lcm_pipe(PROMPTS, guidance_scale=4.0, generator=generators(), **kw).images
    assert relative_error(fast(PROMPTS, guidance_scale=5.0, generator=generators(), **kw), want) > 1e-3
    latents = lcm_pipe.prepare_latents(3, 4, 16, 16, torch.float32, "cpu", generators())
    other_noise = lcm_pipe(PROMPTS, guidance_scale=4.0, latents=latents, generator=generators((7, 8, 9)), **kw).images
    assert relative_error(other_noise, want) > 1e-3


def test_lcm_bad_input(lcm_pipe, fast):
    with pytest.raises(ValueError, match="guidance: LatentConsistencyModelPipeline has no unconditional branch"):
        fast(PROMPTS, guidance=fg.CFG(2.0))
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number or 3 of them"):
        fast(PROMPTS, guidance_scale=[2.0, 3.0])
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number or 3 of them"):
        fast(PROMPTS, guidance_scale="high")
    with pytest.raises(ValueError, match="guidance_scale: expected a finite number"):
        fast(PROMPTS, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"num_inference_steps: expected <= original_inference_steps \(50"):
        fast(PROMPTS, num_inference_steps=51)
    with pytest.raises(ValueError, match=r"num_inference_steps: expected <= original_inference_steps \(3"):
        fast(PROMPTS, num_inference_steps=4, original_inference_steps=3)
    with pytest.raises(ValueError, match="original_inference_steps: expected an int >= 1"):
        fast(PROMPTS, original_inference_steps=0)
    with pytest.raises(ValueError, match="original_inference_steps: expected <= num_train_timesteps"):
        fast(PROMPTS, original_inference_steps=2000)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        fast(PROMPTS, num_inference_steps=0)
    with pytest.raises(ValueError, match="generator: a list of 2 generators for 3 images"):
        fast(PROMPTS, generator=generators((1, 2)), num_inference_steps=2)
    with pytest.raises(ValueError, match="seeds: pass seeds or generator, not both"):
        fast(PROMPTS, generator=generators(), seeds=[1, 2, 3], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type: expected one of"):
        fast(PROMPTS, output_type="jpeg")
    with pytest.raises(TypeError, match="prompt: expected a string or a non-empty list"):
        fast([])
    with pytest.raises(ValueError, match="height, width: expected multiples of 2"):
        fast(PROMPTS, height=15, num_inference_steps=2)
    shipped = lcm_pipe.scheduler
    try:
        lcm_pipe.scheduler = DDIMScheduler.from_config(shipped.config)
        with pytest.raises(ValueError, match=r"pipe.scheduler: expected an LCMScheduler .*, got DDIMScheduler"):
            fast(PROMPTS, num_inference_steps=2)
    finally:
        lcm_pipe.scheduler = shipped
    with pytest.raises(ValueError, match="pipe: has a safety checker"):
        LatentConsistency(types.SimpleNamespace(safety_checker=object(), unet=lcm_pipe.unet))
    with pytest.raises(ValueError, match="unet: expected a guidance-distilled UNet"):
        LatentConsistencyAdapter(UNet2DConditionModel(**SD_UNET))
    with pytest.raises(TypeError, match="unet: expected a diffusers.UNet2DConditionModel"):
        LatentConsistencyAdapter(lcm_pipe.vae)
    adapter = fast.model
    with pytest.raises(TypeError, match=r"cond: expected a packed condition \[2, L \+ 1, 32\]"):
        adapter(torch.zeros(2, 4, 8, 8), torch.zeros(2), torch.zeros(2, 77, 16))
