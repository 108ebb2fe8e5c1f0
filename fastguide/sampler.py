"""The sampling loop: one batched 2B forward (cond + null) per step, then one guided step.

Static buffers (the model's input X2 = [x | x], labels L2 = [c | null], and every per-step scalar as a
device tensor) are filled once per call; the step reads the model output's halves in place and writes
x_next into both halves of X2, so every step has the same shapes. That is what lets ``compile()`` trace
the hot step once (a new scale, step or rule never recompiles) and lets ``cuda_graph=True`` capture the
whole fixed-NFE loop once per (batch, shape, dtype, rule) and replay it with new noise, labels and scales.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import threading
import time
import types
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fastguide.guidance import CFG, ClassifierGuidance, StepGuidance, _check_scale
from fastguide.kernels import reference
from fastguide.kernels.reference import compute_dtype_for
from fastguide.kernels.torch_step import guided_step_into_host

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_STEP_NOISE_SALT = 0x9E3779B97F4A7C15
MAX_CACHED_LOOPS = 8  # loop buffers (and captured graphs) kept per Sampler, least recently used dropped first
MAX_CACHED_PLANS = 4  # plan tensors (incl. a device copy of each ReCFG table) kept per Sampler


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


@dataclass(frozen=True)
class StepImpl:
    """How the loop runs the guided update: ``fn`` with the reference's contract; ``host``: it takes the
    per-step scalars as Python numbers; ``fused``: the forward and the update run as one compiled function."""

    fn: object
    host: bool
    fused: bool


@dataclass
class LoopBuffers:
    """Everything one fixed-NFE loop reads and writes. Allocated once per static key (batch, shape, dtype,
    rule, steps) and refilled in place by later calls, so the addresses a compiled step or a captured CUDA
    graph reads stay the same and a call allocates almost nothing."""

    x2: torch.Tensor  # [R, *shape], R = 2B when any step is guided, else B; both halves hold x
    labels: torch.Tensor  # [R] or [R, ...]: [c | null] (cond_first) or [null | c]
    cond: torch.Tensor  # [B] (or [B, ...]) the conditional labels alone (a view into labels)
    g1: torch.Tensor  # [S, B] in the compute dtype
    rows: torch.Tensor | None  # [B] table rows of this call's labels
    z: torch.Tensor | None  # [S, B, *shape]
    out_sums: torch.Tensor  # [S] float32 sum of each step's model output: non-finite iff the output was
    guided: tuple  # [S] bool: run the null half at this step
    batch: int
    plan_entry: dict | None = None  # the cached plan tensors (t, coef, table, steps) this loop reads
    g1_source: torch.Tensor | None = None  # the host g1 that b.g1 holds (refill skips an unchanged one)
    null_source: object = None
    graph: object = None  # the captured CUDA graph of the whole loop (cuda_graph=True on CUDA)
    in_use: bool = False  # a call is running over these buffers (a re-entrant call gets its own)
    per_step: dict | None = None  # per-step views (rows of t, g1, coef, ...) made once, not per call

    @property
    def t(self):
        return self.plan_entry["t"]

    @property
    def coef(self):
        return self.plan_entry["coef"]

    @property
    def table(self):
        return self.plan_entry["table"]

    @property
    def steps(self):
        return self.plan_entry["steps"]


def _hot_step(model, step_fn, x2, inp, labels, t_i, g1_i, coef_i, table, rows, steps_i, z_i, sum_i,
              batch: int, cond_first: bool, clip_range, check_finite: bool):
    """One step over static buffers: the forward of ``inp`` (x2 itself, the 2B cond + null batch, or its B
    conditional rows outside a guidance interval), then the fused guided update written into x2.

    Every per-step value arrives as a tensor (t_i, g1_i, coef_i, steps_i, z_i, sum_i), so torch.compile
    traces each of the two shapes once and never recompiles for a new step, scale or table row.
    """
    out = model(inp, t_i, labels)
    if check_finite:
        sum_i.copy_(out.sum(dtype=torch.float32))  # one cheap reduction; checked once after the loop
    step_fn(x2, x2[:batch], out, g1_i, coef_i, cond_first=cond_first, table=table, rows=rows, table_steps=steps_i,
            clip_range=clip_range, z=z_i)
    # Nothing is returned: a compiled function's outputs cost ~12 us a call on the CPU (a view output of the
    # model is rebuilt on every call), and the loop needs only what was written into x2 and sum_i.


class Sampler:
    """Guided sampling with any solver plan and guidance rule.

    model(x [N, C, H, W], t [N] float, cond [N] long | [N, ...]) -> [N, C, H, W]
    ``null_cond``: the unconditional label (int) or embedding (tensor of one condition's shape).
    ``cond_first``: whether the batched forward puts the conditional half first ([c | null]).
    ``backend``: "torch" (plain torch ops, any device: the eager host-scalar step, or the reference inside
    compiled code), "triton" (the fused kernel), or "auto" (triton for CUDA tensors when available, torch
    otherwise).
    """

    def __init__(self, model, solver, guidance=None, null_cond=None, backend: str = "auto",
                 cond_first: bool = True, progress: bool = True, check_finite: bool = True):
        if not callable(model):
            raise TypeError("model: expected a callable model(x, t, cond) -> tensor")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.model, self.null_cond = model, null_cond
        self.solver = solver
        self.guidance = self._check_guidance(CFG(1.0) if guidance is None else guidance)
        self.backend, self.cond_first = backend, bool(cond_first)
        self.progress, self.check_finite = progress, check_finite
        self.compiled = False
        self.cuda_graph = False
        self._fuse_step = True
        self._plan_cache = {}  # (device, dtype, table) -> plan-derived per-step tensors (see _plan_tensors)
        self._hot = {}  # the compiled hot step (this Sampler's own code object), created on first use
        self._loops = {}  # LoopBuffers (+ captured graph) per static key
        self._impls = {}  # (device, backend) -> StepImpl
        self._lock = threading.Lock()  # guards claiming cached loop buffers

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
        self.compiled = True
        self._compile_kw = {"mode": mode, "fullgraph": fullgraph, "dynamic": False}
        self._fuse_step = fuse_step
        self._hot = {}
        self.cuda_graph = bool(cuda_graph)
        self._loops, self._impls = {}, {}
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
               progress=None) -> torch.Tensor:
        """Run the fixed-NFE loop from ``noise`` [B, C, H, W] (x_T) with conditions ``cond`` [B].

        ``seeds`` (B ints) make stochastic solvers' per-step noise a function of each sample's own seed;
        without them it comes from torch's global RNG. ``scale`` overrides the guidance scale for this
        call (float or [B]) and ``guidance`` the rule (e.g. switch CFG <-> ReCFG without a new Sampler).
        ``callback(step, t, x)`` runs after each step (not with CUDA graphs).
        """
        x = self._check_noise(noise, values=not self.check_finite)  # else checked with the sample, below
        cond = self._check_cond(cond, x.shape[0], x.device)
        guidance = self._check_guidance(self.guidance if guidance is None else guidance)
        if scale is not None:
            guidance = _with_scale(guidance, scale)
        plan = self.solver.plan
        sg = guidance.prepare(plan, cond, x.shape[1:])  # only ReCFG reads label values (on the host, itself)
        step = self._step_impl(x.device)
        use_graph = self.cuda_graph and x.device.type == "cuda" and callback is None \
            and not isinstance(guidance, ClassifierGuidance)
        if self.cuda_graph and not use_graph:
            warnings.warn("cuda_graph=True: running eagerly over static buffers (needs CUDA tensors, no callback, "
                          "no classifier guidance)", stacklevel=2)
        b = self._buffers(x, cond, plan, sg, seeds)  # marked in use
        try:
            show = (self.progress if progress is None else progress) and not use_graph
            if use_graph:
                self._replay(b, step, plan, guidance)
                step_sums = b.out_sums
            else:
                step_sums = self._run(b, step, plan, guidance, callback, show)
            if self.check_finite:
                self._raise_if_not_finite(b, plan, step_sums, x)
            return b.x2[:b.batch].clone()
        finally:
            b.in_use = False

    @staticmethod
    def _raise_if_not_finite(b: LoopBuffers, plan, step_sums, noise: torch.Tensor) -> None:
        """One host sync on the common path: the noise, every step's model output and the sample are finite
        iff their float32 sums are (``step_sums``: per-step sums taken as the loop ran, a [S] tensor or a list
        of scalars). A sum that overflows while every value is finite only sends this to the exact checks
        below, which then pass."""
        x = b.x2[:b.batch]
        sums = step_sums if isinstance(step_sums, list) else [step_sums.sum()]
        if math.isfinite(torch.stack([*sums, x.sum(dtype=torch.float32), noise.sum(dtype=torch.float32)]).sum().item()):
            return
        step_sums = torch.stack(step_sums) if isinstance(step_sums, list) else step_sums
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise: contains NaN or inf")
        bad_steps = (~torch.isfinite(step_sums)).nonzero().flatten().tolist()
        if bad_steps:
            i = bad_steps[0]
            raise ValueError(f"model: output contained NaN/inf, first at step {i} (t={float(plan.timesteps[i]):g}); "
                             "the sample is not valid")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("model: outputs were finite but the sample overflowed to NaN/inf (check the model's "
                             "output scale, the dtype, or the solver settings)")

    # ------------------------------------------------------------------ the loop
    def _run(self, b: LoopBuffers, step: "StepImpl", plan, guidance, callback=None, show=False,
             sums_into_buffer: bool = False):
        """The loop over b; returns the per-step float32 output sums (for the finite check): b.out_sums, or a
        list of scalars from the eager step unless ``sums_into_buffer`` (a captured loop must leave them in
        b.out_sums, where its replays write them)."""
        classifier = isinstance(guidance, ClassifierGuidance)
        batch, v = b.batch, b.per_step
        forward = self._model_fn(step.fused, b.x2.device)
        hot = self._hot_fn(b.x2.device) if step.fused else None
        coef = b.plan_entry["coef_host"] if step.host else v["coef"]
        steps = (b.plan_entry["steps_host"] or v["steps"]) if step.host else v["steps"]
        x_cur, x_cond = v["x_cur"], v["x_cond"]
        blocks = {"blocks": v["x_blocks"]} if step.host else {}  # the host step takes x2's block view ready-made
        sums = []  # eager path: per-step output sums, stacked once after the loop
        for i in (tqdm(range(plan.steps), desc="sampling", leave=False) if show else range(plan.steps)):
            if step.fused and not classifier:
                inp, lab, t_i = (b.x2, b.labels, v["t_all"][i]) if b.guided[i] else (x_cond, b.cond, v["t_cond"][i])
                hot(forward, step.fn, b.x2, inp, lab, t_i, v["g1"][i], v["coef"][i], b.table, b.rows, v["steps"][i],
                    v["z"][i], v["sums"][i], batch, self.cond_first, plan.clip_range, self.check_finite)
            else:
                if b.guided[i]:
                    inp, lab, t_i = b.x2, b.labels, v["t_all"][i]
                else:
                    inp, t_i = x_cond, v["t_cond"][i]
                    lab = self._null_batch(batch, b.cond) if classifier and guidance.use_null_cond else b.cond
                out = forward(inp, t_i, lab)
                self._check_model_output(out, inp, i)
                if classifier:
                    out = guidance.guided_eps(out, inp, v["t_cond"][i], b.cond, float(plan.eps_scale[i]))
                if self.check_finite:
                    total = out.sum(dtype=torch.float32)
                    v["sums"][i].copy_(total) if step.fused else sums.append(total)
                step.fn(b.x2, x_cur, out, v["g1"][i], coef[i], cond_first=self.cond_first, table=b.table,
                        rows=b.rows, table_steps=steps[i], clip_range=plan.clip_range, z=v["z"][i], **blocks)
            if callback is not None:
                callback(i, float(plan.timesteps[i]), x_cur)
        if sums and sums_into_buffer:
            b.out_sums.copy_(torch.stack(sums))
            return b.out_sums
        return sums or b.out_sums

    def _compile_options(self, device: torch.device) -> dict:
        kw = dict(self._compile_kw)
        if kw["mode"] is None and self.cuda_graph and device.type == "cuda":
            kw["mode"] = "max-autotune-no-cudagraphs"
        return kw

    def _model_fn(self, fused: bool, device: torch.device):
        """The model as the loop calls it: compiled on its own when compiled but not fused with the step."""
        if not self.compiled or fused:
            return self.model
        kw = self._compile_options(device)
        fn = self._hot.get(("model", kw["mode"]))
        if fn is None:
            fn = self._hot[("model", kw["mode"])] = torch.compile(self.model, **kw)
        return fn

    def _hot_fn(self, device: torch.device):
        if not self.compiled:
            return _hot_step
        kw = self._compile_options(device)
        fn = self._hot.get(("guided", kw["mode"]))
        if fn is None:
            # dynamo keeps its compiled variants (and its recompile limit) per code object; a private copy of
            # the hot step's code per Sampler keeps samplers from evicting each other's graphs.
            own = types.FunctionType(_hot_step.__code__.replace(), _hot_step.__globals__, f"_hot_step_{id(self):x}")
            fn = self._hot[("guided", kw["mode"])] = torch.compile(own, **kw)
        return fn

    def _replay(self, b: LoopBuffers, step: "StepImpl", plan, guidance) -> None:
        if b.graph is None:
            # Warm up (compiles, autotunes, allocates) on a side stream, then capture the whole loop.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            saved = b.x2.clone()
            with torch.cuda.stream(stream):
                self._run(b, step, plan, guidance, sums_into_buffer=True)
            torch.cuda.current_stream().wait_stream(stream)
            b.x2.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a serving process's other threads may keep using the GPU while this one captures
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._run(b, step, plan, guidance, sums_into_buffer=True)
            b.graph = graph
            b.x2.copy_(saved)
        b.graph.replay()

    # ------------------------------------------------------------------ buffers
    def _buffers(self, x, cond, plan, sg: StepGuidance, seeds) -> LoopBuffers:
        """This call's loop buffers, marked in use: the cached ones for its static key, refilled in place. A
        call that finds them in use (re-entrant from a callback, or another thread's) gets fresh ones."""
        pt = self._plan_tensors(plan, sg, x.device, x.dtype)
        guided = tuple(sg.guided)
        table = pt["table"]
        key = (tuple(x.shape), x.dtype, x.device, tuple(cond.shape), cond.dtype, guided, plan.steps,
               plan.stochastic, None if table is None else (tuple(table.shape), table.dtype))
        with self._lock:  # find-and-claim is atomic across threads
            b = self._loops.pop(key, None)
            if b is not None:
                self._loops[key] = b  # most recently used last
            if b is None or b.in_use:
                b = self._allocate(x, cond, plan, sg, guided)
                if key not in self._loops:
                    if len(self._loops) >= MAX_CACHED_LOOPS:
                        self._loops.pop(next(iter(self._loops)))  # the least recently used key (and its graph)
                    self._loops[key] = b
            b.in_use = True
        try:
            self._refill(b, x, cond, plan, sg, seeds, pt)
        except BaseException:
            b.in_use = False
            raise
        return b

    def _allocate(self, x, cond, plan, sg: StepGuidance, guided: tuple) -> LoopBuffers:
        batch, dev, steps = x.shape[0], x.device, plan.steps
        run_uncond = any(guided)
        labels = self._labels(cond, batch, run_uncond)
        return LoopBuffers(
            x2=torch.empty((2 * batch if run_uncond else batch, *x.shape[1:]), dtype=x.dtype, device=dev),
            labels=labels, cond=labels[:batch] if (self.cond_first or not run_uncond) else labels[batch:],
            g1=torch.empty((steps, batch), dtype=compute_dtype_for(x.dtype), device=dev),
            rows=None if sg.rows is None else torch.empty(batch, dtype=sg.rows.dtype, device=dev),
            z=torch.empty((steps, *x.shape), dtype=x.dtype, device=dev) if plan.stochastic else None,
            out_sums=torch.zeros(steps, dtype=torch.float32, device=dev), guided=guided, batch=batch,
            null_source=self.null_cond)

    def _refill(self, b: LoopBuffers, x, cond, plan, sg: StepGuidance, seeds, pt: dict) -> None:
        """Copy this call's inputs into b; what did not change since the last call (the plan tensors, the
        guidance scales, the null label) is skipped."""
        z = self._noise_for_steps(plan, x, seeds)  # validates seeds for every solver
        if b.plan_entry is not pt:  # new plan tensors: rebind (a captured graph read the old ones)
            b.plan_entry, b.graph = pt, None
            self._set_views(b)
        if b.null_source is not self.null_cond or isinstance(self.null_cond, torch.Tensor):  # may change in place
            b.labels.copy_(self._labels(cond, b.batch, b.x2.shape[0] != b.batch))
            b.null_source = self.null_cond
        else:
            b.cond.copy_(cond)
        if b.g1_source is not sg.g1:
            b.g1.copy_(sg.g1)
            b.g1_source = sg.g1
        if b.rows is not None:
            b.rows.copy_(sg.rows)
        if z is not None:
            b.z.copy_(z)
        reference.copy_into_blocks(b.x2, x, b.per_step["x_blocks"])

    def _set_views(self, b: LoopBuffers) -> None:
        n, batch, rows2 = b.g1.shape[0], b.batch, b.x2.shape[0]
        none = [None] * n
        b.per_step = {
            "t_all": b.t.view(n, 1).expand(n, rows2).unbind(0),
            "t_cond": b.t.view(n, 1).expand(n, batch).unbind(0),
            "g1": b.g1.unbind(0), "coef": b.coef.unbind(0), "sums": b.out_sums.unbind(0),
            "z": none if b.z is None else b.z.unbind(0), "steps": none if b.steps is None else b.steps.unbind(0),
            "x_cur": b.x2[:batch], "x_blocks": b.x2.view(rows2 // batch, batch, *b.x2.shape[1:]),
            "x_cond": b.x2[:batch] if (self.cond_first or rows2 == batch) else b.x2[batch:],
        }

    def _plan_tensors(self, plan, sg: StepGuidance, dev, dtype) -> dict:
        """Per-step tensors that depend only on the plan and the table (not on this call's inputs), cached
        so repeated calls neither rebuild them nor copy the table to the device again."""
        key = (dev, dtype, None if sg.table is None else id(sg.table))  # the entry holds the table: ids stay unique
        hit = self._plan_cache.get(key)
        if hit is not None and hit["plan"] is plan and hit["src_table"] is sg.table and (
                (sg.table_w is None and hit["w"] is None)
                or (sg.table_w is not None and hit["w"] is not None and torch.equal(hit["w"], sg.table_w))):
            return hit
        coef = plan.coef.clone()
        if sg.table_w is not None:
            coef[:, 8] = sg.table_w
        entry = {
            "plan": plan, "src_table": sg.table, "w": sg.table_w,
            "t": plan.timesteps.to(dev, torch.float64 if dtype == torch.float64 else torch.float32),
            "coef": coef.to(dev, compute_dtype_for(dtype)), "coef_host": coef.tolist(),
            "table": None if sg.table is None else sg.table.to(dev),
            "steps": None if sg.table_steps is None else sg.table_steps.to(dev),
            "steps_host": None if sg.table_steps is None else [tuple(r) for r in sg.table_steps.tolist()],
        }
        with self._lock:
            if key not in self._plan_cache and len(self._plan_cache) >= MAX_CACHED_PLANS:
                self._plan_cache.pop(next(iter(self._plan_cache)))
            self._plan_cache[key] = entry
        return entry

    def _noise_for_steps(self, plan, x, seeds):
        cdt = x.dtype  # z in the latent dtype: the kernel's narrowest (minimum-bytes, 32-register) variant
        if seeds is not None:
            seeds = _check_seeds(seeds, x.shape[0])
        if not plan.stochastic:
            return None
        if seeds is not None:
            return _step_noise(seeds, plan.steps, x.shape[1:], cdt, x.device)
        return torch.randn((plan.steps, *x.shape), dtype=cdt, device=x.device)

    # ------------------------------------------------------------------ helpers
    def _check_guidance(self, guidance):
        if not hasattr(guidance, "prepare"):
            raise TypeError(f"guidance: expected CFG, ReCFG or ClassifierGuidance, got {type(guidance).__name__}")
        needs_null = getattr(guidance, "needs_uncond", False) or getattr(guidance, "use_null_cond", False)
        if needs_null and self.null_cond is None:
            raise ValueError(f"null_cond: {type(guidance).__name__} needs the unconditional (null) condition")
        return guidance

    def _step_impl(self, device: torch.device) -> "StepImpl":
        impl = self._impls.get((device, self.backend))
        if impl is None:
            impl = self._impls[(device, self.backend)] = self._choose_step_impl(device)
        return impl

    def _choose_step_impl(self, device: torch.device) -> "StepImpl":
        fused = self.compiled and self._fuse_step
        want = self.backend
        if want == "auto":
            want = "triton" if device.type == "cuda" and triton_available() else "torch"
        if want == "torch":
            if fused:
                return StepImpl(reference.guided_step_into, host=False, fused=True)
            return StepImpl(guided_step_into_host, host=True, fused=False)
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
        try:
            from fastguide.kernels.guided_step import guided_step_into
        except ImportError as e:
            raise ValueError(f"backend: 'triton' is not available here ({e})") from None
        # Table rows and steps were validated on the host (RatioTable.rows_for / step_rows): no per-step sync.
        return StepImpl(functools.partial(guided_step_into, check=False), host=False, fused=fused)

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
            return cond.clone()
        null = self._null_batch(batch, cond)
        return torch.cat([cond, null] if self.cond_first else [null, cond])

    @staticmethod
    def _check_noise(noise, values: bool = True) -> torch.Tensor:
        if not isinstance(noise, torch.Tensor):
            raise TypeError(f"noise: expected a torch.Tensor [B, C, H, W], got {type(noise).__name__}")
        if noise.ndim != 4:
            raise ValueError(f"noise: expected 4 dims [B, C, H, W], got shape {tuple(noise.shape)}")
        if noise.dtype not in FLOAT_DTYPES:
            raise TypeError(f"noise: expected float64/float32/float16/bfloat16, got {noise.dtype}")
        if noise.shape[0] < 1 or noise.numel() == 0:
            raise ValueError(f"noise: expected a non-empty batch, got shape {tuple(noise.shape)}")
        if values and not bool(torch.isfinite(noise).all()):
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
                f"cond_first={self.cond_first}, compiled={self.compiled}, cuda_graph={self.cuda_graph})")


def _with_scale(guidance, scale):
    """A shallow copy of a rule with another scale (validated like the constructor's)."""
    if not hasattr(guidance, "scale"):
        raise ValueError(f"scale: {type(guidance).__name__} has no scale to override")
    g = copy.copy(guidance)
    g.scale = _check_scale(scale)
    return g
