"""fastguide.adapters against diffusers 0.42.1's own guided sampling loops, with tiny random-weight models.

What is compared with what:
- DiT: the real ``DiTPipeline`` (tiny transformer, tiny AutoencoderKL whose ``decode`` records the final latents,
  DDIMScheduler). DiTPipeline hard-codes the null class 1000, so the tiny DiT keeps num_embeds_ada_norm=1000.
- UNet2DConditionModel and SD3Transformer2DModel: StableDiffusionPipeline / StableDiffusion3Pipeline need the
  ``transformers`` package (CLIP/T5 text encoders, imported when the module loads), which is not a fastguide
  dependency, so :func:`pipeline_cfg_loop` replicates their denoising loop (``__call__`` step 7 in both files)
  from the diffusers source: the same latent duplication, ``scale_model_input``, model call, ``chunk(2)`` into
  [negative | prompt], ``uncond + g (cond - uncond)``, and ``scheduler.step``. Prompt embeddings are given
  directly (the pipelines' ``prompt_embeds=`` path), so no text encoder is involved anyway. Checked once outside
  the suite with transformers 5.23.0 installed aside: for these tiny models the replicated loops equal the real
  pipelines (``output_type="latent"``) bit for bit.
- UNet2DModel (class-conditional): diffusers has no CFG pipeline for it (DDIMPipeline is unconditional), so the
  reference is the same loop with DiTPipeline's batch layout ([cond | null]); the DiT case checks this loop
  against the real DiTPipeline.
- ReCFG: the loop with ``g m_c + (1 - g) R[c, step] m_u`` written out (the paper's rule) on a random table.

Tolerance: everything runs in float32 on the CPU, and the two sides differ in rounding only (fastguide forms
g1 m_c + (1 - g1) m_u and A x + B m with precomputed per-step scalars; diffusers forms m_u + g (m_c - m_u) and
x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) before its update). Untrained random-weight models give samples of
magnitude 1 .. ~700 here, and each step's rounding is a few float32 ulp (6e-8) *of that scale*, so the bound is
relative to the sample's scale: max |ours - diffusers| <= 1e-5 * max |diffusers| (~170 ulp over 6 steps whose
coefficients amplify earlier errors by at most a few each). Measured: <= 8e-7 * scale in every test (see the
report). Getting a convention wrong (which half is conditional, the timestep scale, eps vs the sigma half, the
null condition, the pooled vector) moves the sample by >= 1e-2 * scale, which the tests also check.
"""
import math
import sys

import pytest
import torch

import fastguide as fg
from fastguide import adapters

from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel,
                       FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)
from diffusers.utils.torch_utils import randn_tensor

REL_TOL = 1e-5
STEPS = 6
BATCH = 3
SCALE = 4.0
SEQ, DIM = 7, 12  # text tokens, cross-attention width (tiny)
POOLED = 20  # > DIM: the SD3 pooled vector needs 2 packed rows


