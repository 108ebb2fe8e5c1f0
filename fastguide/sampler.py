"""The public face of sampling: construct, compile, warm up, sample. The loop itself is in fastguide/loop.py."""
from __future__ import annotations

import functools
import time
import warnings

import torch

from fastguide import loop
from fastguide.backends import check_backend, step_impl
from fastguide.checks import check_cond, check_int, check_label_range, check_noise, check_seeds
from fastguide.guidance import NoGuidance, check_guidance, with_scale
from fastguide.row_plans import RowPlans, merge_guidance, row_step_noise

MAX_CACHED_LOOPS = 8  # loop buffers (and captured graphs) kept per Sampler, least recently used dropped first
MAX_CACHED_PLANS = 4  # plan tensors (incl. a device copy of each ReCFG table) kept per Sampler


def row_plans_for(solvers, batch: int, loop_steps: int | None = None) -> RowPlans:
    """The stacked plans of ``solvers`` (one per row; ``loop_steps`` long), memoised on the solvers' plans."""
    if isinstance(solvers, (str, bytes)) or not hasattr(solvers, "__len__"):
        raise TypeError(f"solvers: expected a sequence of {batch} fastguide solvers, got {type(solvers).__name__}")
    if len(solvers) != batch:
        raise ValueError(f"solvers: expected one solver per row ({batch}), got {len(solvers)}")
    for b, s in enumerate(solvers):
        if not hasattr(s, "plan"):
            raise TypeError(f"solvers: row {b} is a {type(s).__name__}, not a fastguide solver")
    plans = tuple(s.plan for s in solvers)
    key = (tuple(id(p) for p in plans), loop_steps)
    hit = _ROW_PLANS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit.plans, plans)):
        return hit
    stacked = RowPlans.stack(plans, loop_steps)
    _ROW_PLANS.put(key, stacked)
    return stacked


_ROW_PLANS = loop.LRUCache(64)


