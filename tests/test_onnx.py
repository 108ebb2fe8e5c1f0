"""ONNX export (fastguide.onnx): the onnxruntime sample equals the torch Sampler's sample, same noise, fp32.

Graphs are exported once per module (export traces for seconds). The digits UNet is randomly initialised with a
fixed seed and a random (not zero) output layer, and sampled as a v-prediction model so that samples stay O(1)
(an untrained epsilon model sends DDIM's x0 = (x - sqrt(1-a) eps) / sqrt(a) to ~100s, where fp32 cannot resolve
1e-4); the stochastic DDPM case uses the epsilon prediction with x0 clipping instead. The shipped (trained)
model and tables are tested too, also against the float64 torch sample. The multistep solvers (history slots in
the graph's state) and the sigma-space Euler solvers (x_T = init_scale * noise) are tested with a tiny
convolutional model, whose export is quicker.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fastguide as fg
from fastguide import cli
from fastguide.kernels import reference
from fastguide.kernels.reference import NUM_COEF
from fastguide.demo.digits import IMAGE_SHAPE, NULL_LABEL, digits_schedule
from fastguide.demo.unet import DigitsUNet
from fastguide.onnx import CPU, CUDA, MIN_OPSET, OnnxSampler, export, read_metadata, step_to_loop

ATOL = 1e-4
STEPS = 10


def digits_model() -> DigitsUNet:
    torch.manual_seed(0)
    model = DigitsUNet()
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)  # the class zero-inits it: outputs would not depend on x
    torch.nn.init.normal_(model.conv_out.bias, std=0.05)
    return model.eval().requires_grad_(False)


def ratio_table(classes: int = NULL_LABEL, shape=IMAGE_SHAPE) -> fg.RatioTable:
    """Random ratios near 1 on a coarse grid (most sampler steps lerp between two table rows), + the mean row."""
    gen = torch.Generator().manual_seed(7 + classes)
    ratios = 1 + 0.2 * torch.randn(classes + 1, 12, *shape, generator=gen, dtype=torch.float64)
    return fg.RatioTable(ratios, timesteps=np.linspace(0, 999, 12))


def v_solver(steps=STEPS):
    return fg.DDIM(digits_schedule(), steps=steps, prediction_type="v_prediction")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Samplers and their exported graphs: {name: (sampler, {mode: path})}."""
    d = tmp_path_factory.mktemp("onnx")
    model = digits_model()
    table = ratio_table()
    samplers = {
        "cfg": fg.Sampler(model, v_solver(), fg.CFG(3.0), null_cond=NULL_LABEL, progress=False),
        "recfg": fg.Sampler(model, v_solver(), fg.ReCFG(3.0, table=table), null_cond=NULL_LABEL, progress=False),
        "ddpm": fg.Sampler(model, fg.DDPM(digits_schedule(), steps=6, clip_sample=True),
                           fg.ReCFG(2.0, table=ratio_table(6), interval=(300, 800), unknown_label="mean"),
                           null_cond=NULL_LABEL, progress=False),
    }
    out = {}
    for name, sampler in samplers.items():
        paths = {"step": export(sampler, d / f"{name}_step.onnx", IMAGE_SHAPE, mode="step")}
        if name == "cfg":  # the loop through export() itself; the others through step_to_loop (no re-trace)
            paths["loop"] = export(sampler, d / f"{name}_loop.onnx", IMAGE_SHAPE, mode="loop")
        else:
            paths["loop"] = step_to_loop(paths["step"], d / f"{name}_loop.onnx")
        out[name] = (sampler, paths)
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def dit_built(tmp_path_factory):
    from fastguide.bench.end_to_end import tiny_dit

    net, shape = tiny_dit()
    solver = fg.DDIM(fg.NoiseSchedule.linear(), steps=4, prediction_type="v_prediction")
    sampler = fg.Sampler(net, solver, fg.CFG(2.5), null_cond=net.null_label, progress=False)
    d = tmp_path_factory.mktemp("onnx_dit")
    step = export(sampler, d / "dit_step.onnx", shape, opset=MIN_OPSET)
    return sampler, shape, {"step": step, "loop": step_to_loop(step, d / "dit_loop.onnx")}


def torch_sample(sampler, noise, labels, **kw):
    with torch.no_grad():
        return sampler.sample(noise, labels, **kw)


