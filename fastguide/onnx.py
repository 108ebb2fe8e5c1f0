"""ONNX export of a guided sampler, and an onnxruntime sampler that runs the exported graph.

``export(sampler, path, latent_shape)`` writes one ONNX graph holding everything a guided step does:

    mode="step":  x [B,C,H,W] f32, step [] i64, labels [B] i64, g1 [B] f32 (, z [B,C,H,W] f32) -> x_next
    mode="loop":  noise [B,C,H,W] f32, labels [B] i64, g1 [B] f32 (, z [S,B,C,H,W] f32) -> sample

Inside the graph: the 2B batch ([x | x] with labels [c | null]), the model, the guidance rule (CFG, or
ReCFG with the ratio table [K,T,C,H,W] and the per-step table rows and lerp weights as initializers,
gathered per label and step), and the solver update with the coefficient plan [S, 9] as an initializer.
The math is :func:`fastguide.kernels.reference.guided_step` (the Triton kernel is not exportable).
``g1`` is the per-sample guidance scale; steps outside a guidance interval use g1 = 1 inside the graph.
Stochastic solvers (DDPM, DDIM with eta > 0) take their per-step noise as the input ``z``.
The batch axis is dynamic. ``OnnxSampler`` runs the graph with onnxruntime (CUDA with IO binding when the
CUDA provider really loaded, else CPU) and mirrors ``Sampler.sample``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastguide.guidance import CFG, ClassifierGuidance, ReCFG, _check_scale
from fastguide.kernels import reference

logger = logging.getLogger("fastguide.onnx")

MODES = ("step", "loop")
# torch's dynamo exporter writes opset 18 natively; asking it for 17 runs onnx's version converter, which emits
# Split with opset 18's num_outputs attribute (an invalid graph). Attention exports as MatMul/Softmax.
MIN_OPSET = 18
DEFAULT_OPSET = 18
FORMAT = "fastguide.onnx/1"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_META = "fastguide."  # prefix of our metadata_props keys


# ====================================================================== the graph (torch side)
class GuidedGraph(nn.Module):
    """The constants of one exported sampler (plan, table, rows) and one guided step over them."""

    def __init__(self, model, plan, guidance, null_cond: int, cond_first: bool, latent_shape):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.model = model  # a plain callable is kept as an attribute; torch.export lifts its tensors as constants
        unit = copy.copy(guidance)
        unit.scale = 1.0  # g1 is a graph input; prepare() is called only for the guided steps and table rows
        sg = unit.prepare(plan, torch.zeros(1, dtype=torch.int64), latent_shape)
        coef = plan.coef.clone()
        if sg.table_w is not None:
            coef[:, 8] = sg.table_w
        self.register_buffer("t", plan.timesteps.to(torch.float32))  # the Sampler feeds float32 model time too
        self.register_buffer("coef", coef.to(torch.float32))
        self.register_buffer("guided", torch.tensor(sg.guided, dtype=torch.bool))
        self.guided_steps = tuple(bool(g) for g in sg.guided)
        self.null_cond, self.cond_first, self.clip_range = int(null_cond), bool(cond_first), plan.clip_range
        self.mean_row = None
        if sg.table is not None:
            self.register_buffer("table", sg.table.detach().to(torch.float32).contiguous())
            self.register_buffer("table_steps", sg.table_steps.to(torch.int64))
            if guidance.unknown_label == "mean":
                self.mean_row = guidance.table.num_classes
        else:
            self.table = None

    def rows(self, labels: torch.Tensor) -> torch.Tensor:
        if self.mean_row is None:
            return labels
        return torch.where((labels < 0) | (labels >= self.mean_row), torch.full_like(labels, self.mean_row), labels)

    def step(self, x, i, labels, g1, z) -> torch.Tensor:
        """x_next for step ``i`` (a 0-d int64 tensor); ``g1`` is already this step's scale."""
        batch = x.shape[0]
        null = torch.full_like(labels, self.null_cond)
        out = self.model(torch.cat([x, x]), self.t[i].expand(2 * batch),
                         torch.cat([labels, null] if self.cond_first else [null, labels]))
        _check_output(out, 2 * batch, x)
        m_cond, m_uncond = reference.split_model_output(out, batch, self.cond_first)
        with_table = self.table is not None
        return reference.guided_step(
            x, m_cond, m_uncond, g1, self.coef[i],
            table=self.table if with_table else None, rows=self.rows(labels) if with_table else None,
            table_steps=self.table_steps[i] if with_table else None, clip_range=self.clip_range, z=z)