class Sampler:
    """Guided sampling with any solver plan and guidance rule.

    model(x [N, C, H, W], t [N] float, cond [N] long | [N, ...]) -> [N, C, H, W]
    ``guidance``: CFG, ReCFG, CFGZeroStar, APG, ClassifierGuidance, ... (None: the conditional model alone, B rows a
    step).
    ``null_cond``: the unconditional label (int) or embedding (tensor of one condition's shape).
    ``num_classes``: integer labels must lie in [0, num_classes) (or be ``null_cond``); None takes the model's
    own ``num_classes`` attribute when it has one (the digits model and the class-conditional adapters do).
    ``cond_first``: whether the batched forward puts the conditional half first ([c | null]).
    ``backend``: "torch" (plain torch ops, any device: the eager host-scalar step, or the reference inside
    compiled code), "triton" (the fused kernel), or "auto" (triton for CUDA tensors when available, torch
    otherwise).
    """

    def __init__(self, model, solver, guidance=None, null_cond=None, backend: str = "auto",
                 cond_first: bool = True, progress: bool = True, check_finite: bool = True, num_classes=None):
        if not callable(model):
            raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
        self.model, self.null_cond = model, null_cond
        if num_classes is None and isinstance(getattr(model, "num_classes", None), int):
            num_classes = model.num_classes
        self.num_classes = None if num_classes is None else check_int(num_classes, "num_classes", low=1)
        self.solver = solver
        self.guidance = check_guidance(NoGuidance() if guidance is None else guidance, null_cond)
        self.backend, self.cond_first = check_backend(backend), bool(cond_first)
        self.progress, self.check_finite = progress, check_finite
        self.compiled = self.cuda_graph = False
        self._compile_kw, self._fuse_step = {}, True
        self._compiled = {}  # (what, mode) -> a compiled callable: this Sampler's hot step, or the model alone
        self.plans = loop.LRUCache(MAX_CACHED_PLANS)  # (device, dtype, table id) -> loop.PlanTensors
        self.buffers = loop.BufferCache(MAX_CACHED_LOOPS)  # static key -> loop.LoopBuffers (+ captured graph)

    @property
    def solver(self):
        """The solver whose plan each call runs. Assigning another one (e.g. a different NFE) keeps the
        compiled step: every per-step value is a tensor input, so only new loop buffers (and, with
        cuda_graph=True, a new capture) are made."""
        return self._solver

    @solver.setter
    def solver(self, solver):
        if not hasattr(solver, "plan"):
            raise TypeError(f"solver: expected a fastguide solver (DDIM, DDPM, FlowEuler), got {type(solver).__name__}")
        self._solver = solver

    # ------------------------------------------------------------------ public
    def compile(self, mode: str | None = None, cuda_graph: bool = False, fullgraph: bool = False,
                fuse_step: bool = True) -> "Sampler":
        """torch.compile the hot step once.

        With ``fuse_step`` (the default) the batched forward and the guided update are one compiled
        function whose per-step inputs (scalars, guidance scales, table rows) are device tensors, so a new
        scale, step or rule reuses the compiled code and the step can be captured in a CUDA graph. With
        ``fuse_step=False`` the model is compiled alone and the guided update runs eagerly (on the CPU: a
        few in-place ops with host scalars), which can win for large CPU batches.
        ``cuda_graph=True`` also captures the whole fixed-NFE loop as one CUDA graph per (batch, shape,
        dtype, rule) and replays it; on the CPU it warns and runs eagerly over the same static buffers.
        ``mode``: torch.compile's mode. None is inductor's default, except with ``cuda_graph=True`` on CUDA,
        where it is "max-autotune-no-cudagraphs" (the mode the benchmark floor compiles the network with; a
        longer warm-up for the fastest kernels); pass "default" for the plain default there. Do not combine
        "reduce-overhead" with cuda_graph=True (it makes its own graphs).
        """
        self.compiled, self.cuda_graph, self._fuse_step = True, bool(cuda_graph), fuse_step
        self._compile_kw = {"mode": mode, "fullgraph": fullgraph, "dynamic": False}
        self._compiled = {}
        self.buffers.clear()
        return self

    def warmup(self, noise_shape, cond=None, *, dtype=torch.float32, device="cpu", guidance=None) -> float:
        """Run one throw-away call for ``noise_shape`` [B, C, H, W] so that compiling (and, with cuda_graph=True,
        capturing) happens now rather than in the first real call; returns the seconds it took.

        ``cond`` defaults to label 0 for every sample (pass a [B, ...] tensor for embedding conditions);
        ``guidance`` picks the rule to prepare (ReCFG compiles a variant of its own). Warm up each (batch,
        shape, dtype, rule) a service will see: each is its own compiled shape and captured graph.
        """
        shape = tuple(noise_shape) if isinstance(noise_shape, (tuple, list, torch.Size)) else None
        if shape is None or len(shape) != 4 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise ValueError(f"noise_shape: expected 4 positive ints (B, C, H, W), got {noise_shape!r}")
        dev = torch.device(device)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=dev, dtype=dtype)
        if cond is None:
            cond = torch.zeros(shape[0], dtype=torch.long, device=dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cuda_graph=True on the CPU warns on every call; not news here
            self.sample(noise, cond, guidance=guidance, progress=False)
        sync()
        return time.perf_counter() - start

    def sample(self, noise: torch.Tensor, cond, *, seeds=None, scale=None, guidance=None, callback=None,
               progress=None, solvers=None, loop_steps: int | None = None, step_noise=None) -> torch.Tensor:
        """Run the fixed-NFE loop from ``noise`` [B, C, H, W] (x_T) with conditions ``cond`` [B].

        ``seeds`` (B ints) make stochastic solvers' per-step noise a function of each sample's own seed;
        without them it comes from torch's global RNG. ``scale`` overrides the guidance scale for this
        call (float or [B]) and ``guidance`` the rule (e.g. switch CFG <-> ReCFG without a new Sampler).
        ``callback(step, t, x)`` runs after each step (not with CUDA graphs).
        ``solvers``: B solvers, one per row, instead of the Sampler's own (rows with different step counts of one
        solver family in one loop: fastguide/row_plans.py; each row's sample is its own plan's); ``loop_steps``: that
        loop's length (default: the longest row plan's; a fixed length serves every mix with one set of buffers
        and, with cuda_graph=True, one captured graph).
        ``step_noise`` [S, B, C, H, W]: a stochastic solver's per-step noise, given (e.g. drawn from a diffusers
        pipeline's generator in its scheduler's order) instead of drawn from ``seeds``.
        """
        x = check_noise(noise, values=not self.check_finite)  # else checked with the sample, after the loop
        cond = check_cond(cond, x.shape[0], x.device)
        if self.num_classes is not None and not cond.is_floating_point():
            check_label_range(cond, self.num_classes, self.null_cond)
        base_rule = rule = self.guidance if guidance is None else check_guidance(guidance, self.null_cond)
        if scale is not None:
            rule = with_scale(rule, scale)
        seeds = None if seeds is None else check_seeds(seeds, x.shape[0])
        if solvers is None:
            plan = self.solver.plan
            sg = rule.prepare(plan, cond, x.shape[1:])  # only ReCFG reads label values (on the host, itself)
        else:
            plan = row_plans_for(solvers, x.shape[0], loop_steps)
            sg = merge_guidance(base_rule, plan, cond.cpu(), x.shape[1:], scale=None if scale is None else rule.scale)
        if step_noise is not None:
            z = self._check_step_noise(step_noise, plan, x)
        elif solvers is not None and seeds is not None and plan.stochastic:
            z = row_step_noise(plan, seeds, x.shape[1:], x.dtype, x.device)  # each row's as its own plan draws it
        else:
            z = loop.draw_step_noise(plan, x, seeds)
        pt = self._plan_tensors(plan, sg, x.device, x.dtype)
        config = self._loop_config(rule, plan, x.device, x.shape[0])
        use_graph = self.cuda_graph and x.device.type == "cuda" and callback is None and rule.traceable
        if self.cuda_graph and not use_graph:
            warnings.warn("cuda_graph=True: running eagerly over static buffers (needs CUDA tensors, no callback, "
                          "a rule without autograd)", stacklevel=2)
        allocate = functools.partial(loop.allocate, x, cond, sg, plan.steps, plan.stochastic, self.null_cond,
                                     self.cond_first, plan.history_slots)
        with self.buffers.claim(loop.buffer_key(x, cond, pt, sg), allocate) as b:
            loop.refill(b, x, cond, pt, sg, z, self.null_cond)
            if config.hot is not None:
                loop.check_model_once(b, config.model)
            if use_graph:
                sums = loop.replay(b, config)
            else:
                sums = loop.run_loop(b, config, callback, self.progress if progress is None else progress)
            if self.check_finite:
                loop.raise_if_not_finite(b, sums, x)
            return b.x2[:b.batch].clone()

    @staticmethod
    def _check_step_noise(step_noise, plan, x: torch.Tensor) -> torch.Tensor | None:
        if not plan.stochastic:
            raise ValueError("step_noise: this solver is deterministic; it takes no per-step noise")
        want = (plan.steps, *x.shape)
        if not isinstance(step_noise, torch.Tensor) or tuple(step_noise.shape) != want:
            got = tuple(step_noise.shape) if isinstance(step_noise, torch.Tensor) else type(step_noise).__name__
            raise ValueError(f"step_noise: expected a tensor of shape {want} (steps, batch, *latent), got {got}")
        if not step_noise.is_floating_point() or not bool(torch.isfinite(step_noise).all()):
            raise ValueError("step_noise: expected finite floating-point values")
        return step_noise.to(x.device, x.dtype)

    # ------------------------------------------------------------------ what a call runs
    def _loop_config(self, rule, plan, device: torch.device, batch: int) -> loop.LoopConfig:
        step = step_impl(self.backend, device, self.compiled and self._fuse_step, getattr(plan, "per_row", False))
        fused = step.fused and rule.traceable
        model = self.model if (not self.compiled or step.fused) else self._compiled_fn("model", device)
        hot = self._compiled_fn("hot", device) if fused else None
        wrapped = rule.wrap_model(model, plan, self.null_cond, cond_first=self.cond_first, batch=batch)
        return loop.LoopConfig(wrapped, step, hot, plan.clip_range, self.check_finite)

    def compile_options(self, device: torch.device) -> dict:
        """The torch.compile options this Sampler compiles with for ``device`` (see :meth:`compile`)."""
        kw = dict(self._compile_kw)
        if kw["mode"] is None and self.cuda_graph and device.type == "cuda":
            kw["mode"] = "max-autotune-no-cudagraphs"
        return kw

    def _compiled_fn(self, what: str, device: torch.device):
        """The compiled hot step ("hot") or the model compiled alone ("model"), made once per torch.compile mode."""
        kw = self.compile_options(device)
        fn = self._compiled.get((what, kw["mode"]))
        if fn is None:
            fn = loop.compile_hot_step(self, **kw) if what == "hot" else torch.compile(self.model, **kw)
            self._compiled[(what, kw["mode"])] = fn
        return fn

    def _plan_tensors(self, plan, sg, device, dtype) -> loop.PlanTensors:
        """Per-step tensors of the plan and the rule's table, cached so repeated calls neither rebuild them nor
        copy the table to the device again."""
        key = (device, dtype, None if sg.table is None else id(sg.table))  # entries hold the table: ids stay unique
        pt = self.plans.get(key)
        if pt is None or not pt.serves(plan, sg):
            same_table = pt is not None and sg.table is not None and pt.table_source is sg.table
            pt = loop.PlanTensors.build(plan, sg, device, dtype, pt.table if same_table else None)
            self.plans.put(key, pt)
        return pt

    def __repr__(self):
        return (f"Sampler({type(self.solver).__name__}, {self.guidance!r}, backend={self.backend!r}, "
                f"cond_first={self.cond_first}, compiled={self.compiled}, cuda_graph={self.cuda_graph})")
