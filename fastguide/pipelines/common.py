"""What every fast pipeline shares: the solvers of the pipeline's scheduler, one Sampler, the noise convention
(the pipeline's ``randn_tensor`` with its generator, or fastguide's seeds), the guidance rule of a call, and the
argument checks."""
from __future__ import annotations

import torch

from fastguide.adapters import ConditionIdModel
from fastguide.diffusers_schedulers import generator_draws, solver_from_diffusers
from fastguide.guidance import CFG, check_guidance
from fastguide.noise import seeded_noise
from fastguide.sampler import Sampler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class FastPipeline:
    """What every fast pipeline shares: the solvers of the pipeline's scheduler (one per step count), one Sampler
    (compiled once with :meth:`compile`), the noise convention and the guidance rule of a call."""

    def __init__(self, pipe, model, null_cond, *, cond_first: bool, backend: str, progress: bool):
        self.pipe, self.model, self.null_cond = pipe, model, null_cond
        self._solvers, self._compile_kw = {}, None
        self._sampler_kw = dict(backend=backend, cond_first=cond_first, progress=progress)
        self.sampler: Sampler | None = None  # made by the first call, with its solver

    def solver(self, steps: int):
        """The solver that steps like ``pipe.scheduler`` with ``steps`` steps (made once per count)."""
        if steps not in self._solvers:
            self._solvers[steps] = solver_from_diffusers(self.pipe.scheduler, steps)
        return self._solvers[steps]

    def compile(self, **kw) -> "FastPipeline":
        """``Sampler.compile(**kw)`` (mode, cuda_graph, ...): new prompts, scales and step counts never recompile."""
        self._compile_kw = kw
        if self.sampler is not None:
            self.sampler.compile(**kw)
        return self

    def _rule(self, guidance, guidance_scale):
        if guidance is not None:
            return check_guidance(guidance, self.null_cond)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale: expected a number, got {type(guidance_scale).__name__}")
        # the pipelines run no unconditional half at guidance_scale <= 1; CFG(1) gives m = m_cond on B rows too
        return CFG(max(float(guidance_scale), 1.0))

    @staticmethod
    def _noise(shape, generator, seeds, device, dtype) -> torch.Tensor:
        """x_T: the pipeline's ``randn_tensor(shape, generator)`` (its latents before init_noise_sigma, which the
        solver's plan applies), or fastguide's per-seed noise."""
        if seeds is not None:
            if generator is not None:
                raise ValueError("seeds: pass seeds or generator, not both")
            if len(seeds) != shape[0]:
                raise ValueError(f"seeds: expected {shape[0]} seeds (one per image), got {len(seeds)}")
            return seeded_noise(list(seeds), shape[1:], dtype=dtype, device=device)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"generator: a list of {len(generator)} generators for {shape[0]} images; expected one "
                             "per image")
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _step_noise(self, solver, noise: torch.Tensor, generator, seeds):
        """A stochastic scheduler's per-step noise as the pipeline draws it: ``randn_tensor(shape, generator)`` at
        each step its ``step`` draws (after the initial latents, nothing else reads the generator); None for
        deterministic plans, with ``seeds`` (fastguide's seeded noise), or for a scheduler whose draws are not
        known (fastguide's noise from torch's RNG then)."""
        if not solver.plan.stochastic or seeds is not None:
            return None
        draws = generator_draws(self.pipe.scheduler, solver.plan)
        if draws is None:
            return None
        from diffusers.utils.torch_utils import randn_tensor

        z = torch.zeros((len(draws), *noise.shape), dtype=noise.dtype, device=noise.device)
        for i, draw in enumerate(draws):
            if draw:
                z[i] = randn_tensor(tuple(noise.shape), generator=generator, device=noise.device, dtype=noise.dtype)
        return z

    def _sample_text(self, noise, cond, null, steps, rule, seeds, generator, condition_ids, negatives=None):
        """:meth:`_sample` for embedding conditions; with ``condition_ids`` (one int per prompt: rows of a ReCFG
        table) the model reads them through a :class:`fastguide.adapters.ConditionIdModel` (id i -> its prompt's
        embedding, the id after the last -> the negative), which needs one negative for every prompt
        (``negatives``: the call's negative prompts, or None for the pipeline's default)."""
        if condition_ids is None:
            return self._sample(noise, cond, null, steps, rule, seeds, generator)
        ids = list(condition_ids)
        if len(ids) != cond.shape[0] or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"condition_ids: expected {cond.shape[0]} ints >= 0 (one per prompt), got {condition_ids!r}")
        if negatives is not None and len(set(negatives)) > 1:
            raise ValueError("negative_prompt: with condition_ids every prompt needs the same negative prompt (the null "
                             "condition is one id)")
        table = getattr(rule, "table", None)
        count = table.num_classes if table is not None else max(ids) + 1
        if max(ids) >= count:
            raise ValueError(f"condition_ids: {max(ids)} is outside the ratio table's conditions [0, {count})")
        embeddings = torch.zeros((count, *cond.shape[1:]), dtype=cond.dtype, device=cond.device)
        for i, row in zip(ids, cond):
            if embeddings[i].any() and not torch.equal(embeddings[i], row):
                raise ValueError(f"condition_ids: id {i} is given to two different prompts")
            embeddings[i] = row
        model = ConditionIdModel(self.model, embeddings, null[0])
        sampler = Sampler(model, self.solver(steps), rule, null_cond=model.null_id, **self._sampler_kw)
        return self._run(sampler, noise, torch.tensor(ids, device=cond.device), rule, seeds, generator)

    def _sample(self, noise, cond, null, steps, rule, seeds, generator=None, solver=None):
        """The latents of one call: ``solver`` (default: the scheduler's for ``steps``) under ``rule``."""
        solver = self.solver(steps) if solver is None else solver
        if self.sampler is None:
            self.sampler = Sampler(self.model, solver, rule, null_cond=null, **self._sampler_kw)
            if self._compile_kw is not None:
                self.sampler.compile(**self._compile_kw)
        self.sampler.null_cond, self.sampler.solver = null, solver
        return self._run(self.sampler, noise, cond, rule, seeds, generator)

    def _run(self, sampler, noise, cond, rule, seeds, generator):
        """``sampler``'s sample, with the pipeline's per-step noise for a stochastic scheduler."""
        z = self._step_noise(sampler.solver, noise, generator, seeds)
        with torch.no_grad():
            return sampler.sample(noise, cond, guidance=rule, seeds=seeds, step_noise=z)


def check_output_type(output_type, allowed=OUTPUT_TYPES) -> str:
    if output_type not in allowed:
        raise ValueError(f"output_type: expected one of {allowed}, got {output_type!r}")
    return output_type


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps: expected an int >= 1, got {steps!r}")
    return steps


def prompt_list(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt: expected a string or a non-empty list of strings, got {type(prompt).__name__}")
    return prompts


def negative_prompt_list(negative_prompt, count: int, default=""):
    """One negative prompt per prompt (``default`` for None: "" or, where the pipeline treats None its own way,
    None itself)."""
    if negative_prompt is None:
        return default if default is None else [default] * count
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = list(negative_prompt)
    if len(negatives) != count or not all(isinstance(n, str) for n in negatives):
        raise ValueError(f"negative_prompt: expected a string or {count} strings (one per prompt), got {len(negatives)}")
    return negatives


def latent_shape(pipe, height, width, channels: int, batch: int) -> tuple:
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height, width: expected multiples of {f}, got {height} x {width}")
    return batch, channels, height // f, width // f