def close(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= ATOL, f"max |onnx - torch| = {err:.3g} > {ATOL}"
    return err


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", ["step", "loop"])
@pytest.mark.parametrize("rule", ["cfg", "recfg"])
@pytest.mark.parametrize("batch", [1, 7])
def test_digits_sample_matches_torch(built, rule, mode, batch):
    sampler, paths = built[rule]
    noise = torch.randn(batch, *IMAGE_SHAPE)
    labels = torch.randint(0, 10, (batch,))
    want = torch_sample(sampler, noise, labels)
    assert float(want.abs().max()) > 0.5  # a non-trivial sample, O(1)
    close(OnnxSampler(paths[mode]).sample(noise, labels), want)


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_per_sample_scale_and_numpy_io(built, mode):
    sampler, paths = built["recfg"]
    noise = torch.randn(5, *IMAGE_SHAPE)
    labels = torch.tensor([3, 1, 4, 1, 5])
    scale = torch.tensor([0.0, 1.0, 2.5, 4.0, 7.0])
    want = torch_sample(sampler, noise, labels, scale=scale)
    got = OnnxSampler(paths[mode]).sample(noise.numpy(), labels.numpy(), scale=scale.numpy())
    assert isinstance(got, np.ndarray)
    close(torch.from_numpy(got), want)


def test_comparison_is_sensitive(built):
    """The parity tolerance is far below what the guidance changes: ReCFG != CFG, and the scale matters."""
    onnx_recfg = OnnxSampler(built["recfg"][1]["step"])
    noise, labels = torch.randn(4, *IMAGE_SHAPE), torch.tensor([0, 2, 9, 5])
    got = onnx_recfg.sample(noise, labels)
    assert float((got - torch_sample(built["cfg"][0], noise, labels)).abs().max()) > 100 * ATOL
    assert float((got - onnx_recfg.sample(noise, labels, scale=3.5)).abs().max()) > 100 * ATOL


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_stochastic_interval_matches_torch(built, mode):
    """DDPM (z input), x0 clipping, epsilon prediction, ReCFG only inside a guidance interval, and labels 7, 9
    outside its 6-class table going to the mean row (unknown_label="mean")."""
    sampler, paths = built["ddpm"]
    assert read_metadata(paths[mode])["guided_steps"] == [False, False, True, True, True, False]
    noise = torch.randn(3, *IMAGE_SHAPE)
    labels = torch.tensor([7, 0, 9])
    seeds = [11, 12, 13]
    onnx_sampler = OnnxSampler(paths[mode])
    want = torch_sample(sampler, noise, labels, seeds=seeds)
    close(onnx_sampler.sample(noise, labels, seeds=seeds), want)
    # the same per-step noise passed explicitly; other noise gives another sample
    from fastguide.noise import step_noise

    z = step_noise(seeds, 6, IMAGE_SHAPE, torch.float32, "cpu")
    close(onnx_sampler.sample(noise, labels, step_noise=z), want)
    assert float((onnx_sampler.sample(noise, labels, step_noise=torch.randn_like(z)) - want).abs().max()) > 1e-2


def test_one_step_matches_reference(built):
    """OnnxSampler.step against the specification: the model's 2B forward + reference.guided_step."""
    sampler, paths = built["recfg"]
    plan, table = sampler.solver.plan, sampler.guidance.table
    x = torch.randn(6, *IMAGE_SHAPE)
    labels = torch.tensor([9, 8, 0, 1, 5, 5])
    g1 = torch.tensor([3.0, 1.0, 0.0, 2.0, 5.0, 3.0])
    i = 4
    steps, w = table.step_rows(plan.timesteps)
    with torch.no_grad():
        out = sampler.model(torch.cat([x, x]), torch.full((12,), float(plan.timesteps[i])),
                            torch.cat([labels, torch.full((6,), NULL_LABEL)]))
    want = reference.guided_step(x.double(), out[:6].double(), out[6:].double(), g1.double(), plan.coef[i],
                                 table=table.ratios, rows=labels, table_steps=steps[i], table_w=w[i])
    assert 0 < float(w[i]) < 1  # a lerp between two table rows
    got = OnnxSampler(paths["step"]).step(x, i, labels, scale=g1)
    assert float((got.double() - want).abs().max()) <= ATOL


# ---------------------------------------------------------------------- multistep and sigma-space solvers
TINY_SHAPE, TINY_NULL, MS_STEPS = (2, 4, 4), 6, 7


class TinyNet(torch.nn.Module):
    """A conditional v-model small enough to export quickly: tanh(conv(x) + emb[label] / 2 + sin(t w / 333))."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(TINY_SHAPE[0], TINY_SHAPE[0], 3, padding=1)
        self.emb = torch.nn.Embedding(TINY_NULL + 1, int(np.prod(TINY_SHAPE)))
        self.t_w = torch.nn.Parameter(torch.randn(*TINY_SHAPE))

    def forward(self, x, t, labels):
        h = self.conv(x) + self.emb(labels).view(-1, *TINY_SHAPE) / 2
        return torch.tanh(h + torch.sin(t.view(-1, 1, 1, 1) / 333 * self.t_w))


def _multistep_solvers():
    sch, v = digits_schedule(), "v_prediction"
    return {
        "dpm++2": lambda: fg.DPMSolver(sch, MS_STEPS, order=2, prediction_type=v),
        "dpm3-sigma-min": lambda: fg.DPMSolver(sch, MS_STEPS, order=3, algorithm_type="dpmsolver",
                                               final_sigmas_type="sigma_min", prediction_type=v),
        "sde-dpm++2m": lambda: fg.DPMSolver(sch, MS_STEPS, algorithm_type="sde-dpmsolver++", prediction_type=v),
        "unipc2-bh2": lambda: fg.UniPC(sch, MS_STEPS, order=2, solver_type="bh2", prediction_type=v),
        "unipc3-bh1": lambda: fg.UniPC(sch, MS_STEPS, order=3, solver_type="bh1", prediction_type=v),
        # a Karras grid from sigma 3 (fractional model times; x_T = 0.95 noise, so init_scale matters)
        "euler-karras": lambda: fg.Euler(sch, MS_STEPS, sigma_schedule="karras", sigma_max=3.0, prediction_type=v),
        "euler-ancestral": lambda: fg.Euler(sch, MS_STEPS, ancestral=True, prediction_type=v),
        # two evaluations per interval through one slot, with the x0 clamp (the clip form plus history)
        "heun-clip": lambda: fg.Heun(sch, 4, prediction_type=v, clip_sample_range=1.0),
        "plms": lambda: fg.PLMS(sch, MS_STEPS - 1, prediction_type=v),
        # model time sigma, churn noise added by the evaluation before each interval
        "edm-heun-churn": lambda: fg.EDM(4, sigma_max=5.0, s_churn=4.0, s_tmax=4.0),
    }


MULTISTEP = list(_multistep_solvers())


@pytest.fixture(scope="module")
def ms_graphs(tmp_path_factory):
    """ms_graphs(solver, rule) -> (sampler, {mode: path}); each pair exported once per module, on first use."""
    d = tmp_path_factory.mktemp("onnx_multistep")
    model, solvers, cache = TinyNet().eval().requires_grad_(False), _multistep_solvers(), {}

    def get(name: str, rule: str):
        if (name, rule) not in cache:
            # the stochastic plans' ReCFG guides inside an interval only (g1 = 1 in the graph elsewhere)
            interval = {"sde-dpm++2m": (300, 800), "euler-ancestral": (300, 800), "edm-heun-churn": (0.1, 3.0)}.get(name)
            guide = fg.CFG(2.5) if rule == "cfg" else fg.ReCFG(2.5, table=ratio_table(TINY_NULL, TINY_SHAPE),
                                                                interval=interval)
            sampler = fg.Sampler(model, solvers[name](), guide, null_cond=TINY_NULL, backend="torch", progress=False)
            step = export(sampler, d / f"{name}_{rule}_step.onnx", TINY_SHAPE)
            cache[name, rule] = (sampler, {"step": step, "loop": step_to_loop(step, d / f"{name}_{rule}_loop.onnx")})
        return cache[name, rule]

    return get


def ms_inputs(batch: int = 3):
    gen = torch.Generator().manual_seed(batch)
    return (torch.randn(batch, *TINY_SHAPE, generator=gen), torch.randint(0, TINY_NULL, (batch,), generator=gen),
            list(range(40, 40 + batch)))


@pytest.mark.parametrize("mode", ["step", "loop", "io_binding"])
@pytest.mark.parametrize("rule", ["cfg", "recfg"])
@pytest.mark.parametrize("name", MULTISTEP)
def test_every_solver_matches_torch(ms_graphs, name, rule, mode):
    """DPM-Solver(++) orders 2 and 3, SDE-DPM-Solver++ 2M, UniPC bh1 / bh2 orders 2 and 3, Euler on a Karras grid
    and Euler-ancestral, with CFG and ReCFG (a lerped table; for the two stochastic plans inside a guidance
    interval): the step graph (history fed back by OnnxSampler,
    also through IO binding) and the loop graph (history in the Loop's state) give the torch sample. Batch 3,
    not the traced 2: the history's batch axis is dynamic too."""
    sampler, paths = ms_graphs(name, rule)
    plan = sampler.solver.plan
    meta = read_metadata(paths["loop" if mode == "loop" else "step"])
    assert meta["history_slots"] == plan.history_slots and meta["init_scale"] == plan.init_scale
    assert (plan.history is not None) == name.startswith(("dpm", "sde", "unipc", "heun", "plms", "edm"))
    assert (plan.init_scale != 1) == name.startswith(("euler", "heun", "edm"))
    if rule == "recfg" and plan.stochastic:
        assert 0 < sum(meta["guided_steps"]) < plan.steps
    noise, labels, seeds = ms_inputs()
    kw = {"seeds": seeds} if plan.stochastic else {}
    want = torch_sample(sampler, noise, labels, **kw)
    assert float(want.abs().max()) > 0.5
    onnx_sampler = OnnxSampler(paths["loop" if mode == "loop" else "step"], io_binding=mode == "io_binding")
    close(onnx_sampler.sample(noise, labels, **kw), want)
    if plan.stochastic:  # other per-step noise, another sample
        z = torch.randn(plan.steps, *noise.shape)
        assert float((onnx_sampler.sample(noise, labels, step_noise=z) - want).abs().max()) > 1e-2


def test_stochastic_and_fractional_cases_are_what_they_claim():
    solvers = _multistep_solvers()
    assert solvers["sde-dpm++2m"]().plan.stochastic and solvers["euler-ancestral"]().plan.stochastic
    t = solvers["euler-karras"]().plan.timesteps
    assert bool((t != t.round()).any())  # fractional model times
    assert solvers["unipc3-bh1"]().plan.history.write_slots.shape[1] == 2  # two writes a step


@pytest.mark.parametrize("batch", [1, 5])
def test_multistep_batch_sizes(ms_graphs, batch):
    sampler, paths = ms_graphs("unipc3-bh1", "recfg")
    noise, labels, _ = ms_inputs(batch)
    want = torch_sample(sampler, noise, labels)
    for mode in ("step", "loop"):
        close(OnnxSampler(paths[mode]).sample(noise, labels), want)


def test_multistep_step_matches_reference(ms_graphs):
    """One step with random (non-zero) history slots against the specification, guided_step_into in float64:
    x_next and the slots after this step's two writes (slot 0 and a ring slot; the others unchanged)."""
    sampler, paths = ms_graphs("unipc3-bh1", "recfg")
    plan, table, h = sampler.solver.plan, sampler.guidance.table, sampler.solver.plan.history
    k, i = h.slots, 4
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, *TINY_SHAPE, generator=gen)
    hist = torch.randn(k, 4, *TINY_SHAPE, generator=gen)
    labels, g1 = torch.tensor([0, 5, 2, 2]), torch.tensor([2.5, 0.0, 1.0, 4.0])
    steps, w = table.step_rows(plan.timesteps)
    with torch.no_grad():
        out = sampler.model(torch.cat([x, x]), torch.full((8,), float(plan.timesteps[i])),
                            torch.cat([labels, torch.full((4,), TINY_NULL)]))
    want_x, want_h = torch.empty(4, *TINY_SHAPE, dtype=torch.float64), hist.double()
    reference.guided_step_into(want_x, x.double(), out.double(), g1.double(), plan.coef[i], table=table.ratios,
                               rows=labels, table_steps=steps[i], table_w=w[i], history=want_h,
                               hist_coef=h.weights[i], write_slots=h.write_slots[i], write_coef=h.write_coef[i])
    got_x, got_h = OnnxSampler(paths["step"]).step(x, i, labels, scale=g1, history=hist)
    assert float((got_x.double() - want_x).abs().max()) <= ATOL
    assert float((got_h.double() - want_h).abs().max()) <= ATOL
    written = set(h.write_slots[i].tolist())
    assert len(written) == 2 and all(torch.equal(got_h[j], hist[j]) for j in range(k) if j not in written)
    assert all(float((got_h[j] - hist[j]).abs().max()) > 1e-2 for j in written)


def _with_initializer(path, out, match, new_value):
    """A copy of the graph at ``path`` with the initializer equal to ``match`` replaced by ``new_value``."""
    model = onnx.load(str(path))
    hits = [t for t in model.graph.initializer if onnx.numpy_helper.to_array(t).shape == match.shape
            and np.array_equal(onnx.numpy_helper.to_array(t), match)]
    assert len(hits) == 1, f"expected one initializer equal to the plan's array, found {len(hits)}"
    hits[0].CopyFrom(onnx.numpy_helper.from_array(new_value.astype(match.dtype), hits[0].name))
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize("name", ["dpm++2", "unipc3-bh1"])
def test_history_comparison_is_sensitive(ms_graphs, name, tmp_path):
    """The bound can fail: with the history weights (or the writes) zeroed in the graph, the sample is > 1e-3
    from torch's; the unmodified graph is within 1e-4."""
    sampler, paths = ms_graphs(name, "cfg")
    h = sampler.solver.plan.history
    noise, labels, _ = ms_inputs()
    want = torch_sample(sampler, noise, labels)
    close(OnnxSampler(paths["loop"]).sample(noise, labels), want)
    for what, array in (("weights", h.weights), ("writes", h.write_coef)):
        a = array.float().numpy()
        for mode in ("step", "loop"):
            broken = _with_initializer(paths[mode], tmp_path / f"{what}_{mode}.onnx", a, np.zeros_like(a))
            err = float((OnnxSampler(broken).sample(noise, labels) - want).abs().max())
            assert err > 1e-3, f"{what} zeroed ({mode}): {err:.3g}"


def test_init_scale_comparison_is_sensitive(ms_graphs, tmp_path):
    """x_T = init_scale * noise matters: the Euler loop graph with its init_scale set to 1, and a step graph whose
    metadata says 1, are > 1e-3 from torch's sample."""
    sampler, paths = ms_graphs("euler-karras", "cfg")
    scale = sampler.solver.plan.init_scale
    assert abs(scale - 1) > 0.01
    noise, labels, _ = ms_inputs()
    want = torch_sample(sampler, noise, labels)
    loop = _with_initializer(paths["loop"], tmp_path / "loop.onnx", np.array(scale, np.float32), np.array(1.0))
    assert float((OnnxSampler(loop).sample(noise, labels) - want).abs().max()) > 1e-3
    model = onnx.load(str(paths["step"]))
    from fastguide.onnx.metadata import proto_metadata, set_metadata

    set_metadata(model, {**proto_metadata(model), "init_scale": 1.0})
    onnx.save(model, str(tmp_path / "step.onnx"))
    assert float((OnnxSampler(tmp_path / "step.onnx").sample(noise, labels) - want).abs().max()) > 1e-3


def test_multistep_graph_interface(ms_graphs):
    """The step graph takes and returns the K history slots (batch axis dynamic); the loop graph carries them in
    the Loop's state (no history input); the plan's history tensors are initializers."""
    sampler, paths = ms_graphs("sde-dpm++2m", "recfg")
    h = sampler.solver.plan.history
    k = h.slots
    step = ort.InferenceSession(str(paths["step"]), providers=[CPU])
    inputs = {i.name: (i.type, i.shape) for i in step.get_inputs()}
    outputs = {o.name: (o.type, o.shape) for o in step.get_outputs()}
    assert inputs["history"] == outputs["history_next"] == ("tensor(float)", [k, "batch", *TINY_SHAPE])
    assert outputs["x_next"] == inputs["x"] == inputs["z"] == ("tensor(float)", ["batch", *TINY_SHAPE])
    loop = ort.InferenceSession(str(paths["loop"]), providers=[CPU])
    assert {i.name for i in loop.get_inputs()} == {"noise", "labels", "g1", "z"}
    assert [o.name for o in loop.get_outputs()] == ["sample"]
    loop_nodes = [n for n in onnx.load(str(paths["loop"])).graph.node if n.op_type == "Loop"]
    assert len(loop_nodes) == 1 and len(loop_nodes[0].input) == 4  # trip count, condition, x, history
    for path in paths.values():
        inits = _initializers(path)
        for array in (h.weights, h.write_coef):
            a = array.float().numpy()
            assert any(b.shape == a.shape and np.array_equal(b, a) for b in inits), "history plan not inside"


def test_multistep_step_inputs_are_checked(ms_graphs):
    s = OnnxSampler(ms_graphs("dpm++2", "cfg")[1]["step"])
    x, labels = torch.randn(2, *TINY_SHAPE), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"history: this solver is multistep.*\[1, B, 2, 4, 4\]"):
        s.step(x, 0, labels)
    with pytest.raises(ValueError, match=r"history: expected shape \[1, 2, 2, 4, 4\]"):
        s.step(x, 0, labels, history=torch.zeros(2, 2, *TINY_SHAPE))
    with pytest.raises(TypeError, match=r"history.*float32"):
        s.step(x, 0, labels, history=torch.zeros(1, 2, *TINY_SHAPE, dtype=torch.float64))
    x1, h1 = s.step(x, 0, labels, history=torch.zeros(1, 2, *TINY_SHAPE))
    assert x1.shape == x.shape and h1.shape == (1, 2, *TINY_SHAPE)


