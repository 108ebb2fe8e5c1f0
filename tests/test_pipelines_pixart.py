"""fastguide.pipelines.pixart: PixArt-alpha and PixArt-sigma calls against ``pipe(...)`` itself.

Tiny random-weight PixArtAlphaPipeline / PixArtSigmaPipeline built offline (fastguide/bench/tiny_pipelines.py:
tiny_pixart; PixArtTransformer2DModel in the tiny config diffusers' own tests use, a T5EncoderModel from a tiny
T5Config with conftest's T5 tokenizer, AutoencoderKL).
fastguide's images equal ``pipe(..., clean_caption=False).images`` within 1e-4 (float32) for prompts of different
lengths (so their T5 attention masks differ), per-prompt negative prompts and generators, with the shipped
DPM-Solver++ and with DDIM and SDE-DPM-Solver++; every output type; the resolution / aspect-ratio conditions of a
sample-size-128 transformer; resolution binning; bad input named."""
import pytest
import torch

import fastguide as fg

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from fastguide.bench.tiny_pipelines import tiny_pixart, tiny_pixart_transformer  # noqa: E402
from fastguide.pipelines.pixart import PixArtAdapter, PixArtAlpha, PixArtSigma  # noqa: E402
from pipeline_checks import TOL, as_tensor, assert_close, generators  # noqa: E402

# 3, 8 and 2 T5 tokens (with </s>): three different attention masks; "low" / "blurry" as negatives
PROMPTS, NEGATIVES = ["a cat", "a low dog of the blurry photo", "lower"], ["", "blurry", "low dog"]
FAMILIES = {"alpha": PixArtAlpha, "sigma": PixArtSigma}


@pytest.fixture(scope="module")
def pipes(t5_tokenizer):
    """One tiny pipeline per family (sample size 8: 16 px with the 2x VAE; no binning table, so binning is off)."""
    return {family: tiny_pixart(family, t5_tokenizer, tiny_pixart_transformer(seed))
            for seed, family in enumerate(FAMILIES)}


def both(pipe, fast, prompts, **kw):
    """(fastguide's, the pipeline's) outputs for the same arguments and fresh per-prompt generators."""
    seeds = range(1, len(prompts) + 1)
    want = pipe(prompts, generator=generators(seeds), clean_caption=False, **kw).images
    return fast(prompts, generator=generators(seeds), **kw), want


def test_the_prompts_attention_masks_differ(pipes):
    masks = pipes["alpha"].encode_prompt(PROMPTS, False, clean_caption=False)[1]
    assert sorted(masks.sum(1).tolist()) == [2, 3, 8]