def assert_close(ours, ref):
    """``ref`` from :func:`pipeline_cfg_loop` (or a pipeline): max |ours - ref| <= REL_TOL * the run's scale."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.isfinite(ours).all()
    scale = max(float(ref.abs().max()), getattr(ref, "trajectory_scale", 0.0))
    torch.testing.assert_close(ours, ref, atol=REL_TOL * scale, rtol=0)


def assert_differs(a, b, rel=1e-2):
    assert (a - b).abs().max() > rel * float(b.abs().max())


def ddim_scheduler(**kw):
    cfg = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    cfg.update(kw)
    return DDIMScheduler(**cfg)


def noise(shape, seed=0):
    return torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(seed))


def sample(adapter, solver, guidance, x, cond, model=None):
    model = adapter if model is None else model
    null = adapter.null_cond if model is adapter else model.null_id
    s = fg.Sampler(model, solver, guidance, null_cond=null, cond_first=adapter.cond_first, backend="torch",
                   progress=False)
    return s.sample(x, cond)


def pipeline_cfg_loop(scheduler, steps, latents, forward, scale, cond_first, ratio=None):
    """The denoising loop of diffusers' guided pipelines (StableDiffusionPipeline / StableDiffusion3Pipeline
    ``__call__`` step 7; DiTPipeline's with ``cond_first``), guidance-scale > 1 branch.

    ``forward(latent_model_input [2B], t)`` is the pipeline's model call on the batched conditions;
    ``ratio`` [B, S, ...]: ReCFG's ``g m_c + (1 - g) R m_u`` instead of ``m_u + g (m_c - m_u)``.
    The result carries ``trajectory_scale``: the largest |x0| a DDIM step formed before clipping (the
    largest quantity rounded on the way, which sets the float32 error of a clipped sample).
    """
    largest = 0.0
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "init_noise_sigma"):  # StableDiffusionPipeline.prepare_latents (SD3's has no such step)
        latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        latent_model_input = torch.cat([latents] * 2)
        if hasattr(scheduler, "scale_model_input"):
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = forward(latent_model_input, t)
        first, second = noise_pred.chunk(2)
        noise_pred_text, noise_pred_uncond = (first, second) if cond_first else (second, first)
        if ratio is None:
            noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
        else:
            noise_pred = scale * noise_pred_text + (1 - scale) * ratio[:, i] * noise_pred_uncond
        if hasattr(scheduler, "alphas_cumprod"):
            abar = scheduler.alphas_cumprod[int(t)]
            largest = max(largest, float(((latents - (1 - abar) ** 0.5 * noise_pred) / abar**0.5).abs().max()))
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    latents.trajectory_scale = largest
    return latents


def random_ratio_table(num_conditions, shape, seed=3):
    """[K + 1, STEPS, *shape] ratios in [0.5, 1.5] (last row: the mean row), indexed by sampler step."""
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand((num_conditions + 1, STEPS, *shape), generator=gen)


# ====================================================================== tiny models
@pytest.fixture(scope="module")
def unet2d():
    torch.manual_seed(10)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4, num_class_embeds=6).eval()


@pytest.fixture(scope="module")
def unet_text():
    torch.manual_seed(11)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=DIM,
                                attention_head_dim=4, norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(12)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(13)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=DIM, caption_projection_dim=16,
                                 pooled_projection_dim=POOLED, out_channels=4, pos_embed_max_size=8).eval()


def text_embeddings(seed, n=BATCH):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, SEQ, DIM), generator=gen), torch.randn((n, POOLED), generator=gen)


# ====================================================================== UNet2DModel (class-conditional)
LABELS = torch.tensor([0, 4, 2])
UNET_NULL = 5


def unet2d_forward(unet, labels, null):
    class_labels = torch.cat([labels, torch.full_like(labels, null)])
    return lambda latent_model_input, t: unet(latent_model_input, t, class_labels=class_labels).sample


# DDPM-style (linear betas, trailing: the first step is t = 999, where 1 / sqrt(abar) = 158) and, with x0
# clipping, SD-style (there a pre-clip x0 of ~158 * |x| would make the 1-ish clipped sample's rounding error
# ~158 ulp of its scale, so the clip case uses the milder schedule).
UNET2D_SCHEDULES = {
    "linear-trailing": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                            set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing"),
    "clip-leading": dict(clip_sample=True),
}


@pytest.mark.parametrize("schedule", sorted(UNET2D_SCHEDULES))
@torch.no_grad()
def test_unet2d_cfg_matches_diffusers_loop(unet2d, schedule):
    sched_kw = UNET2D_SCHEDULES[schedule]
    adapter = adapters.UNet2DAdapter(unet2d, null_class=UNET_NULL, scheduler_config=ddim_scheduler(**sched_kw).config)
    x = noise((3, 6, 10))  # odd channel count, non-square
    ours = sample(adapter, adapter.solver(STEPS), fg.CFG(SCALE), x, LABELS)
    ref = pipeline_cfg_loop(ddim_scheduler(**sched_kw), STEPS, x, unet2d_forward(unet2d, LABELS, UNET_NULL), SCALE,
                            cond_first=True)
    assert_close(ours, ref)
    # the checks above could fail: another null label or scale gives another sample
    assert_differs(ours, pipeline_cfg_loop(ddim_scheduler(**sched_kw), STEPS, x,
                                           unet2d_forward(unet2d, LABELS, 0), SCALE, cond_first=True))
    assert_differs(ours, sample(adapter, adapter.solver(STEPS), fg.CFG(1.0), x, LABELS))


@torch.no_grad()
def test_unet2d_recfg(unet2d):
    adapter = adapters.UNet2DAdapter(unet2d, null_class=UNET_NULL, scheduler_config=ddim_scheduler().config)
    x = noise((3, 6, 10), seed=1)
    table = random_ratio_table(UNET_NULL, (3, 6, 10))
    ours = sample(adapter, adapter.solver(STEPS), fg.ReCFG(SCALE, table=table), x, LABELS)
    ref = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, unet2d_forward(unet2d, LABELS, UNET_NULL), SCALE, True,
                            ratio=table[LABELS])
    assert_close(ours, ref)
    check_recfg_ones_is_cfg(adapter, adapter.solver(STEPS), x, LABELS, table, ours)


def check_recfg_ones_is_cfg(adapter, solver, x, cond, table, recfg_sample, model=None):
    """A table of ones gives CFG (to float32 rounding); the random table gave something else."""
    cfg = sample(adapter, solver, fg.CFG(SCALE), x, cond, model)
    ones = sample(adapter, solver, fg.ReCFG(SCALE, table=torch.ones_like(table)), x, cond, model)
    torch.testing.assert_close(ones, cfg, atol=1e-6, rtol=1e-6)
    assert_differs(recfg_sample, cfg)


# ====================================================================== DiT
DIT_LABELS = [3, 999, 0]


def tiny_dit_pipeline(dit, scheduler):
    torch.manual_seed(20)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, scaling_factor=1.0)
    pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    recorded = []

    def decode(latents):  # the pipeline decodes 1 / scaling_factor * latents: record them, skip the VAE
        recorded.append(latents.clone())
        return type("Decoded", (), {"sample": torch.zeros(latents.shape[0], 3, 16, 16)})()

    vae.decode = decode
    return pipe, recorded


def dit_forward(dit, labels, null):
    class_labels = torch.cat([labels, torch.full_like(labels, null)])

    def forward(latent_model_input, t):  # DiTPipeline's call, and its eps half (learned sigma)
        out = dit(latent_model_input, timestep=t[None].expand(latent_model_input.shape[0]),
                  class_labels=class_labels).sample
        return out[:, :dit.config.in_channels]
    return forward


@torch.no_grad()
def test_dit_cfg_matches_dit_pipeline(dit):
    pipe, recorded = tiny_dit_pipeline(dit, ddim_scheduler())
    pipe(DIT_LABELS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
         output_type="pt")
    ref = recorded[0]
    x = randn_tensor((BATCH, 4, 8, 8), generator=torch.Generator().manual_seed(5), dtype=dit.dtype)  # same noise

    adapter = adapters.DiTAdapter.from_pipeline(pipe)
    assert adapter.null_cond == 1000 and adapter.cond_first
    ours = sample(adapter, adapter.solver(STEPS), fg.CFG(SCALE), x, torch.tensor(DIT_LABELS))
    assert_close(ours, ref)
    # the replicated loop used for ReCFG (and for the UNet2DModel tests) is the pipeline's loop
    labels = torch.tensor(DIT_LABELS)
    loop = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, dit_forward(dit, labels, 1000), SCALE, cond_first=True)
    assert_close(loop, ref)
    assert_differs(ours, pipeline_cfg_loop(ddim_scheduler(), STEPS, x, dit_forward(dit, labels, 0), SCALE, True))


@torch.no_grad()
@pytest.mark.parametrize("solver_order", [2, 3])
def test_dit_pipeline_with_its_shipped_dpm_solver_scheduler(dit, solver_order):
    """The adapter steps with the scheduler the pipeline ships (DPM-Solver++ here), not a swapped-in DDIM."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            solver_order=solver_order)
    pipe, recorded = tiny_dit_pipeline(dit, scheduler)
    pipe(DIT_LABELS, guidance_scale=SCALE, generator=torch.Generator().manual_seed(5), num_inference_steps=STEPS,
         output_type="pt")
    x = randn_tensor((BATCH, 4, 8, 8), generator=torch.Generator().manual_seed(5), dtype=dit.dtype)
    adapter = adapters.DiTAdapter.from_pipeline(pipe)
    solver = adapter.solver(STEPS)
    assert isinstance(solver, fg.DPMSolver) and solver.options.order == solver_order
    ours = sample(adapter, solver, fg.CFG(SCALE), x, torch.tensor(DIT_LABELS))
    assert_close(ours, recorded[0])
    assert_differs(ours, sample(adapter, adapters.DiTAdapter(dit, ddim_scheduler().config).solver(STEPS),
                                fg.CFG(SCALE), x, torch.tensor(DIT_LABELS)))