def test_one_step_graph_refuses_history(built):
    with pytest.raises(ValueError, match="history: this solver is one-step"):
        OnnxSampler(built["cfg"][1]["step"]).step(torch.randn(2, *IMAGE_SHAPE), 0, torch.tensor([1, 2]),
                                                  history=torch.zeros(1, 2, *IMAGE_SHAPE))


def test_files_without_history_keys_still_load(built, tmp_path):
    """A graph written before multistep export (no history_slots / init_scale metadata) is a one-step graph from
    the noise itself: it loads, samples and converts to a loop graph as before."""
    from fastguide.onnx.metadata import META_PREFIX

    sampler, paths = built["ddpm"]
    model = onnx.load(str(paths["step"]))
    kept = [p for p in model.metadata_props if p.key not in (META_PREFIX + "history_slots", META_PREFIX + "init_scale")]
    assert len(kept) == len(model.metadata_props) - 2
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old_step.onnx"
    onnx.save(model, str(old))
    assert "history_slots" not in read_metadata(old)
    noise, labels, seeds = torch.randn(2, *IMAGE_SHAPE), torch.tensor([1, 2]), [3, 4]
    want = torch_sample(sampler, noise, labels, seeds=seeds)
    for path in (old, step_to_loop(old, tmp_path / "old_loop.onnx")):
        s = OnnxSampler(path)
        assert (s.history_slots, s.init_scale) == (0, 1.0)
        close(s.sample(noise, labels, seeds=seeds), want)


