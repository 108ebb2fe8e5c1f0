"""Export of a guided sampler's step (or whole fixed-NFE loop) as one ONNX graph (see fastguide.onnx)."""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastguide.checks import check_model_output
from fastguide.conditions import paired_conditions
from fastguide.guidance import CFG, ReCFG
from fastguide.kernels import reference
from fastguide.onnx.metadata import FORMAT, HISTORY_INPUT, HISTORY_OUTPUT, proto_metadata, set_metadata

MODES = ("step", "loop")
# torch's dynamo exporter writes opset 18 natively; asking it for 17 runs onnx's version converter, which emits
# Split with opset 18's num_outputs attribute (an invalid graph). Attention exports as MatMul/Softmax.
MIN_OPSET = 18
DEFAULT_OPSET = 18


class GuidedGraph(nn.Module):
    """The constants of one exported sampler (plan, table, rows) and one guided step over them."""

    def __init__(self, model, plan, guidance, null_cond: int, cond_first: bool, latent_shape):
        super().__init__()
        self.latent_shape = tuple(latent_shape)
        self.model = model  # a plain callable is kept as an attribute; torch.export lifts its tensors as constants
        unit = copy.copy(guidance)
        unit.scale = 2.0  # g1 is a graph input; prepare() gives the interval's guided steps (any scale != 1) and rows
        sg = unit.prepare(plan, torch.zeros(1, dtype=torch.int64), latent_shape)
        self.register_buffer("t", plan.timesteps.to(torch.float32))  # the Sampler feeds float32 model time too
        self.register_buffer("coef", plan.coef.to(torch.float32))
        self.register_buffer("guided", torch.tensor(sg.guided, dtype=torch.bool))
        self.guided_steps = tuple(bool(g) for g in sg.guided)
        self.null_cond, self.cond_first, self.clip_range = int(null_cond), bool(cond_first), plan.clip_range
        self.mean_row = None
        self.history_slots, self.init_scale = plan.history_slots, float(plan.init_scale)
        if plan.history is not None:
            # per step: the slots' weights in x_next [S, K], what the W writes hold [S, W, 2 + K], and for each slot
            # whether this step writes it [S, K] and which write it takes [S, K] (0 where unwritten): the writes are
            # a Gather of the W new states and a Where, without data-dependent control flow in the graph
            h = plan.history
            self.register_buffer("hist_w", h.weights.to(torch.float32))
            self.register_buffer("write_coef", h.write_coef.to(torch.float32))
            written, source = _write_masks(h.write_slots, self.history_slots)
            self.register_buffer("written", written)
            self.register_buffer("write_source", source)
        if sg.table is not None:
            self.register_buffer("table", sg.table.detach().to(torch.float32).contiguous())
            self.register_buffer("table_steps", sg.table_steps.to(torch.int64))
            self.register_buffer("table_w", sg.table_w.to(torch.float32))
            if guidance.unknown_label == "mean":
                self.mean_row = guidance.table.num_classes
        else:
            self.table = None

    def rows(self, labels: torch.Tensor) -> torch.Tensor:
        if self.mean_row is None:
            return labels
        return torch.where((labels < 0) | (labels >= self.mean_row), torch.full_like(labels, self.mean_row), labels)

    def step(self, x, i, labels, g1, z, history=None, rows: dict | None = None):
        """x_next for step ``i`` (a 0-d int64 tensor); ``g1`` is already this step's scale. With ``history``
        (a multistep plan's K slots [K, B, *shape]): (x_next, the slots after this step's writes), as
        :func:`fastguide.kernels.reference.guided_step_into` computes them. ``rows``: per-row plans (graph inputs
        [S, B, ...] by ROW_INPUTS name) in place of the exported plan's per-step values."""
        batch, x2 = x.shape[0], torch.cat([x, x])
        plan = {"t": self.t[i].expand(batch), "coef": self.coef[i]}
        if self.table is not None:
            plan.update(table_steps=self.table_steps[i], table_w=self.table_w[i])
        if history is not None:
            plan.update(hist_w=self.hist_w[i], write_coef=self.write_coef[i])
        if rows is not None:
            plan.update({name: value[i] for name, value in rows.items()})
        out = self.model(x2, torch.cat([plan["t"], plan["t"]]),
                         paired_conditions(labels, self.null_cond, self.cond_first))
        check_model_output(out, x2)
        m_cond, m_uncond = reference.split_model_output(out, batch, self.cond_first)
        with_table = self.table is not None
        guide = dict(table=self.table if with_table else None, rows=self.rows(labels) if with_table else None,
                     table_steps=plan.get("table_steps"), table_w=plan.get("table_w"))
        if history is None:
            return reference.guided_step(x, m_cond, m_uncond, g1, plan["coef"], **guide, clip_range=self.clip_range,
                                         z=z)
        dt = reference.compute_dtype_for(x.dtype)
        m = reference.guided_output(m_cond, m_uncond, g1, **guide, dt=dt)
        xf = x.to(dt)
        x_next = reference.solver_update(xf, m, plan["coef"], clip_range=self.clip_range, z=z, history=history,
                                         hist_coef=plan["hist_w"])
        states = reference.history_writes(xf, m, history, plan["write_coef"])  # [W, B, ...], from the old slots
        written = self.written[i].view(-1, *([1] * x.ndim))
        history_next = torch.where(written, states[self.write_source[i]].to(history.dtype), history)
        return x_next.to(x.dtype), history_next


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