@torch.no_grad()
def test_dit_recfg(dit):
    adapter = adapters.DiTAdapter(dit, ddim_scheduler().config)
    x, labels = noise((4, 8, 8), seed=2), torch.tensor([3, 7, 0])
    table = random_ratio_table(10, (4, 8, 8))
    ours = sample(adapter, adapter.solver(STEPS), fg.ReCFG(SCALE, table=table), x, labels)
    ref = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, dit_forward(dit, labels, 1000), SCALE, True,
                            ratio=table[labels])
    assert_close(ours, ref)
    check_recfg_ones_is_cfg(adapter, adapter.solver(STEPS), x, labels, table, ours)


@torch.no_grad()
def test_dit_adapter_returns_the_eps_half_and_its_own_null_class():
    torch.manual_seed(14)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=3, out_channels=6,
                                  num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=10).eval()
    adapter = adapters.DiTAdapter(model)
    assert adapter.null_cond == 10  # the CFG embedding row diffusers adds after the 10 classes
    x, t, cond = torch.randn(2, 3, 4, 4), torch.tensor([10.0, 900.0]), torch.tensor([10, 4])
    full = model(x, timestep=t, class_labels=cond).sample
    out = adapter(x, t, cond)
    assert out.is_contiguous()  # the fused kernel streams dense tensors
    torch.testing.assert_close(out, full[:, :3], atol=0, rtol=0)