class _PlanOf:
    """A solver-like object around a given plan (what the Sampler asks of a solver)."""

    def __init__(self, plan):
        self.plan = plan


def test_export_refuses_history_it_cannot_write(tmp_path):
    """A step that writes one slot twice (no defined value, in torch's index_copy_ either) or a slot outside the
    K slots, and a non-positive init_scale, are refused by name before tracing."""
    import dataclasses

    plan = fg.UniPC(digits_schedule(), 4, order=2).plan
    h = plan.history
    model = TinyNet().eval()
    for slots, match in ((torch.zeros_like(h.write_slots), r"step 0 writes slots \[0, 0\]"),
                         (h.write_slots + 2, r"step 0 writes slots \[2, 3\].*distinct slots in 0..2")):
        bad = dataclasses.replace(plan, history=dataclasses.replace(h, write_slots=slots))
        sampler = fg.Sampler(model, _PlanOf(bad), fg.CFG(2.0), null_cond=TINY_NULL)
        with pytest.raises(ValueError, match=rf"^solver: _PlanOf's history {match}"):
            export(sampler, tmp_path / "bad.onnx", TINY_SHAPE)
    sampler = fg.Sampler(model, _PlanOf(dataclasses.replace(plan, init_scale=0.0)), fg.CFG(2.0), null_cond=TINY_NULL)
    with pytest.raises(ValueError, match=r"^solver: .*init_scale=0.0"):
        export(sampler, tmp_path / "bad.onnx", TINY_SHAPE)
    assert not (tmp_path / "bad.onnx").exists()


