"""`fastguide bench`: end-to-end images/s of fastguide vs a diffusers-style loop on the same network
(default), the sampler's per-step overhead (--overhead), or one guided step: the fused kernel vs the
reference (--kernel). Prints a table; --json writes it."""
from __future__ import annotations

import json
import platform
from datetime import date

import torch

from fastguide.bench.end_to_end import BENCH_SOLVERS, MODES
from fastguide.bench.overhead import BENCH_RULES
from fastguide.commands import common


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark sampling throughput (printed table + optional JSON)",
                       description=__doc__)
    p.add_argument("--model", choices=["digits", "dit"], action="append",
                   help="network(s) to benchmark (default: digits; dit = DiT-XL/2-shaped on CUDA, a miniature on CPU)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch", type=int, action="append", help="batch size(s) (default 1, 16, 64 on CPU; 1, 8, 64 on CUDA)")
    p.add_argument("--nfe", type=int, action="append", help="steps (default 10 on CPU; 4, 8, 16 on CUDA)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (median reported)")
    p.add_argument("--mode", action="append", metavar="MODE",
                   help="only these modes (repeatable; default all). One of: " + ", ".join(MODES))
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (a smoke run)")
    p.add_argument("--overhead", action="store_true",
                   help="instead: per-step sampler overhead (the network replaced by a stub) vs a diffusers-style loop")
    p.add_argument("--kernel", action="store_true",
                   help="instead: one guided step, fused Triton kernel vs eager / compiled reference (GPU time, %% of "
                        "copy bandwidth, host time; on a CPU only the reference and its compiled form)")
    p.add_argument("--solver", choices=BENCH_SOLVERS, action="append",
                   help="solver(s), each timed against the diffusers scheduler that steps like it (default: ddim)")
    p.add_argument("--rule", choices=BENCH_RULES, action="append",
                   help="--overhead: guidance rule(s), each against the diffusers guider for it (default: cfg)")
    p.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    from fastguide.bench.end_to_end import MODE_HELP, format_rows, rows_as_dicts, run_end_to_end, tiny_dit

    device = common.resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    if args.json_path:
        common.check_out_file(args.json_path, "--json", suffix=None)
    cuda = device == "cuda"
    batches = args.batch or ([1, 4] if args.quick else ([1, 8, 64] if cuda else [1, 16, 64]))
    nfes = args.nfe or ([2] if args.quick else ([4, 8, 16] if cuda else [10]))
    for name, vals in (("--batch", batches), ("--nfe", nfes)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{name}: expected values >= 1, got {vals}")
    if args.rule and not args.overhead:
        raise ValueError("--rule: picks the --overhead run's guidance rules")
    if args.mode and (args.overhead or args.kernel):
        raise ValueError("--mode: picks end-to-end modes; --overhead and --kernel time their own fixed sets")
    if args.overhead and args.kernel:
        raise ValueError("--kernel: choose one of --kernel and --overhead")
    bad = sorted(set(args.mode or []) - set(MODES))
    if bad:
        raise ValueError(f"--mode: unknown {bad}; expected some of {', '.join(MODES)}")
    if args.reps < 1:
        raise ValueError(f"--reps: expected >= 1, got {args.reps}")
    reps = 2 if args.quick else args.reps
    if args.overhead:
        return _overhead(args, device, batches, nfes, reps)
    if args.kernel:
        return _kernel(args, device)
    rows = []
    for model in args.model or ["digits"]:
        if model == "digits":
            from fastguide.demo.digits import digits_schedule, load_digits_model

            net, schedule = load_digits_model(device=device), digits_schedule()
            shape, null, classes, dtype = (1, 8, 8), 10, 10, torch.float32
        else:
            import fastguide as fg

            dtype = torch.float16 if cuda else torch.float32
            net, shape = tiny_dit(device, dtype, full=cuda and not args.quick)
            schedule, null, classes = fg.NoiseSchedule.linear(), net.null_label, 1000
        for solver in args.solver or ["ddim"]:
            rows += run_end_to_end(net, schedule, shape, model_name=model, batches=batches, nfes=nfes, device=device,
                                   dtype=dtype, null_label=null, num_classes=classes, reps=reps,
                                   modes=tuple(args.mode) if args.mode else MODES,
                                   warmup=1 if args.quick else 2, solver=solver)
    print(format_rows(rows))
    print("\n".join(f"  {m}: {h}" for m, h in MODE_HELP.items() if any(r.mode == m for r in rows)))
    _write_json(args.json_path, device, rows_as_dicts(rows))
    return 0


def _overhead(args, device, batches, nfes, reps) -> int:
    import fastguide as fg
    from fastguide.bench.overhead import run_overhead

    rows = []
    for rule in args.rule or ["cfg"]:
        for solver in args.solver or ["ddim"]:
            for nfe in nfes:
                rows += run_overhead(fg.NoiseSchedule.linear(timestep_spacing="trailing"), (1, 8, 8), batches=batches,
                                     nfe=nfe, device=device, reps=reps, block=5 if args.quick else 20,
                                     solver_name=solver, rule_name=rule)
    print(f"{'mode':18s} {'rule':14s} {'solver':8s} {'B':>4s} {'NFE':>4s} {'us/step':>9s} {'network':>9s} "
          f"{'overhead':>9s} {'vs diffusers':>13s}")
    for r in rows:
        print(f"{r['mode']:18s} {r['rule']:14s} {r['solver']:8s} {r['batch']:4d} {r['nfe']:4d} {r['us_per_step']:9.1f} "
              f"{r['network_us_per_step']:9.1f} {r['overhead_us_per_step']:9.1f} {r['vs_diffusers']:13.2f}")
    print("overhead = us/step minus the stub network's own calls (compiled for fastguide_fused); per-call setup "
          "is spread over the NFE steps")
    _write_json(args.json_path, device, rows)
    return 0


def _kernel(args, device) -> int:
    from fastguide.bench.kernel import format_kernel_rows, run_kernel_bench

    shapes = [(2, 4, 8, 8)] if args.quick else None
    rows = run_kernel_bench(device, shapes=shapes, calls=5 if args.quick else None)
    print(format_kernel_rows(rows))
    if device == "cpu":
        print("CPU: wall us per call of the reference eager and compiled; the Triton kernel's GPU time needs CUDA")
    _write_json(args.json_path, device, rows)
    return 0


def _write_json(path, device, rows) -> None:
    if not path:
        return
    cuda = device == "cuda"
    meta = {"date": date.today().isoformat(), "torch": torch.__version__, "device": device,
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads()}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {path}")