@torch.no_grad()
def test_dit_table_build_flow_of_the_docs(dit):
    """docs/adapters.md's DiT example at toy size: a table for a subset of ImageNet classes (ids 0..K-1 mapped to
    class labels by ConditionIdModel), built from the model's own conditional samples, then ReCFG.

    The built table must reproduce what its definition says at one entry (least squares, from the model's
    outputs on the same noised images), and sampling with it must match the pipeline loop with those ratios."""
    from fastguide.adapters import ConditionIdModel
    from fastguide.table_build import accumulate_ratio_sums, image_noise

    adapter = adapters.DiTAdapter(dit, ddim_scheduler().config)
    classes = torch.tensor([207, 3])  # ImageNet labels; table ids 0, 1
    wrapped = ConditionIdModel(adapter, classes, torch.tensor(adapter.null_cond))
    solver = adapter.solver(STEPS)
    ids = torch.tensor([0, 0, 1, 1])
    x0 = fg.Sampler(wrapped, solver, fg.CFG(1.0), null_cond=wrapped.null_id, backend="torch",
                    progress=False).sample(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9)), ids)
    grid = sorted(int(t) for t in solver.plan.timesteps)
    sums = accumulate_ratio_sums(wrapped, solver.schedule, x0, ids, timesteps=grid, num_classes=2,
                                 samples_per_class=2, null_cond=wrapped.null_id, batch_size=4, progress=False)
    table = sums.finalize("least_squares")
    assert table.ratios.shape == (3, STEPS, 4, 8, 8)

    k, c = 2, 1  # one entry by hand: R[c, grid[k]] = sum(m_c m_u) / sum(m_u^2) over class c's two images
    abar = float(solver.schedule.alphas_cumprod[grid[k]])
    m_c, m_u = [], []
    for j, img in enumerate(x0[ids == c]):
        x_t = (abar**0.5 * img.double() + (1 - abar) ** 0.5 * image_noise(0, c, j, STEPS, (4, 8, 8))[k]).float()
        t = torch.full((1,), float(grid[k]))
        m_c.append(adapter(x_t[None], t, classes[c:c + 1]).double())
        m_u.append(adapter(x_t[None], t, torch.tensor([1000])).double())
    expect = (sum(a * b for a, b in zip(m_c, m_u)) / sum(b * b for b in m_u))[0]
    # float32 outputs of an 8-row vs a 1-row forward differ by ~1e-7 relative; dividing by sum m_u^2, small in some
    # elements, amplifies that to ~1e-5 (measured 1.6e-5); a wrong timestep, class or noise is off by O(1)
    torch.testing.assert_close(table.ratios[c, k].double(), expect, atol=1e-4, rtol=1e-4)

    x = noise((4, 8, 8), seed=10)[:2]
    ours = sample(adapter, solver, fg.ReCFG(SCALE, table=table), x, torch.tensor([1, 0]), model=wrapped)
    ratio = table.lookup(torch.tensor([1, 0]), solver.plan.timesteps).transpose(0, 1).float()
    ref = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, dit_forward(dit, classes[[1, 0]], 1000), SCALE, True,
                            ratio=ratio)
    assert_close(ours, ref)