# ---------------------------------------------------------------------- the shipped digits model
@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The trained digits model with its shipped tables: float32 and float64 torch samplers and ONNX graphs."""
    import copy

    from fastguide.demo import digits

    model, tables = digits.load_digits_model(), digits.load_digits_tables()
    model64 = copy.deepcopy(model).double()
    d = tmp_path_factory.mktemp("onnx_shipped")
    out = {}
    for rule in ("cfg", "recfg-ls"):
        solver = fg.DDIM(digits_schedule(), steps=STEPS)
        guide = digits.make_guidance(rule, 3.0, tables)
        sampler = fg.Sampler(model, solver, guide, null_cond=NULL_LABEL, progress=False)
        step = export(sampler, d / f"{rule}_step.onnx", IMAGE_SHAPE)
        out[rule] = (sampler, fg.Sampler(model64, solver, guide, null_cond=NULL_LABEL, progress=False),
                     {"step": step, "loop": step_to_loop(step, d / f"{rule}_loop.onnx")})
    return out


@pytest.mark.parametrize("mode", ["step", "loop"])
@pytest.mark.parametrize("rule", ["cfg", "recfg-ls"])
@pytest.mark.parametrize("batch", [1, 7])
def test_shipped_model_matches_float64_reference(shipped, rule, mode, batch):
    """Within 1e-4 of the torch float32 sample, and judged against the float64 torch sample: the ONNX error is at
    most about the torch float32 sampler's own.

    The second check is the one that stays meaningful where float32 is ill-conditioned: with the least-squares
    table and seeds 0..31, one sample of the torch float32 sampler is 8e-5 from float64 (DDIM's first step
    divides by sqrt(abar_999) ~ 0.0064 after g = 3 amplifies the eps rounding), and ONNX and torch float32
    differ by up to 1.8e-4 there, each ~1e-4 from float64.
    """
    sampler, sampler64, paths = shipped[rule]
    noise = fg.seeded_noise(list(range(100, 100 + batch)), IMAGE_SHAPE)
    labels = torch.arange(batch) % 10
    want32 = torch_sample(sampler, noise, labels)
    want64 = torch_sample(sampler64, noise.double(), labels)
    got = OnnxSampler(paths[mode]).sample(noise, labels)
    err_torch32 = float((want32.double() - want64).abs().max())
    err_onnx = float((got.double() - want64).abs().max())
    assert err_onnx <= 2 * err_torch32 + 2e-5, f"onnx {err_onnx:.3g} vs torch float32 {err_torch32:.3g} (to float64)"
    close(got, want32)


# ---------------------------------------------------------------------- DiT
@pytest.mark.parametrize("mode,batch", [("step", 1), ("step", 7), ("loop", 7)])
def test_tiny_dit_matches_torch(dit_built, mode, batch):
    sampler, shape, paths = dit_built
    noise = torch.randn(batch, *shape)
    labels = torch.randint(0, 1000, (batch,))
    want = torch_sample(sampler, noise, labels)
    assert float(want.abs().max()) > 0.5
    close(OnnxSampler(paths[mode]).sample(noise, labels), want)
    model = onnx.load(str(paths[mode]))
    assert {"MatMul", "Softmax"} <= {n.op_type for n in _all_nodes(model.graph)}  # attention is inside
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= MIN_OPSET


# ---------------------------------------------------------------------- what is inside the graph
def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from _all_nodes(attr.g)


def _initializers(path):
    return [onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer]


@pytest.mark.parametrize("mode", ["step", "loop"])
def test_graph_interface_and_initializers(built, mode):
    sampler, paths = built["recfg"]
    sess = ort.InferenceSession(str(paths[mode]), providers=[CPU])
    inputs = {i.name: (i.type, i.shape) for i in sess.get_inputs()}
    first = "x" if mode == "step" else "noise"
    assert inputs[first] == ("tensor(float)", ["batch", *IMAGE_SHAPE])
    assert inputs["labels"] == ("tensor(int64)", ["batch"])
    assert inputs["g1"] == ("tensor(float)", ["batch"])
    assert ("step" in inputs) == (mode == "step") and "z" not in inputs
    if mode == "step":
        assert inputs["step"] == ("tensor(int64)", [])
    inits = _initializers(paths[mode])
    ratios = sampler.guidance.table.ratios.float().numpy()
    assert any(a.shape == ratios.shape and np.array_equal(a, ratios) for a in inits), "ratio table not in the graph"
    coef = sampler.solver.plan.coef.float().numpy()
    assert any(a.shape == (STEPS, NUM_COEF) and np.array_equal(a, coef) for a in inits), "plan not inside"
    w = sampler.guidance.table.step_rows(sampler.solver.plan.timesteps)[1].float().numpy()
    assert any(a.shape == (STEPS,) and np.array_equal(a, w) for a in inits), "table lerp weights not inside"


def test_external_data(built, tmp_path):
    """Weights in a side file (for models over protobuf's 2 GB): the graph loads and samples the same."""
    sampler, paths = built["cfg"]
    path = step_to_loop(paths["step"], tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > path.stat().st_size
    noise, labels = torch.randn(3, *IMAGE_SHAPE), torch.tensor([4, 4, 2])
    close(OnnxSampler(path).sample(noise, labels), torch_sample(sampler, noise, labels))


def test_stochastic_graph_takes_z(built):
    for mode, shape in (("step", ["batch", *IMAGE_SHAPE]), ("loop", [6, "batch", *IMAGE_SHAPE])):
        sess = ort.InferenceSession(str(built["ddpm"][1][mode]), providers=[CPU])
        z = {i.name: i for i in sess.get_inputs()}["z"]
        assert (z.type, z.shape) == ("tensor(float)", shape)


# ---------------------------------------------------------------------- providers
@pytest.mark.parametrize("name", ["cfg", "ddpm"])
@pytest.mark.parametrize("mode", ["step", "loop"])
def test_io_binding_path_matches(built, name, mode):
    """The IO-binding path CUDA uses (device buffers, ping-pong across steps), run here with CPU buffers."""
    sampler, paths = built[name]
    s = OnnxSampler(paths[mode], io_binding=True)
    assert s.io_binding and s.device_type == "cpu"
    noise, labels, seeds = torch.randn(4, *IMAGE_SHAPE), torch.tensor([6, 1, 0, 9]), [5, 6, 7, 8]
    kept = noise.clone()
    got = s.sample(noise, labels, seeds=seeds)
    assert torch.equal(noise, kept)  # the caller's noise is not a buffer of the loop
    close(got, torch_sample(sampler, noise, labels, seeds=seeds))


def test_provider_is_reported(built):
    s = OnnxSampler(built["cfg"][1]["step"])
    assert s.provider == s.session.get_providers()[0] == CPU
    assert not s.io_binding
    assert CPU in repr(s)


@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # onnxruntime's own note about the fallback
def test_cuda_fallback_is_detected_and_warned(built, monkeypatch):
    """onnxruntime falls back to the CPU when CUDA does not load; the sampler must notice and say so."""
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime really has CUDA; the fallback cannot be provoked")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    with pytest.warns(RuntimeWarning, match="did not load"):
        s = OnnxSampler(built["cfg"][1]["step"])
    assert s.provider == CPU
    noise = torch.randn(2, *IMAGE_SHAPE)
    close(s.sample(noise, torch.tensor([1, 2])), torch_sample(built["cfg"][0], noise, torch.tensor([1, 2])))


# ---------------------------------------------------------------------- bad input
def test_classifier_guidance_is_refused(tmp_path):
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    sampler = fg.Sampler(digits_model(), fg.DDIM(digits_schedule(), steps=4),
                         fg.ClassifierGuidance(lambda x, t: clf(x), 1.0), null_cond=NULL_LABEL)
    with pytest.raises(ValueError, match="ClassifierGuidance.*autograd"):
        export(sampler, tmp_path / "clf.onnx", IMAGE_SHAPE)
    assert not (tmp_path / "clf.onnx").exists()


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "unrolled"}, "mode"), ({"opset": 17}, "opset"), ({"batch": 0}, "batch"),
])
def test_bad_export_arguments(tmp_path, kwargs, match):
    sampler = fg.Sampler(digits_model(), v_solver(4), fg.CFG(2.0), null_cond=NULL_LABEL)
    with pytest.raises(ValueError, match=match):
        export(sampler, tmp_path / "x.onnx", IMAGE_SHAPE, **kwargs)


