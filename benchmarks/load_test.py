"""A bounded load test of `fastguide serve` on loopback (the serving issue's goals).

    python benchmarks/load_test.py [--requests 2000] [--concurrency 64] [--malformed-fraction 0.05]
        [--buckets 1,2,4,8,16,32,64] [--max-wait-ms 10] [--time-limit 600] [--out benchmarks/load-test-cpu.json]

Starts `python -m fastguide serve` on a free loopback port (warmed up unless --no-warmup) and sends --requests
requests from --concurrency threads, each with one keep-alive http.client connection: --malformed-fraction of them
malformed (a random mix of kinds), the others valid with NFE 4..10, random labels, scales, rules (cfg, apg,
recfg-ls) and formats (npy, png), each with its own seed. Checks that every request is answered exactly once
(valid: 200 with the bucket header; malformed: 4xx), that the server's counters agree (submitted = completed = the
valid requests, none failed or rejected; as many 2xx / 4xx responses as requests of each kind), that a random
spot check of the npy responses equals ``Batcher.sample_alone`` at the reported bucket bit for bit, and that the
server exits 0 on SIGTERM.

Reports p50 / p99 latency (valid requests, send to last byte) and images/s (valid results over the load's wall
time) against the baseline, measured in this process before the server starts and after it stopped (the mean of
the two): one direct ``Sampler.sample`` call at B = the largest bucket and NFE 10 (digits model, UniPC, CFG g = 3;
median of --baseline-reps), and one full-bucket batch as the batcher runs it (``Batcher.sample_alone`` at that
bucket: padding rows and per-row plans included). Goals: images/s >= 0.8x the direct call's; p99 <= max-wait
+ 2 batch times (with either batch time). Also where the cores went during the load (Linux: per-thread CPU
seconds from /proc): the client, the server's event loop, its sampling threads and idle, with load / direct split
into a contention factor (the cores the sampling kept busy against the direct call's) and an efficiency factor
(images per sampling CPU-second against the direct call's). Exit code 0 when every check passes (the goals are
reported, not enforced), 1 otherwise.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from fastguide.commands.common import available_cores, worker_threads

LOAD_RULES = ("cfg", "apg", "recfg-ls")
NFE_RANGE = (4, 10)
BASELINE_NFE = 10
CONTINUOUS_TOLERANCE = 1e-3  # digits samples in [-1, 1]; batch-size rounding of the UNet compounded over <= 10 steps
LISTENING = "fastguide serve: listening on "
JSON_TYPE = {"content-type": "application/json"}

# name -> (method, path, body, headers): each is refused with a 4xx
MALFORMED = {
    "bad-json": ("POST", "/v1/samples", b'{"label": 3, "seed": ', JSON_TYPE),
    "array-body": ("POST", "/v1/samples", b"[3, 1, 4]", JSON_TYPE),
    "missing-seed": ("POST", "/v1/samples", b'{"label": 3, "steps": 4}', JSON_TYPE),
    "negative-seed": ("POST", "/v1/samples", b'{"label": 3, "seed": -1, "steps": 4}', JSON_TYPE),
    "float-seed": ("POST", "/v1/samples", b'{"label": 3, "seed": 1.5, "steps": 4}', JSON_TYPE),
    "steps-zero": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 0}', JSON_TYPE),
    "steps-1000": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 1000}', JSON_TYPE),
    "label-10": ("POST", "/v1/samples", b'{"label": 10, "seed": 1, "steps": 4}', JSON_TYPE),
    "scale-negative": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "scale": -2}', JSON_TYPE),
    "unknown-rule": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "rule": "magic"}', JSON_TYPE),
    "unknown-format": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "format": "gif"}', JSON_TYPE),
    "unknown-field": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "size": 9}', JSON_TYPE),
    "wrong-content-type": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4}',
                           {"content-type": "text/plain"}),
    "too-large": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "rule": "' + b"x" * 20000 + b'"}',
                  JSON_TYPE),
    "wrong-method": ("GET", "/v1/samples", None, {}),
    "unknown-path": ("POST", "/v1/sample", b'{"label": 3, "seed": 1, "steps": 4}', JSON_TYPE),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m fastguide serve --host 127.0.0.1 --port <free> *serve_args` as a context manager: entering waits
    (at most ``timeout`` s) for its listening line; :meth:`stop` sends SIGTERM and returns its exit code; leaving
    stops it if it still runs. stdout lines are kept in ``lines``; stderr goes to a temporary file."""

    def __init__(self, *serve_args: str, timeout: float = 120.0):
        self.serve_args, self.timeout = serve_args, timeout
        self.lines: list[str] = []
        self.port = self.proc = None

    def __enter__(self) -> "ServerProcess":
        self.port = free_port()
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastguide", "serve", "--host", "127.0.0.1", "--port",
                                      str(self.port), *self.serve_args], stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True)
        listening: queue.Queue = queue.Queue()

        def read_stdout():  # drains stdout for the whole run, so the server never blocks on a full pipe
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith(LISTENING):
                    listening.put(line)
            listening.put(None)

        self._reader = threading.Thread(target=read_stdout, daemon=True)
        self._reader.start()
        try:
            line = listening.get(timeout=self.timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.__exit__()  # stops the server; its stderr is read after it stopped, before the file is closed
            raise RuntimeError(f"fastguide serve did not start listening within {self.timeout:g} s (exit code "
                               f"{self.proc.returncode}): {self._stderr_tail}")
        return self

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()

    def connection(self, timeout: float = 120.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(10)  # every line it printed is in self.lines
        return code

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            try:
                self.stop(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr_tail = self.stderr()[-2000:]
        self._stderr.close()


def exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None):
    """(status, lower-cased headers, body) of one request on ``conn`` (kept alive unless the server closes it)."""
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    content = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, content


def prometheus_samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value of every sample line of a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def thread_cpu_seconds(pid: int) -> dict[int, float] | None:
    """Thread id -> CPU seconds (user + system) of every thread of process ``pid`` so far, from /proc; None where
    there is no /proc (not Linux). A thread that exited since is missing: its seconds are lost to the caller."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    out = {}
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread exited meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)
    return out


def cpu_split(server_pid: int, before: dict, after: dict, client_s: float, wall: float, images: int,
              direct: dict) -> dict:
    """Where this machine's cores went during the load: the client process, the server's main thread (uvicorn's
    event loop: HTTP, JSON, encoding), its other threads (the batcher and its intra-op threads: the sampling),
    idle; and the load / direct ratio as the product of two factors: ``contention``, the cores the sampling kept
    busy against the cores the direct call keeps busy, and ``efficiency``, images per sampling CPU-second against
    the direct call's (padding, per-row plans, threads waiting on each other on a shared machine)."""
    def delta(tids):
        return sum(after.get(t, 0.0) - before.get(t, 0.0) for t in tids)

    cores = available_cores()
    event_loop = delta([server_pid])
    other_threads = sorted((delta([t]) for t in set(after) - {server_pid}), reverse=True)
    sampling = sum(other_threads)
    direct_images_per_cpu_s = direct["batch"] / (direct["direct_batch_s"] * direct["direct_cores_busy"])
    return {"cores": cores, "client_cpu_s": client_s, "server_event_loop_cpu_s": event_loop,
            "server_sampling_cpu_s": sampling,
            "server_other_threads_cpu_s": other_threads,
            "idle_cpu_s": cores * wall - client_s - event_loop - sampling,
            "direct_cores_busy": direct["direct_cores_busy"],
            "contention": sampling / wall / direct["direct_cores_busy"],
            "efficiency": images / sampling / direct_images_per_cpu_s if sampling > 0 else float("nan")}


def plan_requests(count: int, malformed_fraction: float, seed: int) -> list[dict]:
    """The load: ``count`` requests in random order, round(count * malformed_fraction) of them malformed."""
    rng = random.Random(seed)
    malformed = set(rng.sample(range(count), round(count * malformed_fraction)))
    plan = []
    for i in range(count):
        if i in malformed:
            plan.append({"index": i, "malformed": rng.choice(sorted(MALFORMED))})
        else:
            plan.append({"index": i, "label": rng.randrange(10), "seed": 1_000_000 + i,
                         "steps": rng.randint(*NFE_RANGE), "scale": round(rng.uniform(1.0, 5.0), 2),
                         "rule": rng.choice(LOAD_RULES), "format": "png" if rng.random() < 0.2 else "npy"})
    return plan


def run_load(server: ServerProcess, plan: list[dict], concurrency: int, time_limit: float) -> tuple[list, float]:
    """Send ``plan`` at ``concurrency``; one outcome dict per request, in plan order, and the load's wall seconds."""
    outcomes: list = [None] * len(plan)
    local, connections = threading.local(), []
    deadline = time.monotonic() + time_limit

    def send(item):
        if time.monotonic() > deadline:
            outcome = {"answered": False, "error": "not sent: --time-limit reached"}
        else:
            if not hasattr(local, "conn"):
                local.conn = server.connection(timeout=time_limit)
                connections.append(local.conn)
            if "malformed" in item:
                method, path, body, headers = MALFORMED[item["malformed"]]
            else:
                method, path, headers = "POST", "/v1/samples", JSON_TYPE
                body = json.dumps({k: item[k] for k in ("label", "seed", "steps", "scale", "rule", "format")}).encode()
            began = time.perf_counter()
            try:
                status, response_headers, content = exchange(local.conn, method, path, body, headers)
                outcome = {"answered": True, "status": status, "headers": response_headers, "body": content}
            except (OSError, http.client.HTTPException) as e:
                local.conn.close()
                outcome = {"answered": False, "error": f"{type(e).__name__}: {e}"}
            outcome.update(began=began, ended=time.perf_counter())
        if outcomes[item["index"]] is not None:
            raise AssertionError(f"request {item['index']} answered twice")
        outcomes[item["index"]] = outcome

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(send, plan))
    wall = time.perf_counter() - began
    for conn in connections:
        conn.close()
    return outcomes, wall


def check_outcomes(plan, outcomes, buckets, server_counts) -> dict:
    """The correctness checks: name -> (passed, what was found)."""
    valid = [(item, o) for item, o in zip(plan, outcomes) if "malformed" not in item]
    malformed = [(item, o) for item, o in zip(plan, outcomes) if "malformed" in item]
    unanswered = [o.get("error") for o in outcomes if not o["answered"]]
    bad_valid = [(item["index"], o.get("status")) for item, o in valid if o["answered"] and not (
        o["status"] == 200 and o["headers"].get("x-fastguide-bucket", "").isdigit()
        and int(o["headers"]["x-fastguide-bucket"]) in buckets)]
    bad_malformed = [(item["malformed"], o.get("status")) for item, o in malformed
                     if o["answered"] and not 400 <= o["status"] < 500]
    n_valid, n_malformed = len(valid), len(malformed)
    counters = {k: server_counts.get(f"fastguide_{k}_total") for k in ("submitted", "completed", "failed", "rejected")}
    responses = {c: server_counts.get(f'fastguide_http_responses_total{{code="{c}"}}') for c in ("2xx", "4xx", "5xx")}
    return {
        "every request answered once": (not unanswered, f"{len(unanswered)} unanswered" +
                                        (f" (first: {unanswered[0]})" if unanswered else "")),
        "valid requests: 200 with a bucket header": (not bad_valid, f"{len(bad_valid)} not ({bad_valid[:3]})"),
        "malformed requests: 4xx": (not bad_malformed, f"{len(bad_malformed)} not ({bad_malformed[:3]})"),
        "batcher counters: submitted = completed = valid, none failed or rejected": (
            counters == {"submitted": n_valid, "completed": n_valid, "failed": 0, "rejected": 0},
            f"{counters} for {n_valid} valid requests"),
        "HTTP responses: one per request": (
            responses == {"2xx": n_valid, "4xx": n_malformed, "5xx": 0},
            f"{responses} for {n_valid} valid and {n_malformed} malformed requests"),
    }


def spot_check(plan, outcomes, buckets, count: int, seed: int, device: str,
               tolerance: float = 0.0, threads: int | None = None) -> tuple[int, int, float]:
    """(matched, checked, max abs difference): random npy responses against Batcher.sample_alone at their bucket,
    bit for bit (``tolerance`` 0), or within ``tolerance`` (continuous batching: a row's steps ran at several batch
    sizes, and the network's rounding depends on the batch size), with ``threads`` intra-op threads (the
    server's: the network's rounding can depend on them too; None: this process's)."""
    from fastguide.serving import SampleRequest, digits_batcher

    if threads is not None:
        own = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return spot_check(plan, outcomes, buckets, count, seed, device, tolerance)
        finally:
            torch.set_num_threads(own)

    answered = [(item, o) for item, o in zip(plan, outcomes) if item.get("format") == "npy" and o["answered"]
                and o["status"] == 200]
    chosen = random.Random(seed).sample(answered, min(count, len(answered)))
    if not chosen:
        return 0, 0, 0.0
    batcher = digits_batcher(buckets=buckets, device=device)
    matched, worst = 0, 0.0
    for item, o in chosen:
        want = batcher.sample_alone(SampleRequest(item["label"], item["seed"], item["steps"], item["scale"],
                                                  item["rule"]), bucket=int(o["headers"]["x-fastguide-bucket"]))
        got = np.load(io.BytesIO(o["body"]), allow_pickle=False)
        diff = float(np.abs(got - want.numpy()).max())
        worst = max(worst, diff)
        matched += bool(np.array_equal(got, want.numpy())) if tolerance == 0 else diff <= tolerance
    return matched, len(chosen), worst


@torch.no_grad()
def baseline(batch: int, reps: int, device: str) -> dict:
    """Seconds of one direct Sampler.sample call (B = ``batch``, NFE 10, UniPC, CFG g = 3) and of one full-bucket
    batch as the batcher runs it (medians of ``reps`` after a warm-up call each)."""
    import fastguide as fg
    from fastguide.demo import digits
    from fastguide.serving import SampleRequest, digits_batcher

    def median_seconds(call):
        call()
        times, busy = [], []
        for _ in range(reps):
            began, cpu_began = time.perf_counter(), time.process_time()
            call()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
            busy.append((time.process_time() - cpu_began) / times[-1])
        return float(np.median(times)), float(np.median(busy))

    sampler = fg.Sampler(digits.load_digits_model(device=device), digits.make_solver("unipc", BASELINE_NFE),
                         fg.CFG(3.0), null_cond=digits.NULL_LABEL, progress=False)
    noise = fg.seeded_noise(range(batch), digits.IMAGE_SHAPE, device=device)
    labels = (torch.arange(batch) % 10).to(device)
    direct_s, direct_busy = median_seconds(lambda: sampler.sample(noise, labels))
    batcher = digits_batcher(buckets=(batch,), device=device)
    full = SampleRequest(3, 0, BASELINE_NFE, 3.0, "cfg")
    batcher_s, _ = median_seconds(lambda: batcher.sample_alone(full, bucket=batch))
    return {"batch": batch, "nfe": BASELINE_NFE, "direct_batch_s": direct_s, "direct_images_per_s": batch / direct_s,
            "direct_cores_busy": direct_busy, "batcher_batch_s": batcher_s, "batcher_images_per_s": batch / batcher_s}


def bracketed(before: dict, after: dict) -> dict:
    """The baseline as the mean of its runs just before the load and just after it: this machine's speed drifts
    by up to 1.5x over minutes, and one run after the load alone put single ratios anywhere in 0.54-0.91."""
    out = {"batch": before["batch"], "nfe": before["nfe"], "before": before, "after": after,
           "direct_cores_busy": (before["direct_cores_busy"] + after["direct_cores_busy"]) / 2}
    for which in ("direct", "batcher"):
        seconds = (before[f"{which}_batch_s"] + after[f"{which}_batch_s"]) / 2
        out[f"{which}_batch_s"], out[f"{which}_images_per_s"] = seconds, before["batch"] / seconds
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--malformed-fraction", type=float, default=0.05)
    p.add_argument("--buckets", default="1,2,4,8,16,32,64")
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for the load; later requests are not sent")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-warmup", action="store_true", help="start the server with --no-warmup")
    p.add_argument("--continuous", action="store_true", help="start the server with --continuous (steps scheduled "
                   "one at a time; spot checks within a tolerance unless there is one bucket)")
    p.add_argument("--workers", type=int, default=1, help="start the server with --workers (its batcher's worker "
                   "threads; on a CPU each with cores / workers intra-op threads)")
    p.add_argument("--spot-checks", type=int, default=20, help="npy responses compared with Batcher.sample_alone")
    p.add_argument("--baseline-reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--out", default=None, help="JSON report (default benchmarks/load-test-DEVICE.json)")
    return p


