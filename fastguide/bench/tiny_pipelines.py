"""Tiny random-weight diffusers pipelines built offline from configs, for the pipeline tests and benchmarks.

Each is a real diffusers pipeline class with small components: text encoders from ``transformers`` configs,
tokenizers from a vocabulary written here (CLIP: the 256 byte characters, their end-of-word forms, two merges;
T5: a word-level vocabulary built in memory), a 2-block AutoencoderKL, and the family's shipped scheduler:
SD, SDXL, SD3, DiT, Flux, PixArt-alpha / -sigma, LCM. Nothing is downloaded. Every builder seeds torch's global
RNG itself, so each call gives the same weights.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

CLIP_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=32,
                 max_position_embeddings=77)
T5_TEXT = dict(vocab_size=32, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)
T5_WORDS = ["<pad>", "</s>", "<unk>"] + "a cat dog low lower blurry photo of the".split()
# the SD 1.x-shaped tiny UNet (tiny_sd; tiny_lcm adds the guidance embedding)
SD_UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2)
# the SDXL-shaped tiny UNet (tiny_sdxl; its added embedding takes 6 time ids x 8 + the 32-dim pooled vector)
SDXL_UNET = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                 transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                 cross_attention_dim=64, norm_num_groups=2)
# the SD3-shaped tiny transformer (tiny_sd3; pos_embed_max_size at least the sample size)
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                       num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16,
                       pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8)
# FLUX.1-dev's shipped FlowMatchEulerDiscreteScheduler: dynamic shifting, mu from the image's token count
FLUX_DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                          base_image_seq_len=256, max_image_seq_len=4096)
# the tiny PixArtTransformer2DModel config diffusers' own PixArt tests use (sample size 8)
PIXART_TRANSFORMER = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
                          caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8,
                          attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                          norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)


def _clip_byte_characters() -> list[str]:
    """GPT-2 / CLIP's byte-to-unicode table: the 256 characters byte-level BPE vocabularies are built from."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(directory=None):
    """A CLIPTokenizer (77 tokens) from vocabulary files written into ``directory`` (a temporary one by default);
    its ids are < 520, so it fits a text encoder with vocab_size 1000."""
    from transformers import CLIPTokenizer

    d = Path(tempfile.mkdtemp(prefix="fastguide-clip-")) if directory is None else Path(directory)
    chars = _clip_byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["lo", "low</w>", "<|startoftext|>", "<|endoftext|>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\n")
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def t5_tokenizer():
    """A T5TokenizerFast over a small word-level vocabulary (<pad> 0, </s> 1, <unk> 2, then a few words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=512)


def tiny_vae(blocks: int = 2, **kw):
    """An AutoencoderKL with vae_scale_factor 2 ** (blocks - 1) (channels 4, then 8); ``kw``: its other config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4] + [8] * (blocks - 1), in_channels=3, out_channels=3,
                         latent_channels=4, down_block_types=["DownEncoderBlock2D"] * blocks,
                         up_block_types=["UpDecoderBlock2D"] * blocks, norm_num_groups=2, **kw).eval()


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd(tokenizer=None, sample_size: int = 8):
    """StableDiffusionPipeline with SD 1.x's shipped scheduler (PNDM, skip_prk_steps)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD_UNET, "sample_size": sample_size})
    vae = tiny_vae()
    text = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT))
    scheduler = PNDMScheduler(skip_prk_steps=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              steps_offset=1, set_alpha_to_one=False)
    return _ready(StableDiffusionPipeline(unet=unet.eval(), vae=vae, text_encoder=text.eval(),
                                          tokenizer=tokenizer or clip_tokenizer(), scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None, requires_safety_checker=False))


def tiny_sdxl(tokenizer=None, sample_size: int = 8):
    """StableDiffusionXLPipeline with SDXL's shipped scheduler (Euler, leading spacing), no watermarker."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**{**SDXL_UNET, "sample_size": sample_size})
    torch.manual_seed(0)
    vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tokenizer = tokenizer or clip_tokenizer()
    return _ready(StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler, add_watermarker=False))