@pytest.mark.parametrize("scheduler", ["dpm++2m (shipped)", "ddim", "sde-dpm++2m"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixart_images_equal_the_pipelines_own(pipes, family, scheduler):
    """Stochastic SDE-DPM-Solver++ too: its per-step noise is drawn from the pipeline's generator in its order."""
    pipe = pipes[family]
    shipped = pipe.scheduler
    try:
        if scheduler == "ddim":
            pipe.scheduler = DDIMScheduler.from_config(shipped.config)
        elif scheduler.startswith("sde"):
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(shipped.config, algorithm_type="sde-dpmsolver++")
        fast = FAMILIES[family](pipe)
        shipped_case = scheduler.endswith("(shipped)")
        length = {} if shipped_case else dict(max_sequence_length=16)  # the shipped case: the default 120 / 300
        for steps, scale in ((4, 4.5), (3, 1.0))[:2 if shipped_case else 1]:  # 1.0: the pipeline runs no negative half
            got, want = both(pipe, fast, PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=steps,
                             guidance_scale=scale, use_resolution_binning=False, output_type="np", **length)
            assert_close(got, want)
            assert as_tensor(want).std() > 0.01  # not a constant image
    finally:
        pipe.scheduler = shipped


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixart_every_output_type_a_single_generator_and_another_sequence_length(pipes, family):
    pipe, fast = pipes[family], FAMILIES[family](pipes[family])
    kw = dict(num_inference_steps=3, use_resolution_binning=False)
    for output_type in ("pil", "pt", "latent"):
        want = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type,
                    max_sequence_length=16, clean_caption=False, **kw).images
        got = fast(PROMPTS[:2], generator=torch.Generator().manual_seed(9), output_type=output_type,
                   max_sequence_length=16, **kw)
        assert type(got) is type(want)
        assert_close(got, want, tol=1.0 / 255 if output_type == "pil" else TOL)  # PIL: one 8-bit level of rounding
    got, want = both(pipe, fast, PROMPTS, negative_prompt="blurry", max_sequence_length=9, output_type="latent", **kw)
    assert_close(got, want)
    assert fast.model.seq_len == 9


def test_pixart_alpha_resolution_and_aspect_ratio_conditions(t5_tokenizer):
    """Sample size 128 (PixArt-alpha 1024 px): the pipeline passes the size as resolution and aspect-ratio
    conditions; generated at 16 x 24 px without binning (the 1024 px bins are too large for a test)."""
    transformer = tiny_pixart_transformer(7, sample_size=128)
    assert transformer.use_additional_conditions
    pipe = tiny_pixart("alpha", t5_tokenizer, transformer)
    fast = PixArtAlpha(pipe)
    kw = dict(negative_prompt=NEGATIVES[:2], num_inference_steps=3, use_resolution_binning=False, output_type="np",
              max_sequence_length=16)
    for height, width in ((16, 24), (24, 16)):
        got, want = both(pipe, fast, PROMPTS[:2], height=height, width=width, **kw)
        assert_close(got, want)
        assert got.shape == (2, height, width, 3)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pixart_resolution_binning(t5_tokenizer, family):
    """Sample size 32 (the 256 px bins) with an 8x VAE: 200 x 300 px is generated at its bin (208 x 304) and
    resized and cropped back after decoding, as the pipeline does."""
    pipe = tiny_pixart(family, t5_tokenizer, tiny_pixart_transformer(11, sample_size=32), vae_blocks=4)
    fast = FAMILIES[family](pipe)
    kw = dict(negative_prompt=["", "blurry"], num_inference_steps=2, max_sequence_length=12, height=200, width=300)
    got, want = both(pipe, fast, PROMPTS[:2], output_type="np", **kw)
    assert got.shape == (2, 200, 300, 3)
    assert_close(got, want)
    latents = fast(PROMPTS[:1], seeds=[1], output_type="latent", **{**kw, "negative_prompt": ""})
    assert latents.shape == (1, 4, 208 // 8, 304 // 8)  # the bin's size


def test_pixart_sigma_single_step(pipes):
    """PixArt-sigma takes the scheduler's one step (PixArt-alpha returns its x0 prediction: refused below)."""
    pipe = pipes["sigma"]
    shipped = pipe.scheduler
    try:
        pipe.scheduler = DDIMScheduler.from_config(shipped.config)
        got, want = both(pipe, PixArtSigma(pipe), PROMPTS[:2], num_inference_steps=1, use_resolution_binning=False,
                         max_sequence_length=16, output_type="np")
        assert_close(got, want)
    finally:
        pipe.scheduler = shipped


def test_pixart_negative_prompts_rules_and_seeds(pipes):
    fast = PixArtSigma(pipes["sigma"])
    kw = dict(num_inference_steps=3, use_resolution_binning=False, output_type="latent", max_sequence_length=16)
    plain = fast(PROMPTS, generator=generators(), **kw)
    negated = fast(PROMPTS, negative_prompt=NEGATIVES, generator=generators(), **kw)
    assert torch.equal(plain[0], negated[0])  # "" is the default negative prompt
    assert not torch.allclose(plain[1], negated[1], atol=1e-3)
    assert torch.equal(fast(PROMPTS, negative_prompt=None, generator=generators(), **kw), plain)
    apg = fast(PROMPTS, guidance=fg.APG(4.5, eta=0.0), generator=generators(), **kw)
    assert not torch.allclose(apg, plain, atol=1e-3)
    seeded = fast(PROMPTS, seeds=[4, 5, 6], **kw)
    alone = fast([PROMPTS[1]], seeds=[5], **kw)[0]  # per-prompt seeds: the same noise in any batch
    assert_close(alone, seeded[1])
    assert not torch.allclose(alone, seeded[2], atol=1e-2)


def test_pixart_adapter_contract(pipes):
    pipe = pipes["alpha"]
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, False, clean_caption=False, max_sequence_length=10)
    cond = PixArtAdapter.pack(embeds, mask, 16, 24)
    assert cond.shape == (3, 10 + 1, 32)  # ceil((10 + 3) / 32) = 1 extra row
    adapter = PixArtAdapter(pipe.transformer, cond[0], pipe.scheduler)
    got_embeds, got_mask, resolution, aspect = adapter.unpack(cond)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_mask, mask.float())
    assert resolution.tolist() == [[16.0, 24.0]] * 3 and aspect[0].item() == pytest.approx(16 / 24)
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 500.0)
    eps = adapter(x, t, cond)
    out = pipe.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t.long(),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert torch.allclose(eps, out[:, :4], atol=1e-6)
    assert adapter.solver(5).plan.steps == 5
    with pytest.raises(ValueError, match=r"cond: expected packed conditions \(3, 11, 32\)"):
        adapter(x, t, cond[:, :-1])
    with pytest.raises(ValueError, match=r"t: expected a \[3\] tensor"):
        adapter(x, t[:2], cond)
    with pytest.raises(ValueError, match="null_cond: expected a packed condition"):
        PixArtAdapter(pipe.transformer, torch.zeros(11, 31))
    with pytest.raises(TypeError, match="transformer: expected a diffusers.PixArtTransformer2DModel"):
        PixArtAdapter(torch.nn.Linear(2, 2), cond[0])
    with pytest.raises(ValueError, match=r"mask: expected a \[3, 10\] attention mask"):
        PixArtAdapter.pack(embeds, mask[:, :5], 16, 16)


