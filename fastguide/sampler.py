"""The sampling loop: one batched 2B forward (cond + null) per step, then one guided step.

Static buffers (the model's input X2 = [x | x] and labels L2 = [c | null]) are allocated once per call;
the step reads the model output's halves in place and writes x_next into both halves of X2, so the
loop is the same shape every step (what torch.compile and CUDA graphs need).
"""
from __future__ import annotations

import os

import torch
from tqdm.auto import tqdm

from fastguide.guidance import CFG, ClassifierGuidance, StepGuidance
from fastguide.kernels import reference
from fastguide.kernels.reference import compute_dtype_for

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_STEP_NOISE_SALT = 0x9E3779B97F4A7C15


def seeded_noise(seeds, shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """[B, *shape] standard normal noise where row b depends only on seeds[b] (drawn on the CPU, so the
    same seed gives the same noise on every device)."""
    seeds = _check_seeds(seeds, None)
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def _step_noise(seeds, steps: int, shape, dtype, device) -> torch.Tensor:
    """[S, B, *shape] per-step noise z; sample b's noise depends only on seeds[b]."""
    derived = [(s * 6364136223846793005 + _STEP_NOISE_SALT) % (2**63) for s in seeds]
    rows = [torch.randn((steps, *shape), generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in derived]
    return torch.stack(rows, 1).to(device=device, dtype=dtype)


def _check_seeds(seeds, batch):
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise TypeError(f"seeds: expected a sequence of ints, got {type(seeds).__name__}") from None
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"seeds: expected {batch} seeds (one per sample), got {len(seeds)}")
    if any(s < 0 for s in seeds):
        raise ValueError("seeds: expected non-negative ints")
    return seeds


def triton_available() -> bool:
    try:
        from fastguide.kernels import guided_step  # noqa: F401
    except Exception:
        return False
    return True


class Sampler:
    """Guided sampling with any solver plan and guidance rule.

    model(x [N, C, H, W], t [N] float, cond [N] long | [N, ...]) -> [N, C, H, W]
    ``null_cond``: the unconditional label (int) or embedding (tensor of one condition's shape).
    ``cond_first``: whether the batched forward puts the conditional half first ([c | null]).
    ``backend``: "torch" (the reference step, any device), "triton" (the fused kernel), or "auto"
    (triton for CUDA tensors when available, torch otherwise).
    """

    def __init__(self, model, solver, guidance=None, null_cond=None, backend: str = "auto",
                 cond_first: bool = True, progress: bool = True, check_finite: bool = True):
        if not callable(model):
            raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
        if not hasattr(solver, "plan"):
            raise TypeError(f"solver: expected a fastguide solver (DDIM, DDPM, FlowEuler), got {type(solver).__name__}")
        guidance = CFG(1.0) if guidance is None else guidance
        if not hasattr(guidance, "prepare"):
            raise TypeError(f"guidance: expected CFG, ReCFG or ClassifierGuidance, got {type(guidance).__name__}")
        needs_null = getattr(guidance, "needs_uncond", False) or getattr(guidance, "use_null_cond", False)
        if needs_null and null_cond is None:
            raise ValueError(f"null_cond: {type(guidance).__name__} needs the unconditional (null) condition")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.model, self.solver, self.guidance, self.null_cond = model, solver, guidance, null_cond
        self.backend, self.cond_first = backend, bool(cond_first)
        self.progress, self.check_finite = progress, check_finite

    # ------------------------------------------------------------------ public
    def sample(self, noise: torch.Tensor, cond, *, seeds=None, callback=None, progress=None) -> torch.Tensor:
        """Run the fixed-NFE loop from ``noise`` [B, C, H, W] (x_T) with conditions ``cond`` [B].

        ``seeds`` (B ints) make stochastic solvers' per-step noise a function of each sample's own seed;
        without them it comes from torch's global RNG. ``callback(step, t, x)`` runs after each step.
        """
        x = self._check_noise(noise)
        batch, device = x.shape[0], x.device
        cond = self._check_cond(cond, batch, device)
        plan = self.solver.plan
        sg = self.guidance.prepare(plan, cond.cpu() if not cond.is_floating_point() else cond, x.shape[1:])
        state = self._device_state(plan, sg, x, seeds)
        step_fn = self._step_fn(device)
        run_uncond = any(sg.guided)
        rows2 = 2 * batch if run_uncond else batch
        buf = torch.empty((rows2, *x.shape[1:]), dtype=x.dtype, device=device)
        buf[:batch] = x
        if run_uncond:
            buf[batch:] = x
        labels = self._labels(cond, batch, run_uncond)
        csl = slice(0, batch) if (self.cond_first or not run_uncond) else slice(batch, 2 * batch)
        classifier = isinstance(self.guidance, ClassifierGuidance)
        first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        show = self.progress if progress is None else progress
        for i in tqdm(range(plan.steps), desc="sampling", disable=not show, leave=False):
            t = state["t"][i]
            if sg.guided[i]:
                inp, lab = buf, labels
            else:
                inp, lab = buf[csl], labels[csl]
                if classifier and self.guidance.use_null_cond:
                    lab = self._null_batch(batch, cond)
            out = self.model(inp, t.expand(inp.shape[0]), lab)
            self._check_model_output(out, inp, i)
            if classifier:
                out = self.guidance.guided_eps(out, inp, t.expand(batch), cond, float(plan.eps_scale[i]))
            if self.check_finite:
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(out).all(), i, first_bad)
            step_fn(buf, buf[:batch], out, state["g1"][i], state["coef"][i], cond_first=self.cond_first,
                    table=state["table"], rows=state["rows"],
                    table_steps=None if state["steps"] is None else state["steps"][i],
                    clip_range=plan.clip_range, z=None if state["z"] is None else state["z"][i])
            if callback is not None:
                callback(i, float(plan.timesteps[i]), buf[:batch])
        if self.check_finite:
            bad = int(first_bad)
            if bad >= 0:
                raise ValueError(f"model: output contained NaN/inf, first at step {bad} "
                                 f"(t={float(plan.timesteps[bad]):g}); the sample is not valid")
        return buf[:batch].clone()

    # ------------------------------------------------------------------ helpers
    def _step_fn(self, device: torch.device):
        want = self.backend
        if want == "auto":
            want = "triton" if device.type == "cuda" and triton_available() else "torch"
        if want == "torch":
            return reference.guided_step_into
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        try:
            from fastguide.kernels.guided_step import guided_step_into
        except ImportError as e:
            raise ValueError(f"backend: 'triton' is not available here ({e})") from None
        return guided_step_into

    def _device_state(self, plan, sg: StepGuidance, x: torch.Tensor, seeds) -> dict:
        cdt = compute_dtype_for(x.dtype)
        dev = x.device
        coef = plan.coef.clone()
        if sg.table_w is not None:
            coef[:, 8] = sg.table_w
        z = None
        if plan.stochastic:
            if seeds is not None:
                z = _step_noise(_check_seeds(seeds, x.shape[0]), plan.steps, x.shape[1:], cdt, dev)
            else:
                z = torch.randn((plan.steps, *x.shape), dtype=cdt, device=dev)
        elif seeds is not None:
            _check_seeds(seeds, x.shape[0])
        return {
            "t": plan.timesteps.to(dev, torch.float64 if x.dtype == torch.float64 else torch.float32),
            "coef": coef.to(dev, cdt),
            "g1": sg.g1.to(dev, cdt),
            "table": None if sg.table is None else sg.table.to(dev),
            "rows": None if sg.rows is None else sg.rows.to(dev),
            "steps": None if sg.table_steps is None else sg.table_steps.to(dev),
            "z": z,
        }

    def _null_batch(self, batch: int, cond: torch.Tensor) -> torch.Tensor:
        null = self.null_cond
        if isinstance(null, torch.Tensor):
            null = null.to(cond.device, cond.dtype)
            if null.shape == cond.shape[1:]:
                return null.unsqueeze(0).expand(batch, *null.shape)
            if null.shape == cond.shape:
                return null
            raise ValueError(f"null_cond: expected shape {tuple(cond.shape[1:])} (one condition), got {tuple(null.shape)}")
        if cond.ndim != 1:
            raise ValueError("null_cond: conditions are tensors, so null_cond must be a tensor of one condition's shape")
        return torch.full((batch,), int(null), dtype=cond.dtype, device=cond.device)

    def _labels(self, cond: torch.Tensor, batch: int, run_uncond: bool) -> torch.Tensor:
        if not run_uncond:
            return cond
        null = self._null_batch(batch, cond)
        return torch.cat([cond, null] if self.cond_first else [null, cond])

    @staticmethod
    def _check_noise(noise) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise: expected a torch.Tensor [B, C, H, W], got {type(noise).__name__}")
        if noise.ndim != 4:
            raise ValueError(f"noise: expected 4 dims [B, C, H, W], got shape {tuple(noise.shape)}")
        if noise.dtype not in FLOAT_DTYPES:
            raise TypeError(f"noise: expected float64/float32/float16/bfloat16, got {noise.dtype}")
        if noise.shape[0] < 1 or noise.numel() == 0:
            raise ValueError(f"noise: expected a non-empty batch, got shape {tuple(noise.shape)}")
        if not torch.isfinite(noise).all():
            raise ValueError("noise: contains NaN or inf")
        return noise.contiguous()

    @staticmethod
    def _check_cond(cond, batch: int, device) -> torch.Tensor:
        if isinstance(cond, int) and not isinstance(cond, bool):
            raise TypeError(f"cond: expected a [B] tensor or list of labels (B={batch}), got a single int; "
                            "use torch.full((B,), label) to give every sample the same label")
        if not isinstance(cond, torch.Tensor):
            try:
                cond = torch.as_tensor(cond)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"cond: expected a [B] tensor of labels, got {type(cond).__name__}") from None
        if cond.ndim == 0 or cond.shape[0] != batch:
            raise ValueError(f"cond: expected {batch} conditions (the noise batch), got shape {tuple(cond.shape)}")
        if not cond.is_floating_point():
            if cond.ndim != 1:
                raise ValueError(f"cond: integer labels must be 1-D [B], got shape {tuple(cond.shape)}")
            cond = cond.long()
        return cond.to(device)

    @staticmethod
    def _check_model_output(out, inp, step: int) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"model: expected a tensor output, got {type(out).__name__} at step {step}")
        if out.shape != inp.shape:
            raise ValueError(f"model: output shape {tuple(out.shape)} != input shape {tuple(inp.shape)} at step {step} "
                             "(a learned-sigma model needs an adapter that returns the eps half)")

    def __repr__(self):
        return (f"Sampler({type(self.solver).__name__}, {self.guidance!r}, backend={self.backend!r}, "
                f"cond_first={self.cond_first})")
