"""fastguide.pipelines: a diffusers pipeline's own call with fastguide's sampler, against ``pipe(...)`` itself.

Tiny random-weight pipelines built offline from configs (fastguide/bench/tiny_pipelines.py: SD, SDXL, SD3 with CLIP
text encoders from transformers configs and a CLIP tokenizer from vocabulary files it writes; DiT). fastguide's images equal ``pipe(...).images`` for the same prompts,
negative prompts, steps, scale and per-image generators within 1e-4 (float32), with the pipeline's default
scheduler and with others; every output type; bad input named."""
import numpy as np
import pytest
import torch

import fastguide as fg
from fastguide.bench import tiny_pipelines
from fastguide.pipelines import from_pipe
from benchmark_scripts import load_benchmark
from pipeline_checks import TOL, as_tensor, assert_close, generators  # noqa: E402

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,  # noqa: E402
                       UniPCMultistepScheduler)

PROMPTS, NEGATIVES = ["a cat", "low dog", "lower"], ["", "blurry", "low"]


@pytest.fixture(scope="module")
def sd_pipe(clip_tokenizer):
    return tiny_pipelines.tiny_sd(clip_tokenizer)


@pytest.mark.parametrize("scheduler", ["pndm (shipped)", "ddim", "dpm++2m", "unipc", "euler", "euler-ancestral",
                                       "ddpm", "sde-dpm++2m"])
def test_sd_images_equal_the_pipelines_own(sd_pipe, scheduler):
    """Stochastic schedulers too: their per-step noise is drawn from the pipeline's generator in its order."""
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm++2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler,
               "euler": EulerDiscreteScheduler, "euler-ancestral": EulerAncestralDiscreteScheduler,
               "ddpm": DDPMScheduler, "sde-dpm++2m": DPMSolverMultistepScheduler}
    shipped = sd_pipe.scheduler
    try:
        if scheduler in classes:
            extra = {"algorithm_type": "sde-dpmsolver++"} if scheduler.startswith("sde") else {}
            sd_pipe.scheduler = classes[scheduler].from_config(shipped.config, **extra)
        fast = from_pipe(sd_pipe)
        for steps, scale in ((4, 5.0), (6, 1.0)):
            kw = dict(negative_prompt=NEGATIVES, num_inference_steps=steps, guidance_scale=scale, output_type="np")
            want = sd_pipe(PROMPTS, generator=generators(), **kw).images
            got = fast(PROMPTS, generator=generators(), **kw)
            assert_close(got, want)
            assert as_tensor(want).std() > 0.01  # not a constant image
    finally:
        sd_pipe.scheduler = shipped


def test_sd_every_output_type_and_a_single_generator(sd_pipe):
    fast = from_pipe(sd_pipe)
    kw = dict(num_inference_steps=3, guidance_scale=4.0)
    for output_type in ("pil", "pt", "latent"):
        want = sd_pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type, **kw).images
        got = fast(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type, **kw)
        assert type(got) is type(want)
        assert_close(got, want, tol=1.0 / 255 if output_type == "pil" else TOL)  # PIL: one 8-bit level of rounding


def test_sd_with_a_channels_last_unet_images_equal_the_pipelines_own(sd_pipe):
    """A user's channels_last UNet (eager and compiled) runs as it is: fastguide neither converts it back nor
    needs it converted (docs/adapters.md: it did not help these tiny UNets on the CPU)."""
    kw = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    sd_pipe.unet.to(memory_format=torch.channels_last)
    try:
        assert sd_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        want = sd_pipe(PROMPTS, generator=generators(), **kw).images
        assert_close(from_pipe(sd_pipe)(PROMPTS, generator=generators(), **kw), want)
        assert_close(from_pipe(sd_pipe).compile()(PROMPTS, generator=generators(), **kw), want)
    finally:
        sd_pipe.unet.to(memory_format=torch.contiguous_format)


def test_sd_negative_prompts_matter_and_rules_and_seeds(sd_pipe):
    fast = from_pipe(sd_pipe)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    plain = fast(PROMPTS, generator=generators(), **kw)
    negated = fast(PROMPTS, negative_prompt=NEGATIVES, generator=generators(), **kw)
    assert torch.equal(plain[0], negated[0])  # "" is the default negative prompt
    assert not torch.allclose(plain[1], negated[1], atol=1e-3)
    apg = fast(PROMPTS, guidance=fg.APG(5.0, eta=0.0), generator=generators(), **kw)
    assert not torch.allclose(apg, plain, atol=1e-3)
    seeded = fast(PROMPTS, seeds=[4, 5, 6], **kw)
    alone = fast([PROMPTS[1]], seeds=[5], **kw)[0]  # per-prompt seeds: the same noise in any batch (the network's
    assert_close(alone, seeded[1])  # floats can move with the batch size, so not bit for bit)
    assert not torch.allclose(alone, seeded[2], atol=1e-2)


