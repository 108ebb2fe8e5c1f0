"""Timing one guided step: the fused Triton kernel vs the eager reference vs torch.compile(reference).

Shared by `fastguide bench --kernel`, benchmarks/report_guided_step.py (the RESULTS.md table) and
benchmarks/bench_guided_step.py (pytest-benchmark). On a GPU: GPU time per step from CUDA-graph replays over
rotating input sets (so L2 cannot hold them), the bytes a step must move against the device's measured copy
bandwidth, and host time per eager call. On a CPU only the reference and its compiled form are timed (wall
time per call): the Triton kernel runs there only in its interpreter, which says nothing about GPU speed.
"""
from __future__ import annotations

import math
import time

import torch

from fastguide.guidance import make_rule_params
from fastguide.kernels import reference
from fastguide.loop import capture_cuda_graph

GPU_SHAPES = [(64, 4, 32, 32), (16, 4, 128, 128), (8, 16, 128, 128), (1, 4, 64, 64), (64, 16, 128, 128)]
CPU_SHAPES = [(2, 4, 8, 8), (16, 4, 32, 32)]
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
COEF = [0.99, -0.1, 0.0, 1.0, -0.2, 0.9, 0.05, 0.1]  # a DDIM-like step, one value per Coef column
TABLE_W = 0.25  # the lerp weight between two table rows (ReCFG off the table's grid)
# rule -> (K history slots read, W written): a multistep solver's step (DPM-Solver++ 2M: 1 / 1; UniPC-3: 4 / 2)
KERNEL_RULES = {"cfg": (0, 0), "recfg": (0, 0), "cfg-dpm2m": (1, 1), "cfg-unipc3": (4, 2), "cfg-rescale": (0, 0),
                "cfg-zero-star": (0, 0), "apg": (0, 0)}
# the rules with per-sample reductions: rule -> their make_rule_params arguments (the rest as plain CFG); a momentum
# carries a rule state (APG's: one more [B, *shape] read and write a step)
REDUCED_RULES = {"cfg-rescale": dict(rescale=0.7), "cfg-zero-star": dict(zero_star=True),
                 "apg": dict(eta=0.0, norm_threshold=15.0, momentum=-0.5)}


def has_rule_state(rule: str) -> bool:
    return REDUCED_RULES.get(rule, {}).get("momentum", 0.0) != 0


def make_step_inputs(shape, dtype, rule: str, device, lerp: bool = False) -> dict:
    """Random inputs of one step over a [2B] buffer (out), x = its first half; recfg adds a table [11, 8, ...]
    read at one grid row (lerp=False) or two (lerp=True); the multistep rules (KERNEL_RULES) add K history
    slots and W writes."""
    b, latent = shape[0], shape[1:]
    d = dict(out=torch.randn((2 * b, *latent), dtype=dtype, device=device),
             model_out=torch.randn((2 * b, *latent), dtype=dtype, device=device),
             g1=torch.full((b,), 4.0, device=device), coef=torch.tensor(COEF, device=device),
             kw=dict(cond_first=True))
    d["x"] = d["out"][:b]
    if rule == "recfg":
        d["kw"].update(table=torch.rand((11, 8, *latent), dtype=dtype, device=device) + 0.5,
                       rows=torch.randint(0, 11, (b,), device=device),
                       table_steps=torch.tensor([3, 4 if lerp else 3], device=device),
                       table_w=torch.tensor(TABLE_W, device=device))
    k, w = KERNEL_RULES[rule]
    if k:
        d["kw"].update(history=torch.randn((k, b, *latent), dtype=dtype, device=device),
                       hist_coef=torch.linspace(-0.5, 0.5, k, device=device),
                       write_slots=torch.arange(w, device=device), write_coef=torch.full((w, 2 + k), 0.1, device=device))
    if rule in REDUCED_RULES:
        d["kw"]["rule_params"] = make_rule_params(**REDUCED_RULES[rule]).to(device, torch.float32)
        if has_rule_state(rule):
            d["kw"]["rule_state"] = 0.1 * torch.randn((b, *latent), dtype=dtype, device=device)
    return d