def test_bad_export_setup(tmp_path):
    model = digits_model()
    cfg = fg.Sampler(model, v_solver(4), fg.CFG(2.0), null_cond=NULL_LABEL)
    with pytest.raises(ValueError, match="latent_shape"):
        export(cfg, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="path.*onnx"):
        export(cfg, tmp_path / "x.pt", IMAGE_SHAPE)
    with pytest.raises(TypeError, match="sampler"):
        export(model, tmp_path / "x.onnx", IMAGE_SHAPE)
    emb = fg.Sampler(model, v_solver(4), fg.CFG(2.0), null_cond=torch.zeros(128))
    with pytest.raises(ValueError, match="null_cond.*int"):
        export(emb, tmp_path / "x.onnx", IMAGE_SHAPE)
    half = fg.Sampler(digits_model().half(), v_solver(4), fg.CFG(2.0), null_cond=NULL_LABEL)
    with pytest.raises(ValueError, match=r"model.*float32.*model.float\(\)"):
        export(half, tmp_path / "x.onnx", IMAGE_SHAPE)
    training = fg.Sampler(DigitsUNet(), v_solver(4), fg.CFG(2.0), null_cond=NULL_LABEL)
    with pytest.raises(ValueError, match=r"model.*eval\(\)"):
        export(training, tmp_path / "x.onnx", IMAGE_SHAPE)