def test_pixart_bad_input(pipes, t5_tokenizer):
    fast, alpha = PixArtSigma(pipes["sigma"]), PixArtAlpha(pipes["alpha"])
    kw = dict(num_inference_steps=2, use_resolution_binning=False)
    with pytest.raises(ValueError, match="negative_prompt: expected a string or 3 strings"):
        fast(PROMPTS, negative_prompt=["a", "b"], **kw)
    with pytest.raises(ValueError, match="generator: a list of 2 generators for 3 images"):
        fast(PROMPTS, generator=generators((1, 2)), **kw)
    with pytest.raises(ValueError, match="seeds: pass seeds or generator, not both"):
        fast(PROMPTS, generator=generators(), seeds=[1, 2, 3], **kw)
    with pytest.raises(ValueError, match="output_type: expected one of"):
        fast(PROMPTS, output_type="jpeg", **kw)
    with pytest.raises(ValueError, match="num_inference_steps: expected an int >= 1"):
        fast(PROMPTS, num_inference_steps=0, use_resolution_binning=False)
    with pytest.raises(ValueError, match="num_inference_steps: PixArtAlphaPipeline returns the scheduler's x0"):
        alpha(PROMPTS, num_inference_steps=1, use_resolution_binning=False)
    with pytest.raises(TypeError, match="prompt: expected a string or a non-empty list"):
        fast([], **kw)
    with pytest.raises(ValueError, match="height, width: PixArtSigmaPipeline needs multiples of 8, got 12 x 16"):
        fast(PROMPTS, height=12, **kw)
    with pytest.raises(ValueError, match="height: expected a positive int"):
        fast(PROMPTS, height=16.0, **kw)
    with pytest.raises(ValueError, match="max_sequence_length: expected an int >= 1"):
        fast(PROMPTS, max_sequence_length=0, **kw)
    with pytest.raises(TypeError, match="use_resolution_binning: expected a bool"):
        fast(PROMPTS, num_inference_steps=2, use_resolution_binning="yes")
    # sample size 8 has no bins: the pipeline refuses binning too
    with pytest.raises(ValueError, match="Invalid sample size"):
        pipes["alpha"](PROMPTS, num_inference_steps=2, clean_caption=False)
    with pytest.raises(ValueError, match="use_resolution_binning: PixArtAlphaPipeline bins sizes only for "
                                         "transformer sample sizes 128, 64, 32 \\(this one's is 8"):
        alpha(PROMPTS, num_inference_steps=2)
    with pytest.raises(ValueError, match="pipe: its transformer uses resolution / aspect-ratio conditions"):
        PixArtSigma(tiny_pixart("sigma", t5_tokenizer, tiny_pixart_transformer(0, sample_size=128)))
    with pytest.raises(ValueError, match="pipe: needs its tokenizer and text_encoder"):
        PixArtSigma(tiny_pixart("sigma", t5_tokenizer, pipes["sigma"].transformer, text_encoder=None))