def test_sd_bad_input(sd_pipe):
    fast = from_pipe(sd_pipe)
    with pytest.raises(ValueError, match="negative_prompt: expected a string or 3 strings"):
        fast(PROMPTS, negative_prompt=["a", "b"], num_inference_steps=2)
    with pytest.raises(ValueError, match="generator: a list of 2 generators for 3 images"):
        fast(PROMPTS, generator=generators((1, 2)), num_inference_steps=2)
    with pytest.raises(ValueError, match="seeds: pass seeds or generator, not both"):
        fast(PROMPTS, generator=generators(), seeds=[1, 2, 3], num_inference_steps=2)
    with pytest.raises(ValueError, match="seeds: expected 3 seeds"):
        fast(PROMPTS, seeds=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type: expected one of"):
        fast(PROMPTS, output_type="jpeg", num_inference_steps=2)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        fast(PROMPTS, num_inference_steps=0)
    with pytest.raises(TypeError, match="prompt: expected a string or a non-empty list"):
        fast([], num_inference_steps=2)
    with pytest.raises(ValueError, match="height, width: expected multiples of 2"):
        fast(PROMPTS, height=15, num_inference_steps=2)


@pytest.fixture(scope="module")
def dit_pipe():
    return tiny_pipelines.tiny_dit()


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++2m"])
def test_dit_images_equal_the_pipelines_own(dit_pipe, scheduler):
    shipped = dit_pipe.scheduler
    try:
        if scheduler == "dpm++2m":
            dit_pipe.scheduler = DPMSolverMultistepScheduler.from_config(shipped.config)
        fast = from_pipe(dit_pipe)
        labels = [3, 999, 41]
        for output_type in ("np", "pt", "pil"):
            kw = dict(num_inference_steps=5, guidance_scale=4.0, output_type=output_type)
            want = dit_pipe(labels, generator=generators(), **kw).images
            got = fast(labels, generator=generators(), **kw)
            assert_close(got, want, tol=1.0 / 255 if output_type == "pil" else TOL)
    finally:
        dit_pipe.scheduler = shipped


def test_unsupported_pipelines_are_refused(dit_pipe):
    class SomePipeline:
        pass

    with pytest.raises(ValueError, match="pipe: SomePipeline is not supported"):
        from_pipe(SomePipeline())
    with pytest.raises(TypeError, match="class_labels: expected a non-empty list"):
        from_pipe(dit_pipe)(7)


@pytest.fixture(scope="module")
def sdxl_pipe(clip_tokenizer):
    return tiny_pipelines.tiny_sdxl(clip_tokenizer)


@pytest.mark.parametrize("scheduler", ["euler (shipped)", "dpm++2m"])
def test_sdxl_images_equal_the_pipelines_own(sdxl_pipe, scheduler):
    shipped = sdxl_pipe.scheduler
    try:
        if scheduler == "dpm++2m":
            sdxl_pipe.scheduler = DPMSolverMultistepScheduler.from_config(shipped.config)
        fast = from_pipe(sdxl_pipe)
        cases = [dict(negative_prompt=NEGATIVES), dict(negative_prompt=None),  # None: zeros (force_zeros_for_empty)
                 dict(negative_prompt="blurry", original_size=(64, 48), crops_coords_top_left=(4, 2))]
        for extra in cases:
            kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np", **extra)
            want = sdxl_pipe(PROMPTS, generator=generators(), **kw).images
            got = fast(PROMPTS, generator=generators(), **kw)
            assert_close(got, want)
    finally:
        sdxl_pipe.scheduler = shipped


def test_sdxl_time_ids_reach_the_unet(sdxl_pipe):
    fast = from_pipe(sdxl_pipe)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="latent")
    plain = fast(PROMPTS[:1], seeds=[3], **kw)
    cropped = fast(PROMPTS[:1], seeds=[3], crops_coords_top_left=(8, 8), **kw)
    assert not torch.allclose(plain, cropped, atol=1e-4)


@pytest.fixture(scope="module")
def sd3_pipe(clip_tokenizer):
    return tiny_pipelines.tiny_sd3(clip_tokenizer)


def test_sd3_images_equal_the_pipelines_own(sd3_pipe):
    fast = from_pipe(sd3_pipe)
    for output_type in ("np", "latent"):
        kw = dict(negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=5.0, output_type=output_type,
                  max_sequence_length=16)
        want = sd3_pipe(PROMPTS, generator=generators(), **kw).images
        got = fast(PROMPTS, generator=generators(), **kw)
        assert_close(got, want)


