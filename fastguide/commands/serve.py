"""`fastguide serve`: the embedded digits model over HTTP, requests co-batched (fastguide.server over
fastguide.serving.Batcher).

    fastguide serve --port 8000
    curl -s localhost:8000/v1/samples -H 'content-type: application/json' \\
         -d '{"label": 7, "seed": 1, "steps": 8, "rule": "apg", "scale": 4}' -o seven.png

POST /v1/samples takes JSON {label, seed, steps, scale?, rule?, format? ("png" | "npy")} and returns the sample;
GET /health and GET /metrics (Prometheus text) report the queue and counters. Each sample depends only on its
request and the bucket size it ran in (response header X-Fastguide-Bucket). The port opens once the model is
loaded and every bucket and rule is warmed up; SIGTERM or Ctrl-C stop accepting, finish every request in flight
and exit 0. See docs/serving.md.
"""
from __future__ import annotations

import math
import time

from fastguide.commands import common

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(sub):
    from fastguide.demo.digits import SOLVER_HELP, SOLVERS

    p = sub.add_parser("serve", help="serve the digits model over HTTP (co-batched sampling requests)",
                       description=__doc__, formatter_class=common.HelpFormatter)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 (or ::) exposes the server, which has no authentication, to "
                        "every network this machine is on")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one; the listening line says which)")
    p.add_argument("--buckets", default="1,2,4,8,16,32,64",
                   help="increasing batch sizes a batch is padded to (each is a static shape, warmed up once)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long the oldest queued request waits for its batch to fill")
    p.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting at most; more are answered 503 with Retry-After")
    p.add_argument("--solver", default="unipc", choices=sorted(SOLVERS), help=SOLVER_HELP)
    p.add_argument("--scale", type=float, default=3.0, help="every rule's guidance scale when a request gives none")
    common.add_device_args(p)
    p.add_argument("--compile", action="store_true", help="Sampler.compile() the batcher's sampler")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --compile on CUDA: capture each (rule, bucket, loop length) as one CUDA graph; give "
                        "--step-buckets so there are few loop lengths")
    p.add_argument("--step-buckets", default=None, metavar="N,N,...",
                   help="loop lengths a batch is padded to (the last >= 50, the most steps accepted); default: each "
                        "batch runs its own most steps")
    p.add_argument("--continuous", action="store_true",
                   help="schedule steps instead of batches: requests of any rule join the running rows between steps "
                        "and leave after their own last step (no --cuda-graph / --step-buckets)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker threads, each with its own sampler, taking batches (or rows) from one queue; on a CPU "
                        "each gets cores / workers intra-op threads (2 one-thread workers beat 1 two-thread worker "
                        "on 2 cores; docs/serving.md)")
    p.add_argument("--no-warmup", action="store_true",
                   help="open the port without first running a batch of every bucket and rule (the first requests "
                        "of each shape then pay for it)")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                   help="uvicorn's log level on stderr (info adds one access line per request)")
    p.set_defaults(func=run)


def parse_buckets(text: str, option: str = "--buckets") -> tuple[int, ...]:
    try:
        buckets = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated sizes such as 1,4,16,64, got {text!r}") from None
    if not buckets or min(buckets) < 1 or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"{option}: expected increasing sizes >= 1 such as 1,4,16,64, got {text!r}")
    return buckets


def run(args) -> int:
    from fastguide.server import bind_socket, serve
    from fastguide.serving import digits_batcher

    buckets = parse_buckets(args.buckets)
    step_buckets = None if args.step_buckets is None else parse_buckets(args.step_buckets, "--step-buckets")
    if args.continuous and (args.cuda_graph or step_buckets is not None):
        raise ValueError("--continuous: steps are scheduled one at a time; it takes neither --cuda-graph nor "
                         "--step-buckets")
    if args.cuda_graph and not args.compile:
        raise ValueError("--cuda-graph: needs --compile (the graph captures the compiled loop)")
    if not (math.isfinite(args.max_wait_ms) and args.max_wait_ms >= 0):
        raise ValueError(f"--max-wait-ms: expected a finite number of milliseconds >= 0, got {args.max_wait_ms}")
    common.at_least(args.max_queue, "--max-queue", 1)
    common.at_least(args.workers, "--workers", 1)
    scale = common.check_scale(args.scale)
    device = common.resolve_device(args.device)
    if device.type == "cpu" and args.workers > 1:
        import torch

        torch.set_num_threads(common.worker_threads(args.workers))
    sock = bind_socket(args.host, args.port, option_prefix="--")  # before the model loads: a taken port fails at once
    try:
        batcher = digits_batcher(buckets=buckets, max_wait_s=args.max_wait_ms / 1e3, max_queue=args.max_queue,
                                 solver=args.solver, device=device, backend=args.backend, compile=args.compile,
                                 cuda_graph=args.cuda_graph, step_buckets=step_buckets, scale=scale,
                                 continuous=args.continuous, workers=args.workers)
        began = time.perf_counter()
        batcher.start(warmup=not args.no_warmup)
        if not args.no_warmup:
            print(f"fastguide serve: warmed up {len(batcher.rules)} rules x {len(buckets)} buckets"
                  + (f" x {args.workers} workers" if args.workers > 1 else "")
                  + f" in {time.perf_counter() - began:.1f} s", flush=True)
        serve(batcher, sock=sock, log_level=args.log_level,
              on_listening=lambda url: print(f"fastguide serve: listening on {url}", flush=True))
    finally:
        sock.close()
    counts = batcher.metrics()
    print(f"fastguide serve: stopped after {counts.completed} samples ({counts.failed} failed)", flush=True)
    return 0