def _check_output(out, rows: int, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape[1:]) != tuple(x.shape[1:]) or out.ndim != x.ndim:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model: expected an output of shape [{rows}, {', '.join(map(str, x.shape[1:]))}], got {got} "
                         "(a learned-sigma model needs an adapter that returns the eps half)")


class StepModule(nn.Module):
    """ONNX step graph: (x, step, labels, g1[, z]) -> x_next."""

    def __init__(self, graph: GuidedGraph):
        super().__init__()
        self.core = graph  # not "graph": torch.fx modules own that name

    def forward(self, x, step, labels, g1, z=None):
        g = self.core
        if not all(g.guided_steps):  # steps outside the guidance interval are purely conditional: g1 = 1
            g1 = torch.where(g.guided[step], g1, torch.ones_like(g1))
        return g.step(x, step, labels, g1, z)


# ====================================================================== export
def export(sampler, path, latent_shape=None, *, mode: str = "step", batch: int = 2, opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = True, external_data: bool = False) -> Path:
    """Write ``sampler``'s guided step (mode="step") or whole fixed-NFE loop (mode="loop") as ONNX to ``path``.

    ``latent_shape`` (C, H, W) defaults to the ReCFG table's. ``batch`` is the batch traced with (the batch
    axis stays dynamic unless ``dynamic_batch=False``). The loop graph is the step graph as the body of an
    ONNX Loop over the S steps (see :func:`step_to_loop`). Uses ``torch.onnx.export(dynamo=True)``; needs
    the ``onnx`` and ``onnxscript`` packages. Returns the path.
    """
    from fastguide.sampler import Sampler

    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler: expected a fastguide.Sampler, got {type(sampler).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset: expected an int >= {MIN_OPSET} (the opset torch's exporter writes natively), "
                         f"got {opset!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
    path = _check_out_path(path)
    graph = _graph_for(sampler, _check_latent_shape(latent_shape, sampler.guidance))
    trace_batch = max(batch, 2) if dynamic_batch else batch  # torch.export specializes a batch of 1
    module, args, names, dyn = _step_module_and_inputs(graph, trace_batch, sampler.solver.plan.stochastic,
                                                       dynamic_batch)
    device = _model_device(sampler.model)
    module, args = module.to(device), tuple(a.to(device) for a in args)  # traced where the weights are
    with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, input_names=names, output_names=["x_next"], dynamo=True,
                                    opset_version=opset, dynamic_shapes=dyn, verbose=False)
    proto = program.model_proto
    _set_metadata(proto, {**_metadata(sampler, graph, opset), "inputs": names})
    if mode == "loop":
        proto = _loop_model(proto)
    _save(proto, path, external_data)
    return path


def step_to_loop(step_path, loop_path, *, external_data: bool = False) -> Path:
    """Turn a mode="step" graph into the mode="loop" graph (no re-tracing): noise, labels, g1 (, z [S, B, ...])
    -> sample, the step graph as the body of an ONNX Loop whose iteration number is the step index."""
    import onnx

    step_path, loop_path = Path(step_path), _check_out_path(loop_path)
    if not step_path.is_file():
        raise FileNotFoundError(f"step_path: ONNX file {step_path} not found")
    proto = onnx.load(str(step_path))
    if _proto_metadata(proto)["mode"] != "step":
        raise ValueError(f"step_path: {step_path} is already a loop graph (mode='loop')")
    _save(_loop_model(proto), loop_path, external_data)
    return loop_path


@contextlib.contextmanager
def _quiet_logger(name: str):
    """The exporter logs a warning per missing optional package (torchvision ops); not the user's concern."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _save(proto, path: Path, external_data: bool) -> None:
    import onnx

    onnx.save_model(proto, str(path), save_as_external_data=external_data,
                    location=path.name + ".data" if external_data else None)


def _graph_for(sampler, latent_shape) -> GuidedGraph:
    guidance, model = sampler.guidance, sampler.model
    if isinstance(guidance, ClassifierGuidance):
        raise ValueError("guidance: ClassifierGuidance cannot be exported to ONNX: each step needs autograd (the "
                         "gradient of the classifier's log-probability with respect to x_t), which an ONNX inference "
                         "graph does not have; export CFG or ReCFG, or sample it with fastguide.Sampler")
    if not isinstance(guidance, (CFG, ReCFG)):
        raise ValueError(f"guidance: only CFG and ReCFG can be exported to ONNX, got {type(guidance).__name__}")
    null = sampler.null_cond
    if isinstance(null, torch.Tensor) or isinstance(null, bool) or not isinstance(null, (int, np.integer)):
        raise ValueError("null_cond: the ONNX graph takes int64 class labels, so null_cond must be an int label, "
                         f"got {type(null).__name__}")
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("model: is in training mode; call model.eval() before exporting (dropout / batch-norm "
                         "statistics would otherwise be baked into the graph)")
    params = list(model.parameters()) if isinstance(model, nn.Module) else []
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
        raise ValueError("model: the exported graph is float32; pass a float32 model (model.float())")
    return GuidedGraph(model, sampler.solver.plan, guidance, int(null), sampler.cond_first, latent_shape)


def _model_device(model) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _check_latent_shape(latent_shape, guidance) -> tuple[int, ...]:
    if latent_shape is None:
        if isinstance(guidance, ReCFG):
            return guidance.table.latent_shape
        raise ValueError("latent_shape: expected the (C, H, W) shape of one sample (only a ReCFG table implies it)")
    try:
        shape = tuple(int(v) for v in latent_shape)
    except (TypeError, ValueError):
        raise TypeError(f"latent_shape: expected a tuple of ints (C, H, W), got {latent_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"latent_shape: expected (C, H, W) with positive sizes, got {shape}")
    return shape


def _check_out_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise ValueError(f"path: expected a file name ending in .onnx, got {str(path)!r}")
    if path.is_dir() or not path.parent.is_dir():
        raise ValueError(f"path: cannot write {path} (a directory, or its directory {path.parent} does not exist)")
    return path


def _step_module_and_inputs(graph: GuidedGraph, batch: int, stochastic: bool, dynamic_batch: bool):
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *graph.latent_shape)
    args = [torch.randn(shape, generator=gen), torch.tensor(0, dtype=torch.int64),
            torch.zeros(batch, dtype=torch.int64), torch.full((batch,), 2.0)]
    names = ["x", "step", "labels", "g1"]
    if stochastic:
        args.append(torch.randn(shape, generator=gen))
        names.append("z")
    if not dynamic_batch:
        return StepModule(graph).eval(), tuple(args), names, None
    rows = {0: torch.export.Dim("batch", min=1)}
    return StepModule(graph).eval(), tuple(args), names, {n: None if n == "step" else rows for n in names}


def _metadata(sampler, graph: GuidedGraph, opset: int) -> dict:
    from fastguide import __version__

    guidance, plan = sampler.guidance, sampler.solver.plan
    table = guidance.table if isinstance(guidance, ReCFG) else None
    return {
        "format": FORMAT, "version": __version__, "mode": "step", "output": "x_next", "steps": plan.steps,
        "timesteps": plan.timesteps.tolist(), "latent_shape": list(graph.latent_shape),
        "stochastic": plan.stochastic, "guided_steps": list(graph.guided_steps), "guidance": type(guidance).__name__,
        "default_scale": guidance.scale if isinstance(guidance.scale, float) else None,
        "solver": repr(sampler.solver), "prediction_type": plan.prediction_type, "clip_range": plan.clip_range,
        "null_cond": graph.null_cond, "cond_first": graph.cond_first, "opset": opset,
        "table_classes": None if table is None else table.num_classes,
        "unknown_label": None if table is None else guidance.unknown_label,
    }


def _set_metadata(proto, meta: dict) -> None:
    import onnx

    kept = [p for p in proto.metadata_props if not p.key.startswith(_META)]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in kept},
                                        **{_META + k: json.dumps(v) for k, v in meta.items()}})


def _loop_model(step):
    """The loop graph around a step graph: Loop(M = S) whose body is the step graph, with the iteration number as
    the step index, x carried, labels / g1 read from the outer scope and z gathered per step from z [S, B, ...]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    meta = _proto_metadata(step)
    g = step.graph
    inputs = {v.name: v for v in g.input}
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    if "z" in inputs:  # the body reads this step's slice of the outer z [S, B, ...]
        body_nodes.append(helper.make_node("Gather", ["z", "step"], ["z_step"], axis=0))
    for node in g.node:
        node = _copy(node, onnx.NodeProto())
        node.input[:] = ["z_step" if n == "z" else n for n in node.input]
        body_nodes.append(node)
    body = helper.make_graph(
        body_nodes, "guided_step",
        [helper.make_tensor_value_info("step", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), inputs["x"]],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), g.output[0]],
        value_info=g.value_info)
    outer_inputs = [_renamed(inputs["x"], "noise"), inputs["labels"], inputs["g1"]]
    if "z" in inputs:
        z = _copy(inputs["z"], onnx.ValueInfoProto())
        z.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=int(meta["steps"])))
        outer_inputs.append(z)
    trip = [numpy_helper.from_array(np.array(meta["steps"], dtype=np.int64), "loop_steps"),
            numpy_helper.from_array(np.array(True), "loop_true")]
    loop = helper.make_node("Loop", ["loop_steps", "loop_true", "noise"], ["sample"], body=body)
    graph = helper.make_graph([loop], "guided_loop", outer_inputs, [_renamed(g.output[0], "sample")],
                              initializer=list(g.initializer) + trip)
    model = helper.make_model(graph, opset_imports=step.opset_import, ir_version=step.ir_version,
                              producer_name="fastguide", functions=step.functions)
    names = [v.name for v in outer_inputs]
    _set_metadata(model, {**meta, "mode": "loop", "output": "sample", "inputs": names})
    return model


