"""Render `fastguide bench --json` results as markdown tables (and optionally into benchmarks/RESULTS.md).

    fastguide bench --model dit --model digits --json bench.json     # on a GPU: NFE 4/8/16, batch 1/8/64
    python benchmarks/report_sampler.py bench.json [more.json ...]   # print the tables + the goal checks
    python benchmarks/report_sampler.py bench.json --write           # ... into RESULTS.md (own section)
    python -m pytest benchmarks/bench_sampler.py --benchmark-enable --benchmark-json pb.json
    python benchmarks/report_sampler.py pb.json --write              # the pytest-benchmark suite's medians

One table per (model, NFE): a row per mode, a column per batch, images/s and measured / floor; then the
speed goals of the sampler issue (#9), checked here on the rows (the library itself holds no thresholds).
The section is keyed by the device kind (cpu / cuda), so a GPU run does not overwrite the CPU one.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
NFE = 10  # benchmarks/bench_sampler.py's step count


# The speed goals of the sampler issue (#9): (numerator mode, denominator mode, bound, batch or None for every
# batch). On a CPU only the first applies.
CPU_GOALS = [("fastguide_compiled", "diffusers_eager", 1.5, None)]
GPU_GOALS = [("fastguide_graph", "floor", 0.97, None), ("fastguide_graph", "diffusers_compiled", 1.10, 8),
             ("fastguide_recfg", "fastguide_graph", 0.98, None), ("fastguide_interval", "floor", 1.3, 64)]


def goals(rows: list[dict], device: str) -> list[dict]:
    """The goals checked on bench rows: {"goal", "measured", "met"} per goal and point; met is None (and
    measured "not measured") where the rows lack a mode the goal needs."""
    by = {(r["model"], r["mode"], r["batch"], r["nfe"]): r["images_per_s"] for r in rows}
    out = []
    for model, batch, nfe in sorted({(r["model"], r["batch"], r["nfe"]) for r in rows}):
        for num, den, bound, only in (GPU_GOALS if device == "cuda" else CPU_GOALS):
            if only is not None and batch != only:
                continue
            a, b = by.get((model, num, batch, nfe)), by.get((model, den, batch, nfe))
            goal = f"{num} / {den} >= {bound:g} ({model} B={batch} NFE={nfe})"
            if a is None or b is None:
                out.append({"goal": goal, "measured": "not measured", "met": None})
            else:
                out.append({"goal": goal, "measured": f"{a / b:.3f}", "met": a / b >= bound})
    return out


def render(report: dict) -> str:
    meta, rows = report["meta"], report["rows"]
    lines = [f"Device: {meta['device_name']} ({meta['device']}, {meta.get('threads', '?')} CPU threads), "
             f"torch {meta['torch']}, date {meta['date']}. Images/s, median of interleaved repetitions; "
             "`x/floor` = measured / floor images/s; warm-up = the mode's first call in the run (compile, capture; "
             "inductor's on-disk cache may be warm from earlier modes).", ""]
    for model, nfe in sorted({(r["model"], r["nfe"]) for r in rows}):
        sel = [r for r in rows if r["model"] == model and r["nfe"] == nfe]
        batches = sorted({r["batch"] for r in sel})
        modes = list(dict.fromkeys(r["mode"] for r in sel))
        lines += [f"**{model}, NFE {nfe}**", "",
                  "| mode | " + " | ".join(f"B = {b}: img/s (x/floor)" for b in batches) + " | warm-up s |",
                  "|---|" + "---|" * (len(batches) + 1)]
        for m in modes:
            cells, warm = [], []
            for b in batches:
                r = next((r for r in sel if r["mode"] == m and r["batch"] == b), None)
                if r is None:
                    cells.append("-")
                    continue
                vs = f" ({r['vs_floor']:.2f})" if r.get("vs_floor") is not None else ""
                cells.append(f"{r['images_per_s']:.1f}{vs}")
                if r.get("warmup_s") is not None:
                    warm.append(r["warmup_s"])
            warm_cell = f"{min(warm):.1f}-{max(warm):.1f}" if warm else ""
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {warm_cell} |")
        lines.append("")
    checks = goals(rows, meta["device"])
    if checks:
        mark = {True: "met", False: "**not met**", None: "not measured"}
        lines += ["| goal | measured | |", "|---|---|---|"]
        lines += [f"| {g['goal']} | {g['measured']} | {mark[g['met']]} |" for g in checks]
    return "\n".join(lines).rstrip() + "\n"


def render_pytest_benchmark(report: dict) -> str:
    """benchmarks/bench_sampler.py's --benchmark-json: end-to-end medians and their ratio to the diffusers-style
    eager loop, and the per-step overhead net of the stub network (vs the diffusers-style loop's)."""
    med = {(b["params"]["mode"], b["params"]["batch"], b["group"].split("-")[0]): b["stats"]["median"]
           for b in report["benchmarks"]}
    info = report.get("machine_info", {})
    lines = [f"pytest-benchmark, one run ({report.get('datetime', '?')[:10]}, {info.get('cpu', {}).get('brand_raw', '?')}, "
             f"python {info.get('python_version', '?')}); medians of each case's rounds, cases run one after another "
             "(not interleaved).", ""]
    batches = sorted({k[1] for k in med})
    e2e = [m for m in ("diffusers_eager", "fastguide_eager", "fastguide_compiled") if (m, batches[0], "e2e") in med]
    if e2e:
        lines += ["| end to end, NFE 10 | " + " | ".join(f"B = {b}: ms (vs diffusers eager)" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for m in e2e:
            cells = []
            for b in batches:
                t, base = med.get((m, b, "e2e")), med.get(("diffusers_eager", b, "e2e"))
                cells.append("-" if t is None else f"{t * 1e3:.1f} ({base / t:.2f}x)")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    net_of = {"diffusers_eager": "network_eager", "fastguide_eager": "network_eager",
              "fastguide_fused": "network_compiled"}
    if ("diffusers_eager", batches[0], "overhead") in med:
        lines += ["| overhead per step, net of the stub network | " + " | ".join(
            f"B = {b}: us (vs diffusers)" for b in batches) + " |", "|---|" + "---|" * len(batches)]
        for m, net in net_of.items():
            cells = []
            for b in batches:
                try:
                    us = (med[(m, b, "overhead")] - med[(net, b, "overhead")]) / NFE * 1e6
                    base = (med[("diffusers_eager", b, "overhead")] - med[("network_eager", b, "overhead")]) / NFE * 1e6
                    cells.append(f"{us:.1f} ({us / base:.2f})")
                except KeyError:
                    cells.append("-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines).rstrip() + "\n"


def write_section(text: str, kind: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- bench-{kind}:begin -->", f"<!-- bench-{kind}:end -->"
    block = f"{begin}\n{text}{end}"
    doc = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in doc:
        doc = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json_paths", nargs="+", metavar="json_path",
                   help="files written by `fastguide bench --json` on one device kind (merged into one section)")
    p.add_argument("--write", action="store_true", help="replace this device kind's section of RESULTS.md")
    p.add_argument("--results", default=str(RESULTS), help="the markdown file --write edits")
    args = p.parse_args(argv)
    reports = []
    for path in args.json_paths:
        try:
            report = json.loads(Path(path).read_text())
            if "benchmarks" in report:  # pytest-benchmark's --benchmark-json of benchmarks/bench_sampler.py
                text = render_pytest_benchmark(report)
                print(text)
                if args.write:
                    write_section(text, "pytest", Path(args.results))
                    print(f"wrote the bench-pytest section of {args.results}")
                continue
            rows, kind = report["rows"], report["meta"]["device"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"json_path: expected a `fastguide bench --json` file, {path}: {e}", file=sys.stderr)
            return 2
        if not rows or "images_per_s" not in rows[0]:
            print(f"json_path: no end-to-end rows in {path} (an --overhead file?)", file=sys.stderr)
            return 2
        reports.append(report)
    if not reports:
        return 0
    kinds = {r["meta"]["device"] for r in reports}
    if len(kinds) > 1:
        print(f"json_path: results from different device kinds {sorted(kinds)}; render them separately",
              file=sys.stderr)
        return 2
    report = {"meta": reports[0]["meta"], "rows": [row for r in reports for row in r["rows"]]}
    text = render(report)
    print(text)
    if args.write:
        write_section(text, kind, Path(args.results))
        print(f"wrote the bench-{kind} section of {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