def main(argv=None) -> int:
    from fastguide.commands.serve import parse_buckets

    args = build_parser().parse_args(argv)
    buckets = parse_buckets(args.buckets)
    if (args.requests < 1 or args.concurrency < 1 or args.workers < 1 or not 0 <= args.malformed_fraction <= 1
            or args.time_limit <= 0):
        print("load_test: expected --requests, --concurrency, --workers >= 1, --malformed-fraction in [0, 1], "
              "--time-limit > 0", file=sys.stderr)
        return 2
    out = Path(args.out or Path(__file__).resolve().parent / f"load-test-{args.device}.json")
    plan = plan_requests(args.requests, args.malformed_fraction, args.seed)
    serve_args = ["--buckets", args.buckets, "--max-wait-ms", str(args.max_wait_ms), "--max-queue",
                  str(max(1024, args.requests)), "--device", args.device] + (["--no-warmup"] if args.no_warmup else [])
    serve_args += ["--continuous"] if args.continuous else []
    serve_args += ["--workers", str(args.workers)]
    before = baseline(buckets[-1], args.baseline_reps, args.device)
    with ServerProcess(*serve_args, timeout=max(600.0, args.time_limit)) as server:
        server_cpu_before, client_cpu_began = thread_cpu_seconds(server.proc.pid), time.process_time()
        outcomes, wall = run_load(server, plan, args.concurrency, args.time_limit)
        client_cpu_s, server_cpu_after = time.process_time() - client_cpu_began, thread_cpu_seconds(server.proc.pid)
        conn = server.connection()
        try:
            _, _, metrics_text = exchange(conn, "GET", "/metrics")
        finally:
            conn.close()
        server_counts = prometheus_samples(metrics_text.decode())
        exit_code = server.stop()
    checks = check_outcomes(plan, outcomes, buckets, server_counts)
    checks["server exits 0 on SIGTERM"] = (exit_code == 0, f"exit code {exit_code}")
    tolerance = CONTINUOUS_TOLERANCE if args.continuous and len(buckets) > 1 else 0.0
    server_threads = worker_threads(args.workers) if args.device == "cpu" and args.workers > 1 else None
    matched, checked, worst = spot_check(plan, outcomes, buckets, args.spot_checks, args.seed, args.device, tolerance,
                                         server_threads)
    checks["spot check: responses equal Batcher.sample_alone" + (f" within {tolerance:g}" if tolerance else "")] = (
        matched == checked, f"{matched} of {checked} (max abs difference {worst:.3g})")

    latencies = [o["ended"] - o["began"] for item, o in zip(plan, outcomes)
                 if "malformed" not in item and o["answered"] and o["status"] == 200]
    p50, p99 = (float(np.quantile(latencies, q)) for q in (0.5, 0.99)) if latencies else (float("nan"),) * 2
    images_per_s = len(latencies) / wall
    after = baseline(buckets[-1], args.baseline_reps, args.device)
    base = bracketed(before, after)
    cpu = None
    if server_cpu_before is not None and server_cpu_after is not None:
        cpu = cpu_split(server.proc.pid, server_cpu_before, server_cpu_after, client_cpu_s, wall, len(latencies), base)
    max_wait_s = args.max_wait_ms / 1e3
    ratio = images_per_s / base["direct_images_per_s"]
    goals = [{"goal": f"images/s >= 0.8x one direct Sampler.sample call (B={base['batch']}, NFE {BASELINE_NFE})",
              "measured": round(ratio, 3), "met": ratio >= 0.8}]
    for which in ("direct", "batcher"):
        bound = max_wait_s + 2 * base[f"{which}_batch_s"]
        goals.append({"goal": f"p99 <= max-wait + 2 batch times ({which} B={base['batch']} batch: "
                              f"{base[f'{which}_batch_s'] * 1e3:.1f} ms)",
                      "measured": f"{p99 * 1e3:.1f} ms <= {bound * 1e3:.1f} ms", "met": p99 <= bound})
    run_ms_by_bucket: dict[str, list[float]] = {}
    for o in outcomes:
        headers = o.get("headers", {}) if o["answered"] else {}
        if "x-fastguide-bucket" in headers:
            run_ms_by_bucket.setdefault(headers["x-fastguide-bucket"], []).append(float(headers["x-fastguide-run-ms"]))
    bucket_counts = {b: len(v) for b, v in sorted(run_ms_by_bucket.items(), key=lambda kv: int(kv[0]))}
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": args.device},
        "config": {k: getattr(args, k) for k in ("requests", "concurrency", "malformed_fraction", "max_wait_ms",
                                                 "time_limit", "no_warmup", "seed", "continuous", "workers")}
                  | {"buckets": list(buckets)},
        "requests": {"valid": sum("malformed" not in item for item in plan),
                     "malformed": sum("malformed" in item for item in plan), "answered_by_bucket": bucket_counts},
        "run_ms_median_by_bucket": {b: float(np.median(v)) for b, v in run_ms_by_bucket.items()},
        "server_stdout": server.lines,
        "wall_s": wall, "latency_p50_ms": p50 * 1e3, "latency_p99_ms": p99 * 1e3, "images_per_s": images_per_s,
        "baseline": base, "vs_direct": ratio, "cpu": cpu,
        "server_metrics": {k: v for k, v in server_counts.items() if "warmup" not in k},
        "checks": [{"check": name, "passed": passed, "found": found} for name, (passed, found) in checks.items()],
        "goals": goals,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{len(plan)} requests ({report['requests']['malformed']} malformed) at concurrency {args.concurrency} in "
          f"{wall:.1f} s: {images_per_s:.1f} images/s, p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms; buckets "
          f"{bucket_counts}; median X-Fastguide-Run-Ms by bucket "
          f"{ {b: round(v, 1) for b, v in report['run_ms_median_by_bucket'].items()} }")
    print(f"baseline B={base['batch']} NFE {BASELINE_NFE}: direct {base['direct_batch_s'] * 1e3:.1f} ms "
          f"(before {before['direct_batch_s'] * 1e3:.1f}, after {after['direct_batch_s'] * 1e3:.1f}) "
          f"({base['direct_images_per_s']:.1f} images/s), batcher {base['batcher_batch_s'] * 1e3:.1f} ms "
          f"({base['batcher_images_per_s']:.1f} images/s); load / direct {ratio:.3f}")
    if cpu is not None:
        print(f"CPU over the load ({cpu['cores']} cores x {wall:.1f} s): client {cpu['client_cpu_s']:.1f} s, server "
              f"event loop {cpu['server_event_loop_cpu_s']:.1f} s, sampling {cpu['server_sampling_cpu_s']:.1f} s, idle "
              f"{cpu['idle_cpu_s']:.1f} s; load / direct = contention {cpu['contention']:.3f} (the direct call keeps "
              f"{cpu['direct_cores_busy']:.2f} cores busy) x efficiency {cpu['efficiency']:.3f}")
    for name, (passed, found) in checks.items():
        print(f"  [{'ok' if passed else 'FAIL'}] {name}: {found}")
    for g in goals:
        print(f"  goal {'met' if g['met'] else 'NOT met'}: {g['goal']}: {g['measured']}")
    print(f"wrote {out}")
    return 0 if all(passed for passed, _ in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