class HistoryStepModule(StepModule):
    """ONNX step graph of a multistep plan: (x, step, labels, g1, history[, z]) -> (x_next, history_next)."""

    def forward(self, x, step, labels, g1, history, z=None):
        g = self.core
        if not all(g.guided_steps):
            g1 = torch.where(g.guided[step], g1, torch.ones_like(g1))
        return g.step(x, step, labels, g1, z, history)


class RowStepModule(nn.Module):
    """ONNX step graph of per-row plans: (x, step, labels, g1 [S, B], row_t, row_coef[, row_table_steps,
    row_table_w][, history, row_hist_w, row_write_coef][, z]) -> x_next (, history_next). The plans' per-step
    values are inputs [S, B, ...] (fastguide.row_plans.RowPlans), so one graph serves every mix of step counts."""

    def __init__(self, graph: GuidedGraph):
        super().__init__()
        self.core = graph

    def forward(self, x, step, labels, g1, *rest):
        g = self.core
        names = row_input_names(g.table is not None, g.history_slots > 0)
        rows = dict(zip((n.removeprefix("row_") for n in names), rest))
        history = rows.pop("history", None)
        z = rest[len(names)] if len(rest) > len(names) else None
        return g.step(x, step, labels, g1[step], z, history, rows=rows)


def row_input_names(table: bool, history: bool) -> list[str]:
    """The per-row plan inputs of a per_row graph, in order (``history`` among them: the slots themselves)."""
    names = ["row_t", "row_coef"]
    if table:
        names += ["row_table_steps", "row_table_w"]
    if history:
        names += [HISTORY_INPUT, "row_hist_w", "row_write_coef"]
    return names


