"""Roofline report for the fused guided-step kernel: one command fills benchmarks/RESULTS.md.

    python benchmarks/report_guided_step.py            # on a GPU: time the kernel vs eager and torch.compile
    python benchmarks/report_guided_step.py --write    # ... and replace the kernel section of RESULTS.md
    python benchmarks/report_guided_step.py --static   # no GPU needed: SASS figures (access widths, registers)

On a machine without CUDA the default run times the eager reference against torch.compile(reference) at
tiny sizes on the CPU; the kernel itself only runs there in the Triton interpreter (~1.5 ms per program),
which says nothing about its speed, so it is left out of the CPU table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

if not torch.cuda.is_available() and "--static" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernel import

import triton  # noqa: E402

from fastguide.bench.kernel import CPU_SHAPES, GPU_SHAPES, run_kernel_bench  # noqa: E402
from fastguide.kernels import guided_step as gs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- guided_step:begin -->", "<!-- guided_step:end -->"
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
RULES = ("cond", "cfg", "recfg")
ARCHES = (90, 80)
SM_REGISTERS, SM_MAX_THREADS = 65536, 2048  # sm_80 and sm_90: full occupancy needs <= 32 registers per thread


# ---------------------------------------------------------------------------- static (SASS) figures
HISTORY_VARIANTS = ((1, 1), (4, 2))  # (K slots read, W written): DPM-Solver++ 2M, UniPC-3 (the most the kernel runs)
PROOF_NBP = 64  # the rule variants' partials per row (gs.MAX_PARTIALS: the most a step program sums)


def static_variants() -> list[dict]:
    """Every rule x dtype, lightest (no clip, no z, out [B]) and heaviest (clip, z, out [2B]) form, plus the
    mixed-width operands the Sampler produces (float32 z, float32 tables with low-precision latents), plus the
    multistep history forms (K, W) in HISTORY_VARIANTS on the lightest CFG and the heaviest ReCFG step, plus the
    rules with per-sample reductions, plus per-row plans (``per_row_variants``)."""
    variants = []
    for dtype in TRITON_DTYPE:
        for rule in RULES:
            variants.append(dict(rule=rule, dtype=dtype, table_dtype=dtype, z_dtype=None, clip=False, out_rows=1))
            variants.append(dict(rule=rule, dtype=dtype, table_dtype=dtype, z_dtype=dtype, clip=True, out_rows=2))
    for dtype in (torch.float16, torch.bfloat16):
        variants.append(dict(rule="recfg", dtype=dtype, table_dtype=torch.float32, z_dtype=torch.float32, clip=True,
                             out_rows=2))
    for dtype in TRITON_DTYPE:
        for k, w in HISTORY_VARIANTS:
            variants.append(dict(rule="cfg", dtype=dtype, table_dtype=dtype, z_dtype=None, clip=False, out_rows=1,
                                 hist_k=k, hist_w=w))
            variants.append(dict(rule="recfg", dtype=dtype, table_dtype=dtype, z_dtype=dtype, clip=True, out_rows=2,
                                 hist_k=k, hist_w=w))
    variants += rule_variants()
    return variants + per_row_variants(variants)


def rule_variants() -> list[dict]:
    """The rules with per-sample reductions (``rule_params``): the REDUCE step kernel, lightest (CFG-style, no
    state, no clip, no z, out [B]) and heaviest (ReCFG lerp, the APG state, clip, z, out [2B], and that with the
    UniPC-3 history), and the moment pre-pass (rule_moments_kernel) without and with table and state, every dtype,
    plus the mixed-width forms (16-bit latents, float32 table / noise)."""
    variants = []
    for dtype in TRITON_DTYPE:
        step = dict(kernel="step", reduce=True, nbp=PROOF_NBP)
        variants.append(dict(step, rule="cfg", dtype=dtype, table_dtype=dtype, z_dtype=None, clip=False, out_rows=1,
                             state=False))
        variants.append(dict(step, rule="cfg", dtype=dtype, table_dtype=dtype, z_dtype=None, clip=False, out_rows=1,
                             state=True))
        variants.append(dict(step, rule="recfg", dtype=dtype, table_dtype=dtype, z_dtype=dtype, clip=True, out_rows=2,
                             state=True))
        variants.append(dict(step, rule="recfg", dtype=dtype, table_dtype=dtype, z_dtype=dtype, clip=True, out_rows=2,
                             state=True, hist_k=4, hist_w=2))
        for rule, state in (("cfg", False), ("cfg", True), ("recfg", False), ("recfg", True)):
            variants.append(dict(kernel="moments", rule=rule, dtype=dtype, table_dtype=dtype, state=state,
                                 nbp=PROOF_NBP))
    for dtype in (torch.float16, torch.bfloat16):
        variants.append(dict(kernel="step", reduce=True, nbp=PROOF_NBP, rule="recfg", dtype=dtype,
                             table_dtype=torch.float32, z_dtype=torch.float32, clip=True, out_rows=2, state=True))
        variants.append(dict(kernel="moments", rule="recfg", dtype=dtype, table_dtype=torch.float32, state=True,
                             nbp=PROOF_NBP))
    return variants


def per_row_variants(variants: list[dict]) -> list[dict]:
    """The per-row-plan twins (PER_ROW: coef [B, NUM_COEF], table_steps [B, 2], table_w [B], hist_coef [B, K],
    write_coef [B, W, 2 + K]) of the lightest CFG step (and with the DPM-Solver++ 2M history), the heaviest ReCFG
    step (also mixed-width, and with the UniPC-3 history), the heaviest REDUCE step (and with the UniPC-3 history)
    and the pre-pass with table and state, every dtype."""
    twins = []
    for v in variants:
        same_width = v["table_dtype"] == v["dtype"]
        if v.get("kernel") == "moments":
            pick = v["rule"] == "recfg" and v["state"] and same_width
        elif v.get("reduce"):
            pick = v["rule"] == "recfg" and v["state"] and same_width
        elif v["rule"] == "cfg":
            pick = v["out_rows"] == 1 and v.get("hist_k", 0) in (0, 1)
        else:
            pick = v["rule"] == "recfg" and v["out_rows"] == 2 and v.get("hist_k", 0) in (0, 4)
        if pick:
            twins.append(dict(v, per_row=True))
    return twins


def variant_name(v: dict) -> str:
    """rule/dtype/... for the step kernel (``reduce-`` before the rule for REDUCE steps, ``rows`` with per-row
    plans, ``state`` with a rule state); ``moments-<rule>/dtype/...`` for the pre-pass."""
    moments = v.get("kernel") == "moments"
    prefix = "moments-" if moments else "reduce-" if v.get("reduce") else ""
    parts = [prefix + v["rule"], TRITON_DTYPE[v["dtype"]]]
    if v["rule"] == "recfg" and v["table_dtype"] != v["dtype"]:
        parts.append(f"table-{TRITON_DTYPE[v['table_dtype']]}")
    if moments:
        return "/".join(parts + (["rows"] if v.get("per_row") else []) + (["state"] if v["state"] else []))
    parts += ["clip" if v["clip"] else "noclip", f"z-{TRITON_DTYPE[v['z_dtype']]}" if v["z_dtype"] else "noz",
              f"out{v['out_rows']}B"]
    if v.get("per_row"):
        parts.append("rows")
    if v.get("state"):
        parts.append("state")
    if v.get("hist_k"):
        parts.append(f"hist-K{v['hist_k']}W{v['hist_w']}")
    return "/".join(parts)


def streamed_operands(v: dict) -> tuple[list[torch.dtype], list[torch.dtype]]:
    """(dtypes of the streamed inputs read per element, dtypes of the outputs written per element).
    The second ReCFG table row is read only on lerp steps (it is predicated off on grid steps). A multistep step
    also reads its K history slots and writes W of them."""
    if v.get("kernel") == "moments":  # m_cond, m_uncond (+ table rows) (+ the rule state); writes only scalars
        reads = [v["dtype"], v["dtype"]] + [v["table_dtype"]] * (2 if v["rule"] == "recfg" else 0)
        return reads + [v["dtype"]] * v["state"], []
    reads = [v["dtype"], v["dtype"]]  # x, m_cond
    if v["rule"] != "cond":
        reads.append(v["dtype"])  # m_uncond
    if v["rule"] == "recfg":
        reads += [v["table_dtype"], v["table_dtype"]]  # table rows i0 and i1
    if v["z_dtype"] is not None:
        reads.append(v["z_dtype"])
    reads += [v["dtype"]] * v.get("hist_k", 0)  # the history slots
    reads += [v["dtype"]] * bool(v.get("state"))  # the rule state (read and written in place)
    return reads, [v["dtype"]] * (v["out_rows"] + v.get("hist_w", 0) + bool(v.get("state")))


def num_moments(v: dict) -> int:
    return gs.NUM_MOMENTS_STATE if v.get("state") else gs.NUM_MOMENTS_STATELESS


def _moments_signature(v: dict) -> tuple[dict, dict]:
    ptr = "*" + TRITON_DTYPE[v["dtype"]]
    recfg = v["rule"] == "recfg"
    sig = {"ws_ptr": "*fp32", "m_cond_ptr": ptr, "m_uncond_ptr": ptr, "state_ptr": ptr,
           "table_ptr": "*" + TRITON_DTYPE[v["table_dtype"]] if recfg else ptr,
           "rows_ptr": "*i64" if recfg else "*fp32", "steps_ptr": "*i64" if recfg else "*fp32", "w_ptr": "*fp32",
           "n_per_row": "i32", "blocks_per_partial": "i32", "table_k": "i32", "table_t": "i32"}
    block, _ = gs.launch_config(v["dtype"])
    constexprs = dict(HAS_TABLE=recfg, HAS_STATE=v["state"], NUM_M=num_moments(v), NBP=v["nbp"], BLOCK=block,
                      VEC=16 // torch.empty((), dtype=v["dtype"]).element_size(), PER_ROW=bool(v.get("per_row")))
    sig.update({k: "constexpr" for k in constexprs})
    return sig, constexprs


def _signature(v: dict) -> tuple[dict, dict]:
    if v.get("kernel") == "moments":
        return _moments_signature(v)
    ptr = "*" + TRITON_DTYPE[v["dtype"]]
    table = "*" + TRITON_DTYPE[v["table_dtype"]] if v["rule"] == "recfg" else ptr
    sig = {"out_ptr": ptr, "out2_ptr": ptr, "x_ptr": ptr, "m_cond_ptr": ptr, "m_uncond_ptr": ptr,
           "g1_ptr": "*fp32", "coef_ptr": "*fp32", "table_ptr": table,
           "rows_ptr": "*i64" if v["rule"] == "recfg" else "*fp32",
           "steps_ptr": "*i64" if v["rule"] == "recfg" else "*fp32", "w_ptr": "*fp32",
           "z_ptr": "*" + TRITON_DTYPE[v["z_dtype"]] if v["z_dtype"] else ptr,
           "hist_ptr": ptr, "hist_coef_ptr": "*fp32", "write_slots_ptr": "*i64" if v.get("hist_w") else "*fp32",
           "write_coef_ptr": "*fp32",
           "n_per_row": "i32", "table_k": "i32", "table_t": "i32", "clip_range": "fp32",
           "ws_ptr": "*fp32", "rule_params_ptr": "*fp32", "state_ptr": ptr, "n_partials": "i32"}
    block, _ = gs.launch_config(v["dtype"])
    constexprs = dict(HAS_UNCOND=v["rule"] != "cond", HAS_TABLE=v["rule"] == "recfg", CLIP=v["clip"],
                      HAS_Z=v["z_dtype"] is not None, TWO_OUT=v["out_rows"] == 2, BLOCK=block,
                      HIST_K=v.get("hist_k", 0), HIST_W=v.get("hist_w", 0), REDUCE=bool(v.get("reduce")),
                      HAS_STATE=bool(v.get("state")), NUM_M=num_moments(v), NBP=v.get("nbp", 1),
                      PER_ROW=bool(v.get("per_row")))
    sig.update({k: "constexpr" for k in constexprs})
    return sig, constexprs


def compile_cubin(v: dict, arch: int) -> bytes:
    """AOT-compile the production kernel with the specialization the launcher gets for 16-byte aligned
    pointers and a per-row size divisible by 16 (tt.divisibility 16 on every pointer and on n_per_row)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_cubin: unset TRITON_INTERPRET (the interpreter wraps the kernel)")
    from triton.backends.compiler import GPUTarget

    sig, constexprs = _signature(v)
    kernel = gs.rule_moments_kernel if v.get("kernel") == "moments" else gs.guided_step_kernel
    names = kernel.arg_names
    aligned = [n for n in sig if n.endswith("_ptr")] + ["n_per_row"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    _, num_warps = gs.launch_config(v["dtype"])
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.asm["cubin"]


def _nvidia_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_ACCESS = re.compile(r"\b(LDG|STG|LDL|STL)((?:\.[A-Z0-9_]+)*)")


def sass_stats(cubin: bytes) -> dict:
    """Global/local accesses by width (bits) and resource usage, from cuobjdump of one cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    counts: dict[str, dict[int, int]] = {"LDG": {}, "STG": {}, "LDL": {}, "STL": {}}
    for op, mods in _ACCESS.findall(sass):
        width = 128 if ".128" in mods else 64 if ".64" in mods else 16 if "16" in mods else 8 if "8" in mods else 32
        counts[op][width] = counts[op].get(width, 0) + 1
    usage = {k.lower(): int(n) for k, n in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", sass)}
    return {"loads": counts["LDG"], "stores": counts["STG"], "local_accesses": sum(counts["LDL"].values()) +
            sum(counts["STL"].values()), **usage}


def _heaviest(v: dict) -> bool:
    """The forms older arches get: out [2B] steps (clip, z) and the pre-pass with table and state."""
    if v.get("kernel") == "moments":
        return v["rule"] == "recfg" and v["state"]
    return v["out_rows"] == 2


def static_report(arches=ARCHES) -> list[dict]:
    """sm_90 gets every variant; older arches the heaviest form of each rule and dtype (fewer disassemblies)."""
    jobs = [(v, arch, compile_cubin(v, arch)) for arch in arches for v in static_variants()
            if arch == arches[0] or _heaviest(v)]
    with ThreadPoolExecutor(8) as pool:  # cuobjdump mostly waits; overlap the calls
        stats = list(pool.map(sass_stats, [cubin for _, _, cubin in jobs]))
    rows = []
    for (v, arch, _), st in zip(jobs, stats):
        reads, writes = streamed_operands(v)
        block, num_warps = gs.launch_config(v["dtype"])
        rows.append(dict(variant=variant_name(v), arch=arch, block=block, num_warps=num_warps,
                         elems_per_thread=block // (32 * num_warps), hist_k=v.get("hist_k", 0),
                         hist_w=v.get("hist_w", 0), kernel=v.get("kernel", "step"), reduce=bool(v.get("reduce")),
                         state=bool(v.get("state")), per_row=bool(v.get("per_row")),
                         num_moments=num_moments(v) if v.get("nbp") else 0,
                         read_bytes=[torch.empty((), dtype=d).element_size() for d in reads],
                         write_bytes=[torch.empty((), dtype=d).element_size() for d in writes], **st))
    return rows


def static_markdown(rows: list[dict]) -> str:
    lines = ["| variant | sm | bytes/elem read+write (floor) | LDG.128 / STG.128 per thread | other LDG / STG "
             "(scalars) | REG | LOCAL |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{sum(r['read_bytes'])}+{sum(r['write_bytes'])}"
        other = sum(n for w, n in r["loads"].items() if int(w) != 128)
        other_st = sum(n for w, n in r["stores"].items() if int(w) != 128)
        lines.append(f"| {r['variant']} | {r['arch']} | {floor} | {r['loads'].get(128, 0)} / "
                     f"{r['stores'].get(128, 0)} | {other} / {other_st} | {r['reg']} | {r['local']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- timed runs
def gpu_report() -> str:
    rows = run_kernel_bench("cuda", GPU_SHAPES, [torch.float32, torch.bfloat16])
    lines = [f"Copy bandwidth (measured, read + write): {rows[0]['copy_bw_gbs']:.0f} GB/s.", "",
             "| shape | dtype | rule | floor us | triton us | % copy BW | eager us | compiled us | x eager "
             "| x compiled | triton host us/call |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['rule']} | {r['floor_us']:.2f} | {r['triton_us']:.2f} | "
                     f"{r['pct_copy_bw']:.0f}% | {r['eager_us']:.2f} | {r['compiled_us']:.2f} | {r['x_eager']:.1f} | "
                     f"{r['x_compiled']:.2f} | {r['triton_host_us']:.1f} |")
    return "\n".join(lines)


def cpu_report() -> str:
    rows = run_kernel_bench("cpu", CPU_SHAPES, [torch.float32])
    lines = ["**GPU numbers: unmeasured** (this run had no GPU). Run this script on a GPU to fill in GPU time per "
             "step, % of copy bandwidth, speed-ups and host time per call.", "",
             "CPU only: eager reference vs torch.compile(reference), wall time per call. The Triton kernel runs "
             "here only in the interpreter, which measures nothing about its GPU speed, so it is not timed. "
             "Best of 5 rounds; the CPU is small and shared, so treat these as rough.", "",
             "| shape | dtype | rule | eager us | compiled us |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {tuple(r['shape'])} | {r['dtype']} | {r['rule']} | {r['eager_us']:.0f} | {r['compiled_us']:.0f} |")
    return "\n".join(lines)


def _static_in_subprocess(as_json: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = [sys.executable, __file__, "--static"] + (["--json"] if as_json else [])
    return subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout


STATIC_NOTE = (
    "Compiled ahead of time (triton.compile, GPUTarget cuda 90 / 80) with the launcher's specialization for "
    "16-byte aligned pointers and a per-row size divisible by 16, disassembled with triton's cuobjdump; "
    "tests/kernels/test_guided_step_sass.py asserts these properties on every CI run. Bytes per latent element "
    "(B x C x H x W): reads + writes; recfg counts both table rows (a lerp step), a grid step reads one "
    "(the second row's load is predicated off). LDG.128 / STG.128 are 16-byte accesses per thread, one per "
    "streamed operand per 16 bytes of its elements (exactly the floor); the other loads are per-program "
    "scalars (g1, label row, step rows, coefficients). REG <= 32 means full occupancy on sm_80 / sm_90 "
    "(2048 threads x 32 = 65536 registers); the mixed-width variants (16-bit latents, float32 table and "
    "noise, as the Sampler passes them today) need 46-48 (62.5% occupancy, 9 loads in flight per thread). "
    "hist-KkWw: a multistep step that also reads its K history slots and writes W of them (K + W more 128-bit "
    "accesses per thread, and K + W (2 + K) more scalar loads, the history weights and write coefficients, plus W "
    "slot indices when K > 1); "
    "these need up to 64 registers (50% occupancy, 1024 threads per SM with 4-10 loads in flight each). "
    "reduce-*: the step of a rule with per-sample reductions (rule_params; state: APG's running average, one more "
    "128-bit read and write), which loads its row's NUM_M moment partials (5, 9 with a state) and 4-5 rule parameters "
    "as scalars; moments-*: its pre-pass, one 128-bit load per 16 bytes of m_cond, m_uncond (+ table rows, + state) "
    "per loop iteration (ptxas may unroll the loop: a whole multiple of that) and NUM_M scalar stores; both <= 64 "
    "registers. "
    "rows: per-row plans (each row its own solver plan: coef [B, NUM_COEF], table_steps [B, 2], table_w [B], "
    "hist_coef [B, K], write_coef [B, W, 2 + K]), whose scalars are loaded once per program at the row's offset: "
    "the same accesses as the variant without rows. "
    "Launch: BLOCK = 8 warps x 32 threads x (16 bytes / element size) elements, grid (blocks per row, B); the "
    "pre-pass grid (partials per row <= 64, B).")


def versions() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU only)"
    return (f"Device: {dev}; torch {torch.__version__}, triton {triton.__version__}, "
            f"date {datetime.date.today().isoformat()}.")


def write_section(text: str) -> None:
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{BEGIN}\n{text.strip()}\n{END}"
    if BEGIN in body and END in body:
        body = body[:body.index(BEGIN)] + section + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + "\n\n" + section + "\n"
    RESULTS.write_text(body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--static", action="store_true", help="only the SASS figures (no GPU needed)")
    p.add_argument("--json", action="store_true", help="with --static: print the raw figures as JSON")
    p.add_argument("--write", action="store_true", help="replace the guided_step section of RESULTS.md")
    args = p.parse_args(argv)
    if args.static:
        rows = static_report()
        print(json.dumps(rows) if args.json else static_markdown(rows))
        return 0
    timed = gpu_report() if torch.cuda.is_available() else cpu_report()
    text = "\n\n".join(["## Fused guided step (benchmarks/report_guided_step.py)", versions(), timed,
                        "### Static figures (SASS of the production kernel)", STATIC_NOTE, _static_in_subprocess(False)])
    print(text)
    if args.write:
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
