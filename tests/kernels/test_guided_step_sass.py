"""Static proof of the kernel's GPU quality, no GPU needed: compile the production kernel ahead of time for
sm_90 and sm_80 with the launcher's run-time specialization for aligned inputs, disassemble the cubin with
the cuobjdump that ships in triton's nvidia backend, and check, for every dtype and rule:

- every streamed operand is read and every output written with 128-bit accesses (LDG.E.128 / STG.E.128);
- loads and stores per element are exactly the floor: one load per streamed input element, one store per
  output element (the only other loads are the per-program scalars: g1, label row, step rows, coefficients);
- no local memory (no spills) and registers within the bound for full occupancy: <= 32 per thread (65536
  registers / 2048 threads on sm_80 and sm_90) when all streamed operands share the latent dtype; <= 48 for
  16-bit latents with float32 tables and noise (62.5% occupancy with 9 128-bit loads in flight per thread);
- multistep (history) variants, K slots read and W written (K1W1: DPM-Solver++ 2M; K4W2: UniPC-3, the most the
  kernel runs): the K history reads and W history writes are 128-bit accesses at the floor too, the extra scalar
  loads are exactly the step's history weights (K + W (2 + K) float32, W slot indices when K > 1), and registers stay
  <= 64 (50% occupancy: 1024 threads per SM, each with 4 to 10 128-bit loads in flight, far more bytes in
  flight than the memory system needs to stream at full bandwidth).
- rules with per-sample reductions (``rule_params``): the moment pre-pass (``rule_moments_kernel``) reads c, u
  (+ the table rows, + the rule state) with 128-bit loads (a whole number of copies of its loop body: ptxas may
  unroll it) and writes only its NUM_M float32 partials per program; the REDUCE step streams as the variant without
  the rule plus the state's 128-bit read and write, and loads exactly NUM_M partials and the rule parameters it
  uses (4, and MOMENTUM with a state) more scalars. Registers <= 64 (50% occupancy, as the history variants),
  with the UniPC-3 history as well; no local memory.
- per-row plans (``rows``: PER_ROW, each row its own solver plan, coef [B, NUM_COEF] and the other per-step operands
  with a row axis), the twins of the lightest CFG and heaviest ReCFG steps (with and without history), the heaviest
  REDUCE steps and the pre-pass: the row's scalars are per-program loads at the row's offset, so the accesses are
  exactly the batch variant's (the same 128-bit loads and stores, the same scalar loads by width), no local memory
  and registers within the batch variant's bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "benchmarks" / "report_guided_step.py"
MAX_SCALAR_LOADS = 11  # g1, label row, two step rows, the lerp weight, at most six coefficients
FULL_OCCUPANCY_REGS, MIXED_WIDTH_REGS, HISTORY_REGS = 32, 48, 64
RULE_REGS = 64  # REDUCE steps (with or without history) and the moment pre-pass


def _nvidia_tools_present() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


pytestmark = pytest.mark.skipif(not _nvidia_tools_present(), reason="triton's nvidia backend tools are missing")


@pytest.fixture(scope="module")
def figures() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # AOT compile needs the real @jit
    res = subprocess.run([sys.executable, str(REPORT), "--static", "--json"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


def test_every_rule_and_dtype_is_covered_on_both_arches(figures):
    seen = {(r["arch"], *r["variant"].split("/")[:2]) for r in figures}
    for arch in (90, 80):
        for rule in ("cond", "cfg", "recfg"):
            for dtype in ("fp32", "fp16", "bf16"):
                assert (arch, rule, dtype) in seen
    hist = {(r["arch"], r["variant"].split("/")[1], r["hist_k"], r["hist_w"]) for r in figures
            if r["kernel"] == "step" and not r["reduce"]}
    for arch in (90, 80):
        for dtype in ("fp32", "fp16", "bf16"):
            assert {(arch, dtype, 1, 1), (arch, dtype, 4, 2)} <= hist
    # the rules with per-sample reductions: the heaviest REDUCE step (with and without history) and pre-pass on both
    # arches, the lighter ones on sm_90
    names = {(r["arch"], r["variant"]) for r in figures}
    for dtype in ("fp32", "fp16", "bf16"):
        heaviest = f"reduce-recfg/{dtype}/clip/z-{dtype}/out2B/state"
        for arch in (90, 80):
            assert {(arch, heaviest), (arch, heaviest + "/hist-K4W2"), (arch, f"moments-recfg/{dtype}/state")} <= names
        for light in (f"reduce-cfg/{dtype}/noclip/noz/out1B", f"reduce-cfg/{dtype}/noclip/noz/out1B/state",
                      f"moments-cfg/{dtype}", f"moments-cfg/{dtype}/state", f"moments-recfg/{dtype}"):
            assert (90, light) in names
    # per-row plans: the heaviest steps (with and without history or a rule) and the pre-pass on both arches, the
    # lightest CFG step on sm_90
    for dtype in ("fp32", "fp16", "bf16"):
        heavy = f"recfg/{dtype}/clip/z-{dtype}/out2B/rows"
        for arch in (90, 80):
            assert {(arch, heavy), (arch, heavy + "/hist-K4W2"), (arch, f"reduce-{heavy}/state"),
                    (arch, f"reduce-{heavy}/state/hist-K4W2"), (arch, f"moments-recfg/{dtype}/rows/state")} <= names
        light = f"cfg/{dtype}/noclip/noz/out1B/rows"
        assert {(90, light), (90, light + "/hist-K1W1")} <= names
    for dtype in ("fp16", "bf16"):
        assert {(90, f"recfg/{dtype}/table-fp32/clip/z-fp32/out2B/rows")} <= names


def _history_scalars(r) -> int:
    """The history's per-step scalars: K weights in x_next, W rows of 2 + K write coefficients and W slot indices
    (none for K = 1: the slot is clamped into [0, 1), so the compiler knows it is 0)."""
    k, w = r["hist_k"], r["hist_w"]
    return k + w * (2 + k) + (w if k > 1 else 0)


def _vectors(byte_sizes, elems_per_thread):
    """128-bit accesses a thread needs to move its elements of operands with these element sizes."""
    return sum(elems_per_thread * b // 16 for b in byte_sizes)


def _rule_scalars(r) -> int:
    """A REDUCE step's extra scalars: its row's NUM_M moment partials (one load each: NBP <= 256 threads) and the
    rule parameters it reads (ZERO_STAR, ETA, NORM_THRESHOLD, RESCALE; MOMENTUM only with a state)."""
    return r["num_moments"] + 4 + r["state"] if r["reduce"] else 0


def _without_rule(r, figures):
    """The same step without the rule (no REDUCE, no state)."""
    name = r["variant"].removeprefix("reduce-").replace("/state", "")
    return next(b for b in figures if b["arch"] == r["arch"] and b["variant"] == name)


def _steps(figures):
    return [r for r in figures if r["kernel"] == "step"]


def test_streamed_operands_use_128_bit_accesses_at_the_floor(figures):
    for r in _steps(figures):
        loads = {int(w): n for w, n in r["loads"].items()}
        stores = {int(w): n for w, n in r["stores"].items()}
        e = r["elems_per_thread"]
        assert loads.get(128, 0) == _vectors(r["read_bytes"], e), r
        assert stores == {128: _vectors(r["write_bytes"], e)}, r
        scalar = sum(n for w, n in loads.items() if w != 128)
        assert scalar <= MAX_SCALAR_LOADS + _history_scalars(r) + _rule_scalars(r), r
        if r["hist_k"]:  # the history adds exactly its scalars to the same variant without history
            base = next(b for b in figures if b["arch"] == r["arch"] and not b["hist_k"]
                        and b["variant"] == r["variant"].rsplit("/", 1)[0])
            base_scalar = sum(n for w, n in base["loads"].items() if int(w) != 128)
            assert scalar == base_scalar + _history_scalars(r), (r, base)
        if r["reduce"]:  # the rule adds exactly its partials and parameters to the same step without it
            base = _without_rule(r, figures)
            base_scalar = sum(n for w, n in base["loads"].items() if int(w) != 128)
            assert scalar == base_scalar + _rule_scalars(r), (r, base)
        assert all(w in (32, 64) for w in loads if w != 128), r  # scalars: fp32 values and int64 indices
        moved = 16 * (loads.get(128, 0) + stores[128]) / e
        assert moved == sum(r["read_bytes"]) + sum(r["write_bytes"]), r  # bytes per element = the floor


def _register_bound(r) -> int:
    if r["reduce"] or r["kernel"] == "moments":
        return RULE_REGS
    mixed = len(set(r["read_bytes"] + r["write_bytes"])) > 1
    return HISTORY_REGS if r["hist_k"] else MIXED_WIDTH_REGS if mixed else FULL_OCCUPANCY_REGS


def test_no_local_memory_and_registers_within_the_occupancy_bound(figures):
    for r in figures:
        assert r["local"] == 0 and r["local_accesses"] == 0 and r["stack"] == 0, r
        assert r["reg"] <= _register_bound(r), r


def test_rule_steps_stream_the_state_once_each_way(figures):
    """A REDUCE step reads the same streamed operands as the step without the rule, plus the rule state's one
    128-bit read and one 128-bit write per 16 bytes of elements when it has a state."""
    rule_steps = [r for r in _steps(figures) if r["reduce"]]
    assert rule_steps
    for r in rule_steps:
        base = _without_rule(r, figures)
        per_operand = r["elems_per_thread"] * r["write_bytes"][0] // 16  # the state shares the latent dtype
        assert r["loads"]["128"] == base["loads"]["128"] + r["state"] * per_operand, (r, base)
        assert r["stores"]["128"] == base["stores"]["128"] + r["state"] * per_operand, (r, base)


def test_moment_pre_pass_streams_its_inputs_once_and_writes_only_partials(figures):
    """The pre-pass's loop body loads one 128-bit vector per 16 bytes of each of c, u (+ the table rows, + the
    state) per thread; ptxas may unroll the loop, so the LDG.128 count is a whole multiple of that. Its only other
    loads are the table's per-program scalars (label row, two step rows, lerp weight), and it stores exactly its
    NUM_M float32 partials."""
    pre = [r for r in figures if r["kernel"] == "moments"]
    assert pre
    for r in pre:
        loads = {int(w): n for w, n in r["loads"].items()}
        stores = {int(w): n for w, n in r["stores"].items()}
        per_iteration = _vectors(r["read_bytes"], r["elems_per_thread"])
        assert loads[128] >= per_iteration and loads[128] % per_iteration == 0, r
        table = r["variant"].startswith("moments-recfg")
        assert sum(n for w, n in loads.items() if w != 128) == (4 if table else 0), r
        assert stores == {32: r["num_moments"]}, r


def test_history_variants_stream_k_more_reads_and_w_more_writes(figures):
    """The history's K slot reads and W slot writes are counted by the floor above; check here that they are
    really there: K more LDG.128 and W more STG.128 per 16 bytes of elements than the variant without history."""
    hist = [r for r in figures if r["hist_k"]]
    assert hist
    for r in hist:
        base = next(b for b in figures if b["arch"] == r["arch"] and not b["hist_k"] and b["kernel"] == "step"
                    and b["variant"] == r["variant"].rsplit("/", 1)[0])
        per_operand = r["elems_per_thread"] * r["write_bytes"][0] // 16  # history shares the latent dtype
        assert r["loads"]["128"] == base["loads"]["128"] + r["hist_k"] * per_operand, (r, base)
        assert r["stores"]["128"] == base["stores"]["128"] + r["hist_w"] * per_operand, (r, base)


def test_per_row_plans_make_the_same_accesses_as_one_plan_for_the_batch(figures):
    """Per-row plans only move each per-step scalar's pointer to the program's row (once per program), so a per-row
    variant makes exactly the accesses of its batch twin: the same LDG.128 / STG.128 counts, the same scalar loads
    (count and width), no local memory, and registers within the twin's bound."""
    per_row = [r for r in figures if r["per_row"]]
    assert per_row
    for r in per_row:
        name = r["variant"].replace("/rows", "")
        base = next(b for b in figures if b["arch"] == r["arch"] and b["variant"] == name and not b["per_row"])
        assert r["loads"] == base["loads"] and r["stores"] == base["stores"], (r, base)
        assert r["local"] == 0 and r["local_accesses"] == 0 and r["stack"] == 0, r
        assert r["reg"] <= _register_bound(base), (r, base)