def floor_bytes(shape, dtype, rule: str, lerp: bool = False) -> int:
    """Bytes a step must move: read x, m_cond, m_uncond (+ table rows, + K history slots, + a rule state), write both
    halves of the 2B buffer (+ W history slots, + the rule state). The rules with per-sample reductions move more
    than this floor (their moment pre-pass reads m_cond, m_uncond and the state once more: docs/kernel.md), which
    the % of copy bandwidth shows."""
    k, w = KERNEL_RULES[rule]
    state = 2 if has_rule_state(rule) else 0
    streams = 3 + 2 + (0 if rule != "recfg" else 2 if lerp else 1) + k + w + state
    return streams * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def step_impls(device) -> dict:
    """name -> fn(inputs) for the implementations worth timing on ``device`` (triton only on CUDA)."""
    compiled_ref = torch.compile(reference.guided_step_into, dynamic=False)
    impls = {
        "eager": lambda d: reference.guided_step_into(d["out"], d["x"], d["model_out"], d["g1"], d["coef"], **d["kw"]),
        "compiled": lambda d: compiled_ref(d["out"], d["x"], d["model_out"], d["g1"], d["coef"], **d["kw"]),
    }
    if torch.device(device).type == "cuda":
        from fastguide.kernels import guided_step as gs

        impls["triton"] = lambda d: gs.guided_step_into(d["out"], d["x"], d["model_out"], d["g1"], d["coef"],
                                                        check=False, **d["kw"])
    return impls


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), best of several copies."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return 2 * nbytes / best


def gpu_time_per_step(fn, sets, calls: int = 2000) -> float:
    """GPU seconds per step: a CUDA graph of ~``calls`` steps cycling over the rotating input sets, replayed
    and timed with events; median of 5 replays."""
    reps = max(1, calls // len(sets))

    def all_steps():
        for _ in range(reps):
            for d in sets:
                fn(d)

    graph = capture_cuda_graph(all_steps)
    times = []
    for _ in range(5):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / (reps * len(sets)))
    return sorted(times)[len(times) // 2]


def host_time_per_call(fn, d, calls: int = 200, rounds: int = 5) -> float:
    """Wall seconds per call, best of ``rounds`` (on a GPU: the host's issue cost, which small shapes hide
    their GPU work behind)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(10):
        fn(d)
    best = float("inf")
    for _ in range(rounds):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(d)
        sync()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def run_kernel_bench(device="cpu", shapes=None, dtypes=None, rules=tuple(KERNEL_RULES), calls: int | None = None,
                     progress=print) -> list[dict]:
    """One row per (shape, dtype, rule). CUDA: floor_us (bytes / copy bandwidth), GPU us per step of each
    implementation, triton's % of copy bandwidth and speed-ups, triton host us per call. CPU: wall us per call
    of the eager and compiled reference."""
    cuda = torch.device(device).type == "cuda"
    shapes = shapes or (GPU_SHAPES if cuda else CPU_SHAPES)
    dtypes = dtypes or ([torch.float32, torch.bfloat16] if cuda else [torch.float32])
    impls = step_impls(device)
    rows = []
    if cuda:
        bw = copy_bandwidth()
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for shape in shapes:
        for dtype in dtypes:
            for rule in rules:
                row = {"shape": list(shape), "dtype": DTYPE_NAMES[dtype], "rule": rule, "device": str(device)}
                if cuda:
                    nbytes = floor_bytes(shape, dtype, rule)
                    sets = [make_step_inputs(shape, dtype, rule, device) for _ in range(max(4, math.ceil(4 * l2 / nbytes)))]
                    t = {name: gpu_time_per_step(fn, sets, calls or 2000) for name, fn in impls.items()}
                    row.update(copy_bw_gbs=bw / 1e9, floor_us=nbytes / bw * 1e6,
                               **{f"{name}_us": v * 1e6 for name, v in t.items()},
                               pct_copy_bw=100 * nbytes / t["triton"] / bw, x_eager=t["eager"] / t["triton"],
                               x_compiled=t["compiled"] / t["triton"],
                               triton_host_us=host_time_per_call(impls["triton"], sets[0]) * 1e6)
                    del sets
                else:
                    d = make_step_inputs(shape, dtype, rule, device)
                    for name, fn in impls.items():
                        row[f"{name}_us"] = host_time_per_call(fn, d, calls=calls or 20) * 1e6
                rows.append(row)
                progress(f"  kernel {tuple(shape)} {row['dtype']} {rule}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row.items() if k.endswith("_us")))
    return rows


def format_kernel_rows(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = [c for c in rows[0] if c not in ("shape", "dtype", "rule", "device")]
    head = f"{'shape':20s} {'dtype':5s} {'rule':6s} " + " ".join(f"{c:>14s}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{str(tuple(r['shape'])):20s} {r['dtype']:5s} {r['rule']:6s} "
                     + " ".join(f"{r[c]:14.2f}" for c in cols))
    return "\n".join(lines)
