"""Running an exported graph with onnxruntime: :class:`OnnxSampler` mirrors ``Sampler.sample`` (see fastguide.onnx)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from fastguide.checks import check_scale, check_seeds
from fastguide.noise import step_noise as seeded_step_noise
from fastguide.onnx.metadata import HISTORY_INPUT, HISTORY_OUTPUT, read_metadata

logger = logging.getLogger("fastguide.onnx")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("OnnxSampler needs onnxruntime: pip install 'fastguide[test]' (onnxruntime, CPU) or "
                          "'fastguide[gpu]' (onnxruntime-gpu), never both") from None
    return onnxruntime


class OnnxSampler:
    """Runs a graph written by :func:`export` with onnxruntime; ``sample()`` mirrors ``Sampler.sample``.

    ``providers``: None picks CUDAExecutionProvider when this onnxruntime offers it, else the CPU. ``provider``
    is the one the session really runs on: onnxruntime-gpu falls back to the CPU silently when the CUDA
    libraries are missing, so this reads ``session.get_providers()``, logs it, and warns when CUDA was asked
    for but did not load. ``io_binding`` (default: on for CUDA) keeps x on the device across a step graph's steps
    (inputs copied once, x ping-pongs between two device buffers).

    Inputs are strict, like the graph: noise and per-step noise float32, labels int64 (numpy arrays or torch
    tensors); another dtype is a TypeError that names the cast. Scales (float or [B]) are host parameters and
    are converted to float32.
    """

    def __init__(self, path, providers=None, *, io_binding: bool | None = None, check_finite: bool = True):
        ort = _import_ort()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: ONNX file {path} not found (write one with fastguide.onnx.export or "
                                    "`fastguide export-onnx`)")
        providers = self._check_providers(providers, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # onnxruntime raises its own types for a file that is not a loadable graph
            raise ValueError(f"path: {path} is not a loadable ONNX graph ({str(e).splitlines()[0][:200]})") from None
        self.provider = self.session.get_providers()[0]
        if CUDA in providers and self.provider != CUDA:
            warnings.warn(f"providers: {CUDA} was requested but did not load (CUDA / cuDNN libraries missing or "
                          f"mismatched); running on {self.provider}", RuntimeWarning, stacklevel=2)
        logger.info("OnnxSampler: %s runs on %s", path, self.provider)
        self.device_id = int(self.session.get_provider_options().get(CUDA, {}).get("device_id", 0))
        self.device_type = "cuda" if self.provider == CUDA else "cpu"
        self.io_binding = self.provider == CUDA if io_binding is None else bool(io_binding)
        self.path, self.check_finite = path, check_finite
        self.meta = read_metadata(self.session)
        self.mode, self.steps, self.output = self.meta["mode"], int(self.meta["steps"]), self.meta["output"]
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.stochastic = bool(self.meta["stochastic"])
        # graphs written before multistep export lack these keys: one-step plans starting from the noise itself
        self.history_slots = int(self.meta.get("history_slots", 0))
        self.init_scale = float(self.meta.get("init_scale", 1.0))
        self.per_row = bool(self.meta.get("per_row", False))  # exported with per_row=True: sample(solvers=...)

    @staticmethod
    def _check_providers(providers, available) -> list[str]:
        if providers is None:
            return [CUDA, CPU] if CUDA in available else [CPU]
        if isinstance(providers, str):
            providers = [providers]
        providers = list(providers)
        unknown = [p for p in providers if p not in available]
        if not providers or unknown:
            raise ValueError(f"providers: {unknown or providers} not available in this onnxruntime (available: "
                             f"{available}); CUDA needs the onnxruntime-gpu package instead of onnxruntime")
        return providers

    # ------------------------------------------------------------------ public
    def sample(self, noise, labels, *, scale=None, seeds=None, step_noise=None, solvers=None):
        """The fixed-NFE sample from ``noise`` [B, C, H, W] float32 with int64 ``labels`` [B].

        ``scale``: float or [B] (default: the exported rule's scale). Stochastic solvers draw their per-step
        noise as ``Sampler.sample`` does (from ``seeds``, else torch's global RNG) unless ``step_noise``
        [S, B, C, H, W] float32 is given. Returns a torch tensor for a torch input, else a numpy array.
        The first state is ``init_scale * noise`` (the plan's, from the metadata; the loop graph does it
        itself); a multistep plan's history slots start at zero and are carried from step to step.
        ``solvers``: a graph exported with ``per_row=True`` takes B solvers, one per row, of the exported solver's
        family with at most its steps (``Sampler.sample(solvers=...)``'s samples); other graphs take none.
        """
        x = self._float_input("noise", noise, (None, *self.latent_shape))
        batch = x.shape[0]
        lab = self._labels(labels, batch)
        rows, init, plans = {}, None, None
        if self.per_row:
            if solvers is None:
                raise ValueError("solvers: this graph takes a plan per row (exported with per_row=True); pass "
                                 f"solvers=[...], {batch} solvers of the exported family")
            plans = self._row_plans(solvers, batch)
            rows, init = self._row_feeds(plans, lab, scale)
            g1 = rows.pop("g1")
        elif solvers is not None:
            raise ValueError("solvers: this graph runs its exported plan for every row; export it with per_row=True "
                             "to give each row its own solver")
        else:
            g1 = self._g1(scale, batch)
        z = self._per_step_noise(step_noise, seeds, x.shape, plans)
        if self.mode == "loop":
            feeds = {"noise": x, "labels": lab, "g1": g1, **rows, **({} if z is None else {"z": z})}
            if init is not None:
                feeds["init_scale"] = init
            out = self._run_once(feeds)[0]
        else:
            if init is not None:
                x = x * init
            elif self.init_scale != 1.0:
                x = x * np.float32(self.init_scale)  # float32, as the torch sampler's x * init_scale
            hist = np.zeros((self.history_slots, *x.shape), np.float32) if self.history_slots else None
            if self.io_binding:
                out = self._steps_io_binding(x, lab, g1, z, hist, rows)
            else:
                for i in range(self.steps):
                    res = self._run_once({**self._step_feeds(x, i, lab, g1, None if z is None else z[i], hist),
                                          **rows})
                    x, hist = res[0], (res[1] if hist is not None else None)
                out = x
        self._check_finite(out)
        return torch.from_numpy(out) if isinstance(noise, torch.Tensor) else out

    def step(self, x, step: int, labels, *, scale=None, z=None, history=None):
        """One guided step of a mode="step" graph: x_next from x [B, C, H, W] at step index ``step``.

        ``x`` is the sampler's state (before step 0: ``init_scale * noise``). A multistep plan's graph
        (``history_slots`` K > 0) also takes its history slots ``history`` [K, B, C, H, W] float32 (zeros before
        step 0) and returns ``(x_next, history_next)``."""
        if self.mode != "step":
            raise ValueError(f"step: this graph was exported with mode={self.mode!r}; use sample() or export "
                             "mode='step'")
        if self.per_row:
            raise ValueError("step: this graph takes a plan per row; use sample(solvers=...)")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.steps:
            raise ValueError(f"step: expected a step index 0..{self.steps - 1}, got {step!r}")
        xa = self._float_input("x", x, (None, *self.latent_shape))
        lab, g1 = self._labels(labels, xa.shape[0]), self._g1(scale, xa.shape[0])
        if self.stochastic and z is None:
            raise ValueError("z: this solver is stochastic; pass its step noise z [B, C, H, W] float32")
        za = None if z is None else self._float_input("z", z, xa.shape)
        if za is not None and not self.stochastic:
            raise ValueError("z: this solver is deterministic; the graph has no z input")
        k = self.history_slots
        if k and history is None:
            dims = ", ".join(str(d) for d in self.latent_shape)
            raise ValueError(f"history: this solver is multistep; pass its {k} history slots [{k}, B, {dims}] "
                             "float32 (zeros before step 0)")
        if not k and history is not None:
            raise ValueError("history: this solver is one-step; the graph has no history input")
        ha = None if history is None else self._float_input("history", history, (k, *xa.shape), batch_axis=1)
        out = self._run_once(self._step_feeds(xa, int(step), lab, g1, za, ha))
        if isinstance(x, torch.Tensor):
            out = [torch.from_numpy(o) for o in out]
        return out[0] if not k else (out[0], out[1])

    def __repr__(self):
        return (f"OnnxSampler({str(self.path)!r}, mode={self.mode!r}, steps={self.steps}, "
                f"guidance={self.meta['guidance']}, provider={self.provider!r})")

    # ------------------------------------------------------------------ running
    def _step_feeds(self, x, i: int, labels, g1, z, history=None) -> dict:
        feeds = {"x": x, "step": np.array(i, dtype=np.int64), "labels": labels, "g1": g1}
        if z is not None:
            feeds["z"] = z
        if history is not None:
            feeds[HISTORY_INPUT] = history
        return feeds

    def _outputs(self) -> list[str]:
        """x_next (or sample), and a multistep step graph's updated history."""
        return [self.output, HISTORY_OUTPUT] if self.history_slots and self.mode == "step" else [self.output]

    def _run_once(self, feeds: dict) -> list[np.ndarray]:
        if not self.io_binding:
            return self.session.run(self._outputs(), feeds)
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        for name in self._outputs():
            io.bind_output(name, self.device_type, self.device_id)
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()

    def _steps_io_binding(self, x, labels, g1, z, history=None, rows=None) -> np.ndarray:
        """The step loop on the device: inputs copied once, x (and a multistep plan's history slots) ping-pong
        between two device buffers each."""
        ort = _import_ort()

        def on_device(a):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device_type, self.device_id)

        io = self.session.io_binding()
        for name, value in {"labels": labels, "g1": g1, **(rows or {})}.items():
            io.bind_ortvalue_input(name, on_device(value))
        step_ids = [on_device(np.array(i, dtype=np.int64)) for i in range(self.steps)]
        zs = None if z is None else [on_device(z[i]) for i in range(self.steps)]

        def buffers(first):
            """Two device buffers, the first holding a copy of ``first`` (a CPU OrtValue made from numpy would
            wrap it, and then overwrite the caller's noise)."""
            pair = [ort.OrtValue.ortvalue_from_shape_and_type(list(first.shape), np.float32, self.device_type,
                                                              self.device_id) for _ in range(2)]
            pair[0].update_inplace(np.ascontiguousarray(first))
            return pair

        cur, nxt = buffers(x)
        h_cur, h_nxt = buffers(history) if history is not None else (None, None)
        for i in range(self.steps):
            io.bind_ortvalue_input("x", cur)
            io.bind_ortvalue_input("step", step_ids[i])
            if zs is not None:
                io.bind_ortvalue_input("z", zs[i])
            io.bind_ortvalue_output(self.output, nxt)
            if h_cur is not None:
                io.bind_ortvalue_input(HISTORY_INPUT, h_cur)
                io.bind_ortvalue_output(HISTORY_OUTPUT, h_nxt)
            self.session.run_with_iobinding(io)
            cur, nxt = nxt, cur
            h_cur, h_nxt = h_nxt, h_cur
        return cur.numpy()

    # ------------------------------------------------------------------ input checks
    @staticmethod
    def _as_array(name: str, value) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            return value
        if isinstance(value, (list, tuple)):
            return np.asarray(value)
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(value).__name__}")

    def _float_input(self, name: str, value, shape, batch_axis: int = 0) -> np.ndarray:
        a = self._as_array(name, value)
        if a.dtype != np.float32:
            raise TypeError(f"{name}: the ONNX graph takes float32, got {a.dtype}; cast it first "
                            f"({name}.float() for a torch tensor, {name}.astype(np.float32) for numpy)")
        if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            want = ", ".join("B" if s is None else str(s) for s in shape)
            raise ValueError(f"{name}: expected shape [{want}], got {list(a.shape)}")
        if a.shape[batch_axis] < 1:
            raise ValueError(f"{name}: expected a non-empty batch, got shape {list(a.shape)}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: contains NaN or inf")
        return np.ascontiguousarray(a)

    def _labels(self, labels, batch: int) -> np.ndarray:
        a = self._as_array("labels", labels)
        if a.dtype != np.int64:
            raise TypeError(f"labels: the ONNX graph takes int64 labels, got {a.dtype}; cast them first "
                            "(labels.long() for a torch tensor, labels.astype(np.int64) for numpy)")
        if a.shape != (batch,):
            raise ValueError(f"labels: expected shape [{batch}] (one label per sample), got {list(a.shape)}")
        classes = self.meta.get("table_classes")
        if classes is not None and self.meta.get("unknown_label") == "error":
            bad = a[(a < 0) | (a >= classes)]
            if bad.size:
                raise ValueError(f"labels: {bad[:5].tolist()} are outside the ratio table's classes [0, {classes}) "
                                 "(export with ReCFG(..., unknown_label='mean') to use the mean row)")
        return np.ascontiguousarray(a)

    def _g1(self, scale, batch: int) -> np.ndarray:
        if scale is None:
            scale = self.meta.get("default_scale")
            if scale is None:
                raise ValueError("scale: this graph was exported with a per-sample scale; pass scale=")
        if isinstance(scale, np.ndarray):
            scale = torch.from_numpy(scale)
        s = check_scale(scale)
        if isinstance(s, float):
            return np.full(batch, s, dtype=np.float32)
        if s.numel() != batch:
            raise ValueError(f"scale: expected {batch} per-sample values (the batch), got {s.numel()}")
        return s.numpy().astype(np.float32)

    def _row_plans(self, solvers, batch: int):
        """The rows' plans stacked to this graph's steps, checked against what the graph fixes."""
        from fastguide.row_plans import RowPlans

        if isinstance(solvers, (str, bytes)) or not hasattr(solvers, "__len__") or len(solvers) != batch:
            raise ValueError(f"solvers: expected a sequence of {batch} fastguide solvers (one per row)")
        for b, s in enumerate(solvers):
            if not hasattr(s, "plan"):
                raise TypeError(f"solvers: row {b} is a {type(s).__name__}, not a fastguide solver")
            p = s.plan
            wanted = {"kind": self.meta.get("kind", p.kind), "prediction_type": self.meta["prediction_type"],
                      "clip_range": self.meta["clip_range"], "history_slots": self.history_slots}
            for what, value in wanted.items():
                if getattr(p, what) != value:
                    raise ValueError(f"solvers: row {b}'s plan has {what} {getattr(p, what)!r}, the graph's "
                                     f"{value!r}; give every row a solver of the exported family")
            if p.steps > self.steps:
                raise ValueError(f"solvers: row {b}'s plan has {p.steps} steps; this graph runs at most {self.steps}")
        slots = self.meta.get("write_slots")
        return RowPlans.stack([s.plan for s in solvers], self.steps,
                              None if slots is None else torch.tensor(slots, dtype=torch.int64))

    def _row_feeds(self, plans, labels, scale) -> tuple[dict, np.ndarray]:
        """g1 [S, B] and the row_* inputs of a per-row graph, and each row's init_scale [B, 1, 1, 1]."""
        from fastguide.guidance import CFG
        from fastguide.row_plans import merge_guidance
        from fastguide.table import grid_rows

        default = self.meta.get("default_scale")
        if scale is None and default is None:
            raise ValueError("scale: this graph was exported with a per-sample scale; pass scale=")
        if isinstance(scale, np.ndarray):
            scale = torch.from_numpy(scale)
        interval = self.meta.get("interval")
        rule = CFG(1.0 if default is None else default, interval=None if interval is None else tuple(interval))
        sg = merge_guidance(rule, plans, torch.from_numpy(labels), self.latent_shape,
                            scale=None if scale is None else check_scale(scale))
        f32 = lambda t: np.ascontiguousarray(t.to(torch.float32).numpy())  # noqa: E731
        feeds = {"g1": f32(sg.g1), "row_t": f32(plans.timesteps), "row_coef": f32(plans.coef)}
        if self.meta.get("table_classes") is not None:
            grid = np.asarray(self.meta["table_timesteps"], dtype=np.float64)
            steps = np.zeros((plans.steps, len(plans.plans), 2), np.int64)
            w = np.zeros((plans.steps, len(plans.plans)), np.float32)
            for b, p in enumerate(plans.plans):
                i01, wb = grid_rows(grid, p.timesteps, self.meta.get("out_of_range") or "error")
                steps[:p.steps, b], w[:p.steps, b] = i01.numpy(), wb.numpy()
            feeds.update(row_table_steps=steps, row_table_w=w)
        if self.history_slots:
            feeds.update(row_hist_w=f32(plans.history.weights), row_write_coef=f32(plans.history.write_coef))
        init = plans.init_scale
        init = torch.full((len(plans.plans),), float(init)) if not isinstance(init, torch.Tensor) else init
        return feeds, f32(init).reshape(-1, *([1] * len(self.latent_shape)))

    def _per_step_noise(self, step_noise, seeds, x_shape, plans=None) -> np.ndarray | None:
        if not self.stochastic:
            if step_noise is not None:
                raise ValueError("step_noise: this solver is deterministic; the graph has no z input")
            if seeds is not None:
                check_seeds(seeds, x_shape[0])
            return None
        if step_noise is not None:
            return self._float_input("step_noise", step_noise, (self.steps, *x_shape))
        if seeds is not None and plans is not None:
            from fastguide.row_plans import row_step_noise

            z = row_step_noise(plans, check_seeds(seeds, x_shape[0]), x_shape[1:])
        elif seeds is not None:
            z = seeded_step_noise(check_seeds(seeds, x_shape[0]), self.steps, x_shape[1:], torch.float32, "cpu")
        else:
            z = torch.randn((self.steps, *x_shape), dtype=torch.float32)
        return z.numpy()

    def _check_finite(self, out: np.ndarray) -> None:
        if self.check_finite and not np.isfinite(out).all():
            raise ValueError("model: the ONNX sample contains NaN/inf; the sample is not valid")