def test_sd3_with_its_t5_encoder_images_equal_the_pipelines_own(clip_tokenizer):
    pipe = tiny_pipelines.tiny_sd3(clip_tokenizer, t5=True)
    fast = from_pipe(pipe)
    kw = dict(negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=5.0, output_type="np",
              max_sequence_length=16)
    want = pipe(PROMPTS, generator=generators(), **kw).images
    assert_close(fast(PROMPTS, generator=generators(), **kw), want)
    without = pipe.text_encoder_3
    pipe.text_encoder_3 = None  # the T5 tokens reach the transformer: zeros in their place change the images
    try:
        assert not np.allclose(pipe(PROMPTS, generator=generators(), **kw).images, want, atol=1e-3)
    finally:
        pipe.text_encoder_3 = without


# ---------------------------------------------------------------------------------------- ReCFG through each family
def reference_recfg_loop(scheduler, steps, latents, forward, scale, ratios, cond_first):
    """The pipelines' denoising loop written out with ReCFG's rule m = g m_c + (1 - g) R m_u, R = ``ratios[:, i]``
    (each sample's table row at step i): the by-hand reference."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        first, second = forward(model_in, t).chunk(2)
        m_c, m_u = (first, second) if cond_first else (second, first)
        latents = scheduler.step(scale * m_c + (1 - scale) * ratios[:, i] * m_u, t, latents, return_dict=False)[0]
    return latents


def step_table(scheduler, steps, classes, shape, seed=4):
    """A ratio table whose grid is the scheduler's timesteps (each step reads one row, no interpolation), random
    ratios near 1; returns (table, ratios by sampler step [K + 1, S, ...])."""
    scheduler.set_timesteps(steps)
    times = scheduler.timesteps.double().flip(0)  # increasing
    ratios = 1 + 0.3 * torch.rand(classes + 1, steps, *shape, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)
    return fg.RatioTable(ratios, timesteps=times), ratios.flip(1).float()


@torch.no_grad()
def test_sd_recfg_equals_the_loop_written_out(sd_pipe):
    shipped = sd_pipe.scheduler
    try:
        sd_pipe.scheduler = DDIMScheduler.from_config(shipped.config)
        fast, ids, steps = from_pipe(sd_pipe), [2, 0, 1], 4
        table, by_step = step_table(sd_pipe.scheduler, steps, 3, (4, 8, 8))
        got = fast(PROMPTS, negative_prompt="blurry", num_inference_steps=steps, guidance=fg.ReCFG(3.0, table=table),
                   condition_ids=ids, generator=generators(), output_type="latent")
        pos, neg = sd_pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=["blurry"] * 3)
        embeds = torch.cat([neg, pos])  # StableDiffusionPipeline: [negative | prompt]
        latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators()])
        want = reference_recfg_loop(sd_pipe.scheduler, steps, latents,
                                    lambda x, t: sd_pipe.unet(x, t, encoder_hidden_states=embeds).sample, 3.0,
                                    by_step[ids], cond_first=False)
        assert_close(got, want)
        cfg = fast(PROMPTS, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=3.0,
                   generator=generators(), output_type="latent")
        assert not torch.allclose(got, cfg, atol=1e-3)  # the table entries are used
        ones = fg.ReCFG(3.0, table=fg.RatioTable(torch.ones_like(table.ratios), timesteps=table.timesteps))
        same = fast(PROMPTS, negative_prompt="blurry", num_inference_steps=steps, guidance=ones, condition_ids=ids,
                    generator=generators(), output_type="latent")
        assert_close(same, cfg)
    finally:
        sd_pipe.scheduler = shipped


def test_condition_ids_bad_input(sd_pipe):
    fast = from_pipe(sd_pipe)
    table = fg.RatioTable(torch.ones(4, 2, 4, 8, 8), timesteps=[0.0, 999.0])
    kw = dict(num_inference_steps=2, guidance=fg.ReCFG(2.0, table=table))
    with pytest.raises(ValueError, match="negative_prompt: with condition_ids every prompt needs the same"):
        fast(PROMPTS, negative_prompt=NEGATIVES, condition_ids=[0, 1, 2], **kw)
    with pytest.raises(ValueError, match="condition_ids: expected 3 ints"):
        fast(PROMPTS, condition_ids=[0, 1], **kw)
    with pytest.raises(ValueError, match=r"condition_ids: 5 is outside the ratio table's conditions \[0, 3\)"):
        fast(PROMPTS, condition_ids=[0, 1, 5], **kw)
    with pytest.raises(ValueError, match="condition_ids: id 1 is given to two different prompts"):
        fast(PROMPTS, condition_ids=[0, 1, 1], **kw)
    with pytest.raises(TypeError, match="cond: ReCFG needs integer condition ids"):
        fast(PROMPTS, **kw)


@torch.no_grad()
def test_dit_recfg_equals_the_loop_written_out(dit_pipe):
    fast, labels, steps = from_pipe(dit_pipe), [3, 999, 41], 5
    table, by_step = step_table(dit_pipe.scheduler, steps, 1000, (4, 8, 8))
    got = fast(labels, num_inference_steps=steps, guidance=fg.ReCFG(4.0, table=table), generator=generators(),
               output_type="latent")
    latents = torch.stack([torch.randn((4, 8, 8), generator=g) for g in generators()])
    class_in = torch.tensor(labels + [1000] * 3)  # DiTPipeline: [cond | null]

    def forward(x, t):
        return dit_pipe.transformer(x, timestep=t.expand(x.shape[0]), class_labels=class_in).sample[:, :4]

    want = reference_recfg_loop(dit_pipe.scheduler, steps, latents, forward, 4.0, by_step[labels], cond_first=True)
    assert_close(got, want)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_recfg_runs_through_sdxl_and_sd3(family, sdxl_pipe, sd3_pipe):
    """ReCFG with a table of ones is CFG; a random table changes the sample (its rows are read)."""
    pipe = sdxl_pipe if family == "sdxl" else sd3_pipe
    fast, steps = from_pipe(pipe), 3
    solver = fast.solver(steps)
    times = solver.plan.timesteps.double().flip(0)
    shape = (4, 8, 8)
    rand = 1 + 0.3 * torch.rand(4, steps, *shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    kw = dict(negative_prompt="blurry", num_inference_steps=steps, condition_ids=[0, 2, 1], seeds=[1, 2, 3],
              output_type="latent")
    if family == "sd3":
        kw["max_sequence_length"] = 16
    cfg = fast(PROMPTS, guidance_scale=3.0, **{k: v for k, v in kw.items() if k != "condition_ids"})
    ones = fast(PROMPTS, guidance=fg.ReCFG(3.0, table=fg.RatioTable(torch.ones_like(rand), timesteps=times)), **kw)
    recfg = fast(PROMPTS, guidance=fg.ReCFG(3.0, table=fg.RatioTable(rand, timesteps=times)), **kw)
    assert_close(ones, cfg)
    assert not torch.allclose(recfg, cfg, atol=1e-3)


# ---------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["sd", "dit"])
def test_low_precision_components_are_as_close_to_float32_as_the_pipeline(family, dtype):
    """The pipeline in bf16 / fp16: fastguide's images (its step computes in float32) are about as close to the
    float32 pipeline's as the pipeline's own half-precision images: within 1.5x their error plus the dtype's
    epsilon (measured: 0.7-1.2x)."""
    pipe = tiny_pipelines.tiny_sd() if family == "sd" else tiny_pipelines.tiny_dit()
    if family == "sd":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    args = (PROMPTS,) if family == "sd" else ([1, 5, 9],)
    kw = dict(num_inference_steps=4, guidance_scale=4.0, output_type="np")
    reference = as_tensor(pipe(*args, generator=generators(), **kw).images)
    pipe.to(dtype)
    theirs = as_tensor(pipe(*args, generator=generators(), **kw).images).float()
    ours = as_tensor(from_pipe(pipe)(*args, generator=generators(), **kw)).float()
    their_error, our_error = float((theirs - reference).abs().max()), float((ours - reference).abs().max())
    assert their_error > 0  # the half-precision run really is one
    assert our_error <= 1.5 * their_error + torch.finfo(dtype).eps, (our_error, their_error)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "dit", "flux", "flux-true-cfg", "pixart-alpha", "lcm"])
def test_a_call_looks_up_the_execution_device_no_more_often_than_the_pipelines_own(family, monkeypatch):
    """diffusers' ``_execution_device`` walks every component's modules (~2-4 ms a lookup on the tiny pipelines,
    a share of a whole call there): fastguide's call asks for it once, as the pipeline's own call does."""
    bench = load_benchmark("pipelines_bench")
    pipe = bench.BUILDERS[family]()
    args, kw = bench.call_args(family, 2, 2)
    fast = from_pipe(pipe)
    fast(*args, **kw)  # the first call builds the sampler (its own lookups)
    lookups = []
    looked_up = type(pipe)._execution_device

    def counted(self):
        lookups.append(1)
        return looked_up.fget(self)

    monkeypatch.setattr(diffusers.DiffusionPipeline, "_execution_device", property(counted))
    fast(*args, **kw)
    ours = len(lookups)
    lookups.clear()
    pipe(*args, **{**kw, **bench.PIPE_ONLY.get(family, {})})
    assert ours <= max(1, len(lookups)), (ours, len(lookups))