# ====================================================================== UNet2DConditionModel (text)
def unet_text_forward(unet, negative, prompt):
    prompt_embeds = torch.cat([negative, prompt])  # StableDiffusionPipeline: [negative | prompt]

    def forward(latent_model_input, t):
        return unet(latent_model_input, t, encoder_hidden_states=prompt_embeds, timestep_cond=None,
                    cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]
    return forward


@torch.no_grad()
def test_unet_text_cfg_matches_sd_pipeline_loop(unet_text):
    prompts, _ = text_embeddings(30)
    empty = text_embeddings(31, n=1)[0][0]  # the empty prompt's embedding: the null condition
    adapter = adapters.UNet2DConditionAdapter(unet_text, empty, ddim_scheduler().config)
    assert not adapter.cond_first
    x = noise((4, 6, 10))
    ours = sample(adapter, adapter.solver(STEPS), fg.CFG(SCALE), x, prompts)
    negative = empty.expand(BATCH, SEQ, DIM)
    ref = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, unet_text_forward(unet_text, negative, prompts), SCALE,
                            cond_first=False)
    assert_close(ours, ref)
    swapped = pipeline_cfg_loop(ddim_scheduler(), STEPS, x, unet_text_forward(unet_text, negative, prompts), SCALE,
                                cond_first=True)
    assert_differs(ours, swapped)


@torch.no_grad()
def test_unet_text_recfg_through_condition_ids(unet_text):
    bank, _ = text_embeddings(32, n=4)  # 4 prompts with their own ids; the table has rows for them
    empty = text_embeddings(31, n=1)[0][0]
    adapter = adapters.UNet2DConditionAdapter(unet_text, empty, ddim_scheduler().config)
    wrapped = adapter.with_condition_ids(bank)
    assert wrapped.null_id == 4
    ids = torch.tensor([2, 0, 3])
    x = noise((4, 6, 10), seed=4)
    table = random_ratio_table(4, (4, 6, 10))
    ours = sample(adapter, adapter.solver(STEPS), fg.ReCFG(SCALE, table=table), x, ids, model=wrapped)
    ref = pipeline_cfg_loop(ddim_scheduler(), STEPS, x,
                            unet_text_forward(unet_text, empty.expand(BATCH, SEQ, DIM), bank[ids]), SCALE, False,
                            ratio=table[ids])
    assert_close(ours, ref)
    check_recfg_ones_is_cfg(adapter, adapter.solver(STEPS), x, ids, table, ours, model=wrapped)


# ====================================================================== SD3 (flow, velocity)
def flow_scheduler():
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def sd3_forward(model, negative, negative_pooled, prompt, pooled):
    prompt_embeds = torch.cat([negative, prompt])  # StableDiffusion3Pipeline: [negative | prompt]
    pooled_prompt_embeds = torch.cat([negative_pooled, pooled])

    def forward(latent_model_input, t):
        timestep = t.expand(latent_model_input.shape[0])
        return model(hidden_states=latent_model_input, timestep=timestep, encoder_hidden_states=prompt_embeds,
                     pooled_projections=pooled_prompt_embeds, joint_attention_kwargs=None, return_dict=False)[0]
    return forward


@pytest.fixture(scope="module")
def sd3_conditions():
    prompts, pooled = text_embeddings(40)
    neg, neg_pooled = text_embeddings(41, n=1)
    return prompts, pooled, neg[0], neg_pooled[0]