def test_wrong_dtypes_name_the_fix(built):
    s = OnnxSampler(built["cfg"][1]["loop"])
    noise, labels = torch.randn(2, *IMAGE_SHAPE), torch.tensor([1, 2])
    with pytest.raises(TypeError, match=r"labels.*int64.*int32.*astype\(np.int64\)"):
        s.sample(noise, labels.int())
    with pytest.raises(TypeError, match=r"labels.*int64.*int32"):
        s.sample(noise.numpy(), labels.numpy().astype(np.int32))
    with pytest.raises(TypeError, match=r"noise.*float32.*float64.*\.float\(\)"):
        s.sample(noise.double(), labels)
    with pytest.raises(TypeError, match=r"noise.*float32.*float16"):
        s.sample(noise.numpy().astype(np.float16), labels)


def test_bad_run_inputs(built):
    s = OnnxSampler(built["recfg"][1]["step"])
    noise, labels = torch.randn(2, *IMAGE_SHAPE), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"noise.*\[B, 1, 8, 8\]"):
        s.sample(torch.randn(2, 1, 8, 9), labels)
    with pytest.raises(ValueError, match=r"labels.*\[2\]"):
        s.sample(noise, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="outside the ratio table"):
        s.sample(noise, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="noise.*NaN"):
        s.sample(torch.full((2, *IMAGE_SHAPE), float("nan")), labels)
    with pytest.raises(ValueError, match="scale"):
        s.sample(noise, labels, scale=torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="scale"):
        s.sample(noise, labels, scale=-1.0)
    with pytest.raises(ValueError, match="step: expected a step index 0..9"):
        s.step(noise, STEPS, labels)
    with pytest.raises(ValueError, match="step_noise.*deterministic"):
        s.sample(noise, labels, step_noise=torch.randn(STEPS, 2, *IMAGE_SHAPE))
    with pytest.raises(ValueError, match="mode='loop'"):
        OnnxSampler(built["recfg"][1]["loop"]).step(noise, 0, labels)
    with pytest.raises(ValueError, match="z.*stochastic"):
        OnnxSampler(built["ddpm"][1]["step"]).step(noise, 0, labels)


