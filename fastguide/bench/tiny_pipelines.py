"""Tiny random-weight diffusers pipelines built offline from configs, for the pipeline tests and benchmarks.

Each is a real diffusers pipeline class with small components: text encoders from ``transformers`` configs,
tokenizers from a vocabulary written here (CLIP: the 256 byte characters, their end-of-word forms, two merges;
T5: a word-level vocabulary built in memory), a 2-block AutoencoderKL. Nothing is downloaded.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

CLIP_TEXT = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                 num_hidden_layers=2, pad_token_id=1, vocab_size=1000, hidden_act="gelu", projection_dim=32,
                 max_position_embeddings=77)
T5_WORDS = ["<pad>", "</s>", "<unk>"] + "a cat dog low lower blurry photo of the".split()


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


def tiny_vae(**kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, **kw).eval()


def _ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd(tokenizer=None, sample_size: int = 8):
    """StableDiffusionPipeline with SD 1.x's shipped scheduler (PNDM, skip_prk_steps)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2)
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
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=sample_size,
                                in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                                cross_attention_dim=64, norm_num_groups=2)
    torch.manual_seed(0)
    vae = tiny_vae()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tokenizer = tokenizer or clip_tokenizer()
    return _ready(StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler, add_watermarker=False))


def tiny_sd3(tokenizer=None, sample_size: int = 8):
    """StableDiffusion3Pipeline (two CLIP encoders, no T5: the pipeline then uses zeros) with FlowMatch Euler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(2)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, out_channels=4,
                                        pos_embed_max_size=max(8, sample_size)).eval()
    tokenizer = tokenizer or clip_tokenizer()
    return _ready(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.1, scaling_factor=1.5),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_TEXT)).eval(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None))


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