def export(sampler, path, latent_shape=None, *, mode: str = "step", batch: int = 2, opset: int = DEFAULT_OPSET,
           dynamic_batch: bool = True, external_data: bool = False, per_row: bool = False) -> Path:
    """Write ``sampler``'s guided step (mode="step") or whole fixed-NFE loop (mode="loop") as ONNX to ``path``.

    ``latent_shape`` (C, H, W) defaults to the ReCFG table's. ``batch`` is the batch traced with (the batch
    axis stays dynamic unless ``dynamic_batch=False``). The loop graph is the step graph as the body of an
    ONNX Loop over the S steps (see :func:`step_to_loop`). Uses ``torch.onnx.export(dynamo=True)``; needs
    the ``onnx`` and ``onnxscript`` packages. Returns the path.

    ``per_row``: the graph takes each row's plan as inputs ([S, B, ...]: ``OnnxSampler.sample(solvers=...)``
    stacks them), so requests with different step counts of the sampler's solver family share one graph of the
    sampler's S steps; its g1 input is [S, B] (each row's scale at each of its steps).
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
    if per_row and isinstance(sampler.guidance, ReCFG) and sampler.guidance.table.timesteps is None:
        raise ValueError("per_row: this ReCFG table is indexed by sampler step, so it serves only its own step count; "
                         "export per-row plans with a table on a timestep grid (RatioTable(..., timesteps=...))")
    graph = _graph_for(sampler, _check_latent_shape(latent_shape, sampler.guidance))
    trace_batch = max(batch, 2) if dynamic_batch else batch  # torch.export specializes a batch of 1
    module, args, names, dyn = _step_module_and_inputs(graph, trace_batch, sampler.solver.plan.stochastic,
                                                       dynamic_batch, bool(per_row))
    outputs = ["x_next"] + ([HISTORY_OUTPUT] if graph.history_slots else [])
    device = _model_device(sampler.model)
    module, args = module.to(device), tuple(a.to(device) for a in args)  # traced where the weights are
    with torch.no_grad(), warnings.catch_warnings(), _quiet_logger("torch.onnx"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, None, input_names=names, output_names=outputs, dynamo=True,
                                    opset_version=opset, dynamic_shapes=dyn, verbose=False)
    proto = program.model_proto
    set_metadata(proto, {**_metadata(sampler, graph, opset, bool(per_row)), "inputs": names})
    if mode == "loop":
        proto = _loop_model(proto)
    _save(proto, path, external_data)
    return path


def step_to_loop(step_path, loop_path, *, external_data: bool = False) -> Path:
    """Turn a mode="step" graph into the mode="loop" graph (no re-tracing): noise, labels, g1 (, z [S, B, ...])
    -> sample, the step graph as the body of an ONNX Loop whose iteration number is the step index (a multistep
    plan's history slots carried in the Loop's state)."""
    import onnx

    step_path, loop_path = Path(step_path), _check_out_path(loop_path)
    if not step_path.is_file():
        raise FileNotFoundError(f"step_path: ONNX file {step_path} not found")
    proto = onnx.load(str(step_path))
    if proto_metadata(proto)["mode"] != "step":
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
    if not guidance.traceable:
        raise ValueError(f"guidance: {type(guidance).__name__} cannot be exported to ONNX: each step needs autograd "
                         "(the gradient of the classifier's log-probability with respect to x_t), which an ONNX "
                         "inference graph does not have; export CFG or ReCFG, or sample it with fastguide.Sampler")
    if type(guidance) not in (CFG, ReCFG):
        raise ValueError(f"guidance: only CFG and ReCFG can be exported to ONNX, got {type(guidance).__name__}")
    options = [name for name, on in (("rescale", guidance.rescale != 0), ("schedule", guidance.schedule is not None),
                                     ("guide", guidance.guide is not None)) if on]
    if options:
        raise ValueError(f"guidance: {type(guidance).__name__} with {', '.join(options)} cannot be exported to ONNX "
                         "(the exported graph takes one scale per sample and runs one network with CFG / ReCFG's "
                         "element-wise rule); sample it with fastguide.Sampler")
    _check_plan(sampler.solver)
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


def _check_plan(solver) -> None:
    """What the graph needs of a plan: a finite init_scale > 0 (x_T = init_scale * noise) and, for the history
    writes (a Gather and a Where per step), consistent shapes and each step's write slots in range and distinct
    (torch's index_copy_ is not defined for a slot written twice either)."""
    plan, name = solver.plan, type(solver).__name__
    if not np.isfinite(float(plan.init_scale)) or not float(plan.init_scale) > 0:
        raise ValueError(f"solver: {name}'s plan starts from init_scale={plan.init_scale!r} x the noise; expected a "
                         "finite float > 0")
    h = plan.history
    if h is None:
        return
    k, steps = h.slots, plan.steps
    slots = h.write_slots
    if (tuple(h.weights.shape) != (steps, k) or slots.ndim != 2 or slots.shape[0] != steps
            or tuple(h.write_coef.shape) != (steps, slots.shape[1], 2 + k)):
        raise ValueError(f"solver: {name}'s history has inconsistent shapes (weights {list(h.weights.shape)}, "
                         f"write_slots {list(slots.shape)}, write_coef {list(h.write_coef.shape)}; expected [S, K], "
                         "[S, W], [S, W, 2 + K])")
    for i, row in enumerate(slots.tolist()):
        if any(not 0 <= j < k for j in row) or len(set(row)) != len(row):
            raise ValueError(f"solver: {name}'s history step {i} writes slots {row}; each step must write distinct "
                             f"slots in 0..{k - 1} (a slot written twice in one step has no defined value)")


def _write_masks(write_slots: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, K] bool: step i writes slot k; [S, K] int64: which of its W writes (0 where it writes none)."""
    steps = write_slots.shape[0]
    written = torch.zeros(steps, slots, dtype=torch.bool)
    source = torch.zeros(steps, slots, dtype=torch.int64)
    for i, row in enumerate(write_slots.tolist()):
        for w, k in enumerate(row):
            written[i, k], source[i, k] = True, w
    return written, source


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


def _step_module_and_inputs(graph: GuidedGraph, batch: int, stochastic: bool, dynamic_batch: bool,
                            per_row: bool = False):
    gen = torch.Generator().manual_seed(0)
    shape = (batch, *graph.latent_shape)
    args = [torch.randn(shape, generator=gen), torch.tensor(0, dtype=torch.int64),
            torch.zeros(batch, dtype=torch.int64), torch.full((batch,), 2.0)]
    names = ["x", "step", "labels", "g1"]
    module = StepModule(graph)
    if per_row:
        return _row_step_module_and_inputs(graph, args, names, shape, stochastic, dynamic_batch, gen)
    if graph.history_slots:
        args.append(torch.randn((graph.history_slots, *shape), generator=gen))
        names.append(HISTORY_INPUT)
        module = HistoryStepModule(graph)
    if stochastic:
        args.append(torch.randn(shape, generator=gen))
        names.append("z")
    if not dynamic_batch:
        return module.eval(), tuple(args), names, None
    batch_dim = torch.export.Dim("batch", min=1)
    dyn = {n: None if n == "step" else {1 if n == HISTORY_INPUT else 0: batch_dim} for n in names}  # history: [K, B]
    return module.eval(), tuple(args), names, dyn


def _row_step_module_and_inputs(graph: GuidedGraph, args, names, shape, stochastic, dynamic_batch, gen):
    """The per-row step graph's trace inputs: the exported plan's values repeated for every row."""
    steps, batch = graph.t.shape[0], shape[0]

    def per_row(v):  # [S, ...] -> [S, B, ...]
        return v.unsqueeze(1).expand(steps, batch, *v.shape[1:]).contiguous()

    args[3] = torch.full((steps, batch), 2.0)
    values = {"row_t": per_row(graph.t), "row_coef": per_row(graph.coef)}
    if graph.table is not None:
        values.update(row_table_steps=per_row(graph.table_steps), row_table_w=per_row(graph.table_w))
    if graph.history_slots:
        values.update({HISTORY_INPUT: torch.randn((graph.history_slots, *shape), generator=gen),
                       "row_hist_w": per_row(graph.hist_w), "row_write_coef": per_row(graph.write_coef)})
    row_names = row_input_names(graph.table is not None, graph.history_slots > 0)
    args += [values[n] for n in row_names]
    names += row_names
    if stochastic:
        args.append(torch.randn(shape, generator=gen))
        names.append("z")
    module = RowStepModule(graph).eval()
    if not dynamic_batch:
        return module, tuple(args), names, None
    batch_dim = torch.export.Dim("batch", min=1)
    axis = {"x": 0, "labels": 0, "z": 0, "step": None}
    spec = [None if axis.get(n, 1) is None else {axis.get(n, 1): batch_dim} for n in names]  # [S, B, ...]: 1
    dyn = {"x": spec[0], "step": None, "labels": spec[2], "g1": spec[3], "rest": tuple(spec[4:])}  # (*rest)
    return module, tuple(args), names, dyn


def _metadata(sampler, graph: GuidedGraph, opset: int, per_row: bool = False) -> dict:
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
        "history_slots": graph.history_slots, "init_scale": graph.init_scale,
        "per_row": per_row, "kind": plan.kind, "interval": None if guidance.interval is None else list(guidance.interval),
        "write_slots": None if plan.history is None else plan.history.write_slots.tolist(),
        "table_timesteps": None if table is None or table.timesteps is None else table.timesteps.tolist(),
        "out_of_range": None if table is None else guidance.out_of_range,
    }


def _loop_model(step):
    """The loop graph around a step graph: Loop(M = S) whose body is the step graph, with the iteration number as
    the step index, x carried, labels / g1 read from the outer scope and z gathered per step from z [S, B, ...].
    The first state is init_scale * noise; a multistep plan's K history slots [K, B, ...] are carried too, zero
    at the start (files without the history keys are one-step graphs: K = 0, init_scale = 1)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    meta = proto_metadata(step)
    slots, init_scale = int(meta.get("history_slots", 0)), float(meta.get("init_scale", 1.0))
    g = step.graph
    inputs = {v.name: v for v in g.input}
    outputs = {v.name: v for v in g.output}
    body_nodes = [helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    if "z" in inputs:  # the body reads this step's slice of the outer z [S, B, ...]
        body_nodes.append(helper.make_node("Gather", ["z", "step"], ["z_step"], axis=0))
    for node in g.node:
        node = _copy(node, onnx.NodeProto())
        node.input[:] = ["z_step" if n == "z" else n for n in node.input]
        body_nodes.append(node)
    carried_in, carried_out = [inputs["x"]], [outputs["x_next"]]
    if slots:
        carried_in.append(inputs[HISTORY_INPUT])
        carried_out.append(outputs[HISTORY_OUTPUT])
    body = helper.make_graph(
        body_nodes, "guided_step",
        [helper.make_tensor_value_info("step", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), *carried_in],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), *carried_out],
        value_info=g.value_info)
    outer_inputs = [_renamed(inputs["x"], "noise"), inputs["labels"], inputs["g1"]]
    per_row = bool(meta.get("per_row"))
    if per_row:  # the rows' plans [S, B, ...], read by the body from the outer scope like labels and g1
        outer_inputs += [inputs[n] for n in row_input_names("row_table_steps" in inputs, bool(slots))
                         if n != HISTORY_INPUT]
    if "z" in inputs:
        z = _copy(inputs["z"], onnx.ValueInfoProto())
        z.type.tensor_type.shape.dim.insert(0, onnx.TensorShapeProto.Dimension(dim_value=int(meta["steps"])))
        outer_inputs.append(z)
    inits = [numpy_helper.from_array(np.array(meta["steps"], dtype=np.int64), "loop_steps"),
             numpy_helper.from_array(np.array(True), "loop_true")]
    nodes, first = [], "noise"
    if per_row:  # each row's x_T = init_scale[b] * noise[b]: init_scale [B, 1, 1, 1]
        dims = inputs["x"].type.tensor_type.shape.dim
        batch = dims[0].dim_param or dims[0].dim_value
        outer_inputs.append(helper.make_tensor_value_info("init_scale", TensorProto.FLOAT,
                                                          [batch] + [1] * (len(dims) - 1)))
        nodes.append(helper.make_node("Mul", ["noise", "init_scale"], ["loop_x_first"]))
        first = "loop_x_first"
    elif init_scale != 1.0:  # x_T = init_scale * noise, in float32 as the torch sampler's x * init_scale
        inits.append(numpy_helper.from_array(np.array(init_scale, dtype=np.float32), "loop_init_scale"))
        nodes.append(helper.make_node("Mul", ["noise", "loop_init_scale"], ["loop_x_first"]))
        first = "loop_x_first"
    loop_inputs, loop_outputs = ["loop_steps", "loop_true", first], ["sample"]
    if slots:  # zeros [K, B, C, H, W]: the batch from the noise's shape, so it stays dynamic
        inits.append(numpy_helper.from_array(np.array([slots], dtype=np.int64), "loop_history_slots"))
        nodes += [helper.make_node("Shape", ["noise"], ["loop_noise_shape"]),
                  helper.make_node("Concat", ["loop_history_slots", "loop_noise_shape"], ["loop_history_shape"],
                                   axis=0),
                  helper.make_node("ConstantOfShape", ["loop_history_shape"], ["loop_history_first"],
                                   value=numpy_helper.from_array(np.zeros(1, dtype=np.float32)))]
        loop_inputs.append("loop_history_first")
        loop_outputs.append("loop_history_last")
    nodes.append(helper.make_node("Loop", loop_inputs, loop_outputs, body=body))
    graph = helper.make_graph(nodes, "guided_loop", outer_inputs, [_renamed(outputs["x_next"], "sample")],
                              initializer=list(g.initializer) + inits)
    model = helper.make_model(graph, opset_imports=step.opset_import, ir_version=step.ir_version,
                              producer_name="fastguide", functions=step.functions)
    names = [v.name for v in outer_inputs]
    set_metadata(model, {**meta, "mode": "loop", "output": "sample", "inputs": names})
    return model


def _copy(proto, into):
    into.CopyFrom(proto)
    return into


def _renamed(value_info, name: str):
    import onnx

    v = _copy(value_info, onnx.ValueInfoProto())
    v.name = name
    return v