def _copy(proto, into):
    into.CopyFrom(proto)
    return into


def _renamed(value_info, name: str):
    import onnx

    v = _copy(value_info, onnx.ValueInfoProto())
    v.name = name
    return v


# ====================================================================== running
def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("OnnxSampler needs onnxruntime: pip install 'fastguide[test]' (onnxruntime, CPU) or "
                          "'fastguide[gpu]' (onnxruntime-gpu), never both") from None
    return onnxruntime


def read_metadata(session_or_path) -> dict:
    """The fastguide facts an exported graph carries (mode, steps, latent_shape, ...), decoded from JSON."""
    if isinstance(session_or_path, (str, Path)):
        import onnx

        return _proto_metadata(onnx.load(str(session_or_path), load_external_data=False))
    return _decode_metadata(session_or_path.get_modelmeta().custom_metadata_map)


def _proto_metadata(proto) -> dict:
    return _decode_metadata({p.key: p.value for p in proto.metadata_props})


def _decode_metadata(props: dict) -> dict:
    meta = {k[len(_META):]: json.loads(v) for k, v in props.items() if k.startswith(_META)}
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: not a graph written by fastguide.onnx.export (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return meta


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
        self.session = ort.InferenceSession(str(path), providers=providers)
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
    def sample(self, noise, labels, *, scale=None, seeds=None, step_noise=None):
        """The fixed-NFE sample from ``noise`` [B, C, H, W] float32 with int64 ``labels`` [B].

        ``scale``: float or [B] (default: the exported rule's scale). Stochastic solvers draw their per-step
        noise as ``Sampler.sample`` does (from ``seeds``, else torch's global RNG) unless ``step_noise``
        [S, B, C, H, W] float32 is given. Returns a torch tensor for a torch input, else a numpy array.
        """
        x = self._float_input("noise", noise, (None, *self.latent_shape))
        batch = x.shape[0]
        lab = self._labels(labels, batch)
        g1 = self._g1(scale, batch)
        z = self._step_noise(step_noise, seeds, x.shape)
        if self.mode == "loop":
            out = self._run_once({"noise": x, "labels": lab, "g1": g1, **({} if z is None else {"z": z})})
        elif self.io_binding:
            out = self._steps_io_binding(x, lab, g1, z)
        else:
            for i in range(self.steps):
                x = self._run_once(self._step_feeds(x, i, lab, g1, None if z is None else z[i]))
            out = x
        self._check_finite(out)
        return torch.from_numpy(out) if isinstance(noise, torch.Tensor) else out

    def step(self, x, step: int, labels, *, scale=None, z=None):
        """One guided step of a mode="step" graph: x_next from x [B, C, H, W] at step index ``step``."""
        if self.mode != "step":
            raise ValueError(f"step: this graph was exported with mode={self.mode!r}; use sample() or export "
                             "mode='step'")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.steps:
            raise ValueError(f"step: expected a step index 0..{self.steps - 1}, got {step!r}")
        xa = self._float_input("x", x, (None, *self.latent_shape))
        lab, g1 = self._labels(labels, xa.shape[0]), self._g1(scale, xa.shape[0])
        if self.stochastic and z is None:
            raise ValueError("z: this solver is stochastic; pass its step noise z [B, C, H, W] float32")
        za = None if z is None else self._float_input("z", z, xa.shape)
        if za is not None and not self.stochastic:
            raise ValueError("z: this solver is deterministic; the graph has no z input")
        out = self._run_once(self._step_feeds(xa, int(step), lab, g1, za))
        return torch.from_numpy(out) if isinstance(x, torch.Tensor) else out

    def __repr__(self):
        return (f"OnnxSampler({str(self.path)!r}, mode={self.mode!r}, steps={self.steps}, "
                f"guidance={self.meta['guidance']}, provider={self.provider!r})")

    # ------------------------------------------------------------------ running
    def _step_feeds(self, x, i: int, labels, g1, z) -> dict:
        feeds = {"x": x, "step": np.array(i, dtype=np.int64), "labels": labels, "g1": g1}
        if z is not None:
            feeds["z"] = z
        return feeds

    def _run_once(self, feeds: dict) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([self.output], feeds)[0]
        io = self.session.io_binding()
        for name, value in feeds.items():
            io.bind_cpu_input(name, value)
        io.bind_output(self.output, self.device_type, self.device_id)
        self.session.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]

    def _steps_io_binding(self, x, labels, g1, z) -> np.ndarray:
        """The step loop on the device: inputs copied once, x ping-pongs between two device buffers."""
        ort = _import_ort()

        def on_device(a):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device_type, self.device_id)

        io = self.session.io_binding()
        io.bind_ortvalue_input("labels", on_device(labels))
        io.bind_ortvalue_input("g1", on_device(g1))
        step_ids = [on_device(np.array(i, dtype=np.int64)) for i in range(self.steps)]
        zs = None if z is None else [on_device(z[i]) for i in range(self.steps)]
        cur, nxt = (ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float32, self.device_type,
                                                              self.device_id) for _ in range(2))
        cur.update_inplace(x)  # copies; (a CPU OrtValue made from numpy would wrap, and then overwrite, the noise)
        for i in range(self.steps):
            io.bind_ortvalue_input("x", cur)
            io.bind_ortvalue_input("step", step_ids[i])
            if zs is not None:
                io.bind_ortvalue_input("z", zs[i])
            io.bind_ortvalue_output(self.output, nxt)
            self.session.run_with_iobinding(io)
            cur, nxt = nxt, cur
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

    def _float_input(self, name: str, value, shape) -> np.ndarray:
        a = self._as_array(name, value)
        if a.dtype != np.float32:
            raise TypeError(f"{name}: the ONNX graph takes float32, got {a.dtype}; cast it first "
                            f"({name}.float() for a torch tensor, {name}.astype(np.float32) for numpy)")
        if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            want = ", ".join("B" if s is None else str(s) for s in shape)
            raise ValueError(f"{name}: expected shape [{want}], got {list(a.shape)}")
        if a.shape[0] < 1:
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
        s = _check_scale(scale)
        if isinstance(s, float):
            return np.full(batch, s, dtype=np.float32)
        if s.numel() != batch:
            raise ValueError(f"scale: expected {batch} per-sample values (the batch), got {s.numel()}")
        return s.numpy().astype(np.float32)

    def _step_noise(self, step_noise, seeds, x_shape) -> np.ndarray | None:
        from fastguide.sampler import _check_seeds, _step_noise

        if not self.stochastic:
            if step_noise is not None:
                raise ValueError("step_noise: this solver is deterministic; the graph has no z input")
            if seeds is not None:
                _check_seeds(seeds, x_shape[0])
            return None
        if step_noise is not None:
            return self._float_input("step_noise", step_noise, (self.steps, *x_shape))
        if seeds is not None:
            z = _step_noise(_check_seeds(seeds, x_shape[0]), self.steps, x_shape[1:], torch.float32, "cpu")
        else:
            z = torch.randn((self.steps, *x_shape), dtype=torch.float32)
        return z.numpy()

    def _check_finite(self, out: np.ndarray) -> None:
        if self.check_finite and not np.isfinite(out).all():
            raise ValueError("model: the ONNX sample contains NaN/inf; the sample is not valid")