def tiny_sd3(tokenizer=None, sample_size: int = 8, t5: bool = False):
    """StableDiffusion3Pipeline (two CLIP encoders; with ``t5`` also a T5 encoder as text_encoder_3, else none: the
    pipeline then uses zeros for its tokens) with FlowMatch Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(**{**SD3_TRANSFORMER, "sample_size": sample_size,
                                           "pos_embed_max_size": max(8, sample_size)}).eval()
    tokenizer = tokenizer or clip_tokenizer()
    text_encoder_3 = tokenizer_3 = None
    if t5:  # its width is the transformer's joint attention width (the CLIP embeddings are padded to it)
        text_encoder_3 = T5EncoderModel(T5Config(**{**T5_TEXT, "d_model": SD3_TRANSFORMER["joint_attention_dim"]},
                                                 pad_token_id=0, eos_token_id=1)).eval()
        tokenizer_3 = t5_tokenizer()
    return _ready(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3))


def tiny_dit(sample_size: int = 8):
    """DiTPipeline (learned sigma; DiTPipeline hard-codes the null class 1000, so num_embeds_ada_norm is 1000)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(12)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4).eval()
    return _ready(DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()))


def tiny_lcm(tokenizer=None, sample_size: int = 8):
    """LatentConsistencyModelPipeline with LCMScheduler as shipped: SD_UNET with the guidance embedding of the
    distilled models (time_cond_proj_dim=32; the pipeline embeds w = guidance_scale - 1), a CLIP text encoder with
    CLIP's default activation (quick_gelu), no safety checker."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD_UNET, "sample_size": sample_size}, time_cond_proj_dim=32)
    vae = tiny_vae()
    text = CLIPTextModel(CLIPTextConfig(**{**CLIP_TEXT, "hidden_act": "quick_gelu"}))
    return _ready(LatentConsistencyModelPipeline(vae=vae, text_encoder=text.eval(),
                                                 tokenizer=tokenizer or clip_tokenizer(), unet=unet.eval(),
                                                 scheduler=LCMScheduler(), safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False))


def tiny_flux(guidance_embeds: bool = True, tokenizer=None, tokenizer_2=None, seed: int = 1, scheduler=None):
    """FluxPipeline: a 1 + 1-block FluxTransformer2DModel (``seed`` its weights) with the guidance embedding of
    the distilled models (``guidance_embeds``: FLUX.1-dev-like, FLUX_DEV_SCHEDULER by default) or without
    (FLUX.1-schnell-like, what true CFG is for: a static shift 3.0 by default); a CLIP text encoder for the pooled
    vector, a T5 encoder for the tokens (``tokenizer_2``: t5_tokenizer() by default), a VAE with a shift and a
    scaling factor. Pass small sizes: e.g. height=width=16 (8 x 8 latents, 16 packed tokens),
    max_sequence_length=12."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).eval()
    t5 = T5EncoderModel(T5Config(**T5_TEXT, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    vae = tiny_vae(shift_factor=0.12, scaling_factor=0.8)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=guidance_embeds).eval()
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else dict(shift=3.0)))
    return _ready(FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip,
                               tokenizer=tokenizer or clip_tokenizer(), text_encoder_2=t5,
                               tokenizer_2=tokenizer_2 or t5_tokenizer()))


def tiny_pixart_transformer(seed: int = 0, **overrides):
    """A PixArtTransformer2DModel of PIXART_TRANSFORMER (``overrides`` replace entries, e.g. sample_size=128 for
    PixArt-alpha 1024 px's resolution / aspect-ratio conditions), ``seed`` its weights."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**{**PIXART_TRANSFORMER, **overrides}).eval()


def tiny_pixart(variant: str = "sigma", tokenizer=None, transformer=None, vae_blocks: int = 2, **components):
    """PixArtAlphaPipeline (``variant="alpha"``) or PixArtSigmaPipeline ("sigma") with the shipped scheduler
    (DPM-Solver++ 2M), a T5 encoder, ``tiny_vae(vae_blocks)`` and ``transformer`` (tiny_pixart_transformer() by
    default: sample size 8, 16 px with the 2x VAE; its size has no resolution-binning table, so call with
    use_resolution_binning=False); ``components`` replace any of the pipeline's (e.g. text_encoder=None). The
    pipeline's call needs clean_caption=False (its caption cleaning needs bs4 and ftfy)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    classes = {"alpha": PixArtAlphaPipeline, "sigma": PixArtSigmaPipeline}
    if variant not in classes:
        raise ValueError(f"variant: expected 'alpha' or 'sigma', got {variant!r}")
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(**T5_TEXT)).eval()
    torch.manual_seed(5)
    vae = tiny_vae(vae_blocks)
    parts = dict(tokenizer=tokenizer or t5_tokenizer(), text_encoder=t5, vae=vae,
                 transformer=tiny_pixart_transformer() if transformer is None else transformer,
                 scheduler=DPMSolverMultistepScheduler())
    return _ready(classes[variant](**{**parts, **components}))