@torch.no_grad()
def test_sd3_cfg_matches_sd3_pipeline_loop(sd3, sd3_conditions):
    prompts, pooled, neg, neg_pooled = sd3_conditions
    null = adapters.SD3Adapter.pack_for(sd3, neg[None], neg_pooled[None])[0]
    adapter = adapters.SD3Adapter(sd3, null, flow_scheduler().config)
    assert isinstance(adapter.solver(STEPS), fg.FlowEuler) and adapter.num_train_timesteps == 1000
    x = noise((4, 8, 8))
    ours = sample(adapter, adapter.solver(STEPS), fg.CFG(SCALE), x, adapter.pack(prompts, pooled))
    forward = sd3_forward(sd3, neg.expand(BATCH, SEQ, DIM), neg_pooled.expand(BATCH, POOLED), prompts, pooled)
    ref = pipeline_cfg_loop(flow_scheduler(), STEPS, x, forward, SCALE, cond_first=False)
    assert_close(ours, ref)
    # the pooled vector matters to this model, so packing it wrong would be caught
    other_pooled = adapter.pack(prompts, torch.zeros_like(pooled))
    assert_differs(ours, sample(adapter, adapter.solver(STEPS), fg.CFG(SCALE), x, other_pooled))


@torch.no_grad()
def test_sd3_recfg_through_condition_ids(sd3, sd3_conditions):
    _, _, neg, neg_pooled = sd3_conditions
    bank, bank_pooled = text_embeddings(42, n=4)
    null = adapters.SD3Adapter.pack_for(sd3, neg[None], neg_pooled[None])[0]
    adapter = adapters.SD3Adapter(sd3, null, flow_scheduler().config)
    wrapped = adapter.with_condition_ids(adapter.pack(bank, bank_pooled))
    ids = torch.tensor([1, 3, 1])
    x = noise((4, 8, 8), seed=6)
    table = random_ratio_table(4, (4, 8, 8))
    ours = sample(adapter, adapter.solver(STEPS), fg.ReCFG(SCALE, table=table), x, ids, model=wrapped)
    forward = sd3_forward(sd3, neg.expand(BATCH, SEQ, DIM), neg_pooled.expand(BATCH, POOLED), bank[ids],
                          bank_pooled[ids])
    ref = pipeline_cfg_loop(flow_scheduler(), STEPS, x, forward, SCALE, False, ratio=table[ids])
    assert_close(ours, ref)
    check_recfg_ones_is_cfg(adapter, adapter.solver(STEPS), x, ids, table, ours, model=wrapped)


def test_sd3_pack_round_trips_exactly(sd3):
    null = torch.zeros(SEQ + 2, DIM)
    adapter = adapters.SD3Adapter(sd3, null)
    embeds, pooled = text_embeddings(43)
    packed = adapter.pack(embeds, pooled)
    assert packed.shape == (BATCH, SEQ + math.ceil(POOLED / DIM), DIM)
    back_embeds, back_pooled = adapter.unpack(packed)
    assert torch.equal(back_embeds, embeds) and torch.equal(back_pooled, pooled)
    assert (packed[:, SEQ:].reshape(BATCH, -1)[:, POOLED:] == 0).all()  # the padding


# ====================================================================== from_pipeline with encode_prompt
class _StubSDPipe:
    """What UNet2DConditionAdapter.from_pipeline uses of a StableDiffusionPipeline, with a fake text encoder that
    maps a prompt to a fixed random embedding (the real one needs the transformers package)."""

    device = torch.device("cpu")

    def __init__(self, unet):
        self.unet, self.scheduler, self.calls = unet, ddim_scheduler(), []

    @staticmethod
    def embed(prompt):
        return torch.randn(SEQ, DIM, generator=torch.Generator().manual_seed(len(prompt) * 7919 + 1))

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance,
                      negative_prompt=None, **kw):
        self.calls.append((list(prompt), do_classifier_free_guidance, negative_prompt))
        pos = torch.stack([self.embed(p) for p in prompt])
        neg = torch.stack([self.embed(p) for p in negative_prompt]) if do_classifier_free_guidance else None
        return pos, neg