def test_bad_session_setup(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        OnnxSampler(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="providers.*onnxruntime-gpu"):
        OnnxSampler(built["cfg"][1]["step"], providers=["NoSuchExecutionProvider"])
    foreign = tmp_path / "foreign.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                            "g", [x], [y])), str(foreign))
    with pytest.raises(ValueError, match="not a graph written by fastguide"):
        OnnxSampler(foreign)
    with pytest.raises(ValueError, match="already a loop"):
        step_to_loop(built["cfg"][1]["loop"], tmp_path / "again.onnx")


# ---------------------------------------------------------------------- command line
def test_cli_export_onnx(tmp_path, capsys):
    from fastguide.demo import digits
    from fastguide.demo.train import save_model

    save_model(tmp_path / digits.UNET_FILE, digits_model(), digits.UNET_FORMAT,
               {"schedule_fingerprint": digits_schedule().fingerprint()})
    out = tmp_path / "digits.onnx"
    assert cli.main(["export-onnx", "--out", str(out), "--mode", "loop", "--steps", "4", "--scale", "2.5",
                     "--assets", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "verify: onnxruntime on CPUExecutionProvider" in text
    err = float(text.split("max |onnx - torch| = ")[1].split()[0])
    assert err < 1e-2  # epsilon model, untrained: samples are large, the relative error is what is tiny
    meta = read_metadata(out)
    assert (meta["mode"], meta["steps"], meta["default_scale"], meta["guidance"]) == ("loop", 4, 2.5, "CFG")


def test_cli_bad_arguments(tmp_path, capsys):
    assert cli.main(["export-onnx", "--out", str(tmp_path / "x.txt"), "--assets", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["export-onnx", "--out", str(tmp_path / "x.onnx"), "--opset", "13"]) == 2
    assert "--opset" in capsys.readouterr().err
    assert cli.main(["export-onnx", "--out", str(tmp_path / "x.onnx"), "--assets", str(tmp_path / "none")]) == 2
    assert "--assets" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- per-row plans
def _row_families():
    sch, v = digits_schedule(), "v_prediction"
    return {
        "ddim": lambda n: fg.DDIM(sch, steps=n, prediction_type=v),
        "dpm++2": lambda n: fg.DPMSolver(sch, n, order=2, prediction_type=v),
        "unipc3-bh1": lambda n: fg.UniPC(sch, n, order=3, solver_type="bh1", prediction_type=v),
        "euler-ancestral": lambda n: fg.Euler(sch, n, ancestral=True, prediction_type=v),  # z, init_scale per row
        "heun-clip": lambda n: fg.Heun(sch, n, prediction_type=v, clip_sample_range=1.0),
    }


ROW_MIX = [6, 3, 5, 6, 4]  # step counts per row (heun: intervals, 2n - 1 evaluations)


@pytest.fixture(scope="module")
def row_graphs(tmp_path_factory):
    """row_graphs(family, rule) -> (sampler, {mode: path}): per_row=True graphs of the family's 6-step solver."""
    d = tmp_path_factory.mktemp("onnx_rows")
    model, families, cache = TinyNet().eval().requires_grad_(False), _row_families(), {}

    def get(family: str, rule: str):
        if (family, rule) not in cache:
            guide = (fg.CFG(2.5, interval=(200, 800)) if rule == "cfg-interval"
                     else fg.ReCFG(2.5, table=ratio_table(TINY_NULL, TINY_SHAPE)))
            sampler = fg.Sampler(model, families[family](6), guide, null_cond=TINY_NULL, progress=False)
            step = export(sampler, d / f"{family}_{rule}_step.onnx", TINY_SHAPE, per_row=True)
            cache[family, rule] = (sampler, {"step": step, "loop": step_to_loop(step, d / f"{family}_{rule}_loop.onnx")})
        return cache[family, rule]

    return get


@pytest.mark.parametrize("mode", ["step", "loop", "io_binding"])
@pytest.mark.parametrize("rule", ["cfg-interval", "recfg"])
@pytest.mark.parametrize("family", list(_row_families()))
def test_per_row_graphs_match_torch_for_every_mix(row_graphs, family, rule, mode):
    """A per_row graph (the rows' plans as inputs) gives Sampler.sample(solvers=...)'s samples for mixes of step
    counts, per-sample scales and seeds: one graph, every mix."""
    sampler, paths = row_graphs(family, rule)
    onnx_sampler = OnnxSampler(paths["loop" if mode == "loop" else "step"], io_binding=mode == "io_binding")
    make = _row_families()[family]
    solvers = {n: make(n) for n in set(ROW_MIX)}
    noise, labels, seeds = ms_inputs(len(ROW_MIX))
    scale = torch.tensor([1.0, 2.0, 3.5, 1.5, 2.5], dtype=torch.float64)
    for mix in (ROW_MIX, ROW_MIX[::-1], [3] * len(ROW_MIX)):
        rows = [solvers[n] for n in mix]
        with torch.no_grad():
            want = sampler.sample(noise, labels, seeds=seeds, scale=scale, solvers=rows)
        got = onnx_sampler.sample(noise, labels, seeds=seeds, scale=scale, solvers=rows)
        close(got, want)


def test_per_row_graph_inputs_are_checked(row_graphs, built):
    sampler, paths = row_graphs("dpm++2", "recfg")
    onnx_sampler = OnnxSampler(paths["loop"])
    noise, labels, seeds = ms_inputs(3)
    make = _row_families()["dpm++2"]
    with pytest.raises(ValueError, match="solvers: this graph takes a plan per row"):
        onnx_sampler.sample(noise, labels)
    with pytest.raises(ValueError, match="solvers: row 1's plan has 7 steps; this graph runs at most 6"):
        onnx_sampler.sample(noise, labels, solvers=[make(3), make(7), make(3)])
    with pytest.raises(ValueError, match="solvers: row 2's plan has history_slots 4, the graph's 1"):
        onnx_sampler.sample(noise, labels, solvers=[make(3), make(3), _row_families()["unipc3-bh1"](4)])
    with pytest.raises(ValueError, match="solvers: expected a sequence of 3"):
        onnx_sampler.sample(noise, labels, solvers=[make(3)])
    with pytest.raises(ValueError, match="step: this graph takes a plan per row"):
        OnnxSampler(paths["step"]).step(noise, 0, labels)
    plain = OnnxSampler(built["cfg"][1]["loop"])
    with pytest.raises(ValueError, match="solvers: this graph runs its exported plan for every row"):
        plain.sample(torch.zeros(1, *IMAGE_SHAPE), torch.zeros(1, dtype=torch.long), solvers=[make(3)])


def test_per_row_export_refuses_a_step_indexed_table(tmp_path):
    model = TinyNet().eval().requires_grad_(False)
    table = fg.RatioTable(1 + 0.1 * torch.rand(TINY_NULL + 1, 6, *TINY_SHAPE))  # indexed by sampler step
    sampler = fg.Sampler(model, _row_families()["ddim"](6), fg.ReCFG(2.0, table=table), null_cond=TINY_NULL)
    with pytest.raises(ValueError, match="per_row: this ReCFG table is indexed by sampler step"):
        export(sampler, tmp_path / "x.onnx", TINY_SHAPE, per_row=True)