def test_unet_text_from_pipeline_uses_the_negative_prompt_embedding(unet_text):
    pipe = _StubSDPipe(unet_text)
    adapter = adapters.UNet2DConditionAdapter.from_pipeline(pipe)
    assert pipe.calls[0][1:] == (True, [""])
    assert torch.equal(adapter.null_cond, pipe.embed(""))
    other = adapters.UNet2DConditionAdapter.from_pipeline(pipe, negative_prompt="blurry")
    assert torch.equal(other.null_cond, pipe.embed("blurry"))
    cond = adapter.encode(pipe, ["a", "bb"])
    assert torch.equal(cond, torch.stack([pipe.embed("a"), pipe.embed("bb")]))
    assert adapter.scheduler_config == {**dict(pipe.scheduler.config), "_class_name": "DDIMScheduler"}


class _StubSD3Pipe:
    device = torch.device("cpu")

    def __init__(self, transformer):
        self.transformer, self.scheduler = transformer, flow_scheduler()

    @staticmethod
    def embed(prompt):
        gen = torch.Generator().manual_seed(len(prompt) * 7919 + 2)
        return torch.randn(SEQ, DIM, generator=gen), torch.randn(POOLED, generator=gen)

    def encode_prompt(self, prompt, prompt_2, prompt_3, device=None, num_images_per_prompt=1,
                      do_classifier_free_guidance=True, negative_prompt=None, **kw):
        pos = [self.embed(p) for p in prompt]
        neg = [self.embed(p) for p in negative_prompt] if do_classifier_free_guidance else None
        stack = lambda rows, i: None if rows is None else torch.stack([r[i] for r in rows])  # noqa: E731
        return stack(pos, 0), stack(neg, 0), stack(pos, 1), stack(neg, 1)


def test_sd3_from_pipeline_packs_the_negative_prompt(sd3):
    pipe = _StubSD3Pipe(sd3)
    adapter = adapters.SD3Adapter.from_pipeline(pipe, negative_prompt="low quality")
    neg, neg_pooled = pipe.embed("low quality")
    embeds, pooled = adapter.unpack(adapter.null_cond[None])
    assert torch.equal(embeds[0], neg) and torch.equal(pooled[0], neg_pooled)
    cond = adapters.SD3Adapter.encode_for(pipe, ["x", "yy"])
    assert torch.equal(adapter.unpack(cond)[1][1], pipe.embed("yy")[1])


# ====================================================================== bad input
def test_bad_input_names_the_argument(unet2d, unet_text, dit, sd3):
    with pytest.raises(TypeError, match="unet: expected a diffusers.UNet2DModel"):
        adapters.UNet2DAdapter(unet_text, null_class=0)
    with pytest.raises(ValueError, match="null_class"):
        adapters.UNet2DAdapter(unet2d, null_class=6)
    with pytest.raises(TypeError, match="transformer: expected a diffusers.DiTTransformer2DModel"):
        adapters.DiTAdapter(sd3)
    with pytest.raises(ValueError, match="null_embedding"):
        adapters.UNet2DConditionAdapter(unet_text, torch.zeros(SEQ, DIM + 1))
    with pytest.raises(ValueError, match="null_cond"):
        adapters.SD3Adapter(sd3, torch.zeros(SEQ, DIM + 1))  # not [L + k, joint_attention_dim]
    with pytest.raises(ValueError, match="pooled"):
        adapters.SD3Adapter.pack_for(sd3, torch.zeros(2, SEQ, DIM), torch.zeros(2, POOLED + 1))
    adapter = adapters.UNet2DConditionAdapter(unet_text, torch.zeros(SEQ, DIM))
    with pytest.raises(TypeError, match="cond"):
        adapter(torch.randn(2, 4, 8, 8), torch.ones(2), torch.zeros(2, SEQ + 1, DIM))
    with pytest.raises(ValueError, match="scheduler_config"):
        adapter.solver(4)
    with pytest.raises(TypeError, match="cond: expected \\[2\\] integer class ids"):
        adapters.DiTAdapter(dit)(torch.randn(2, 4, 8, 8), torch.ones(2), torch.zeros(2))


def test_missing_diffusers_says_how_to_install(monkeypatch, unet2d):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(ImportError, match="pip install diffusers"):
        adapters.UNet2DAdapter(unet2d, null_class=0)
