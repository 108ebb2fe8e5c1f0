"""`fastguide serve` end to end: a server subprocess on loopback spoken to with the stdlib only. Its samples equal
the library's (``Batcher.sample_alone`` at the bucket the response reports) bit for bit, malformed requests get a
4xx whose JSON error names the field, concurrent requests co-batch, /metrics counts them, clients that hang up
are withdrawn, SIGTERM lets requests in flight finish and exits 0, bad options are one-line errors. In this
process: create_app over a Batcher of another model (NaN -> 500, full queue and closed batcher -> 503). And
benchmarks/load_test.py runs at a tiny size."""
import contextlib
import http.client
import io
import json
import re
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from benchmark_scripts import load_benchmark
from fastguide import cli
from fastguide.commands.common import worker_threads
from fastguide.serving import Batcher, SampleRequest, digits_batcher

BUCKETS = (1, 4)
JSON_TYPE = {"content-type": "application/json"}
DEFAULT_RULE, DEFAULT_SCALE = "cfg", 3.0  # `fastguide serve`'s: the first rule, --scale 3.0


load_test = load_benchmark("load_test")  # its ServerProcess starts `python -m fastguide serve` and waits for the listening line


class Client:
    """Requests to the server on 127.0.0.1:``port``, counting the answers by status class (what /metrics should
    report)."""

    def __init__(self, port: int):
        self.port = port
        self.answers: Counter = Counter()
        self.samples = 0  # 200 answers to POST /v1/samples
        self._lock = threading.Lock()

    def send(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            status, response_headers, content = load_test.exchange(conn, method, path, body, headers)
        finally:
            conn.close()
        with self._lock:
            self.answers[f"{status // 100}xx"] += 1
            self.samples += status == 200 and path == "/v1/samples"
        return status, response_headers, content

    def sample(self, **fields):
        return self.send("POST", "/v1/samples", json.dumps(fields).encode(), JSON_TYPE)

    def health(self):
        status, _, content = self.send("GET", "/health")
        return status, json.loads(content)

    def metrics(self) -> dict:
        status, _, content = self.send("GET", "/metrics")
        assert status == 200
        return parse_prometheus(content.decode())


@pytest.fixture(scope="module")
def client():
    with load_test.ServerProcess("--buckets", ",".join(map(str, BUCKETS)), "--max-wait-ms", "5", "--no-warmup") as s:
        yield Client(s.port)


@pytest.fixture(scope="module")
def reference():
    """The library's batcher with the server's settings (never started: sample_alone runs in this process)."""
    return digits_batcher(buckets=BUCKETS)


def expected_sample(reference, fields: dict, headers: dict) -> np.ndarray:
    bucket = int(headers["x-fastguide-bucket"])
    assert bucket in BUCKETS
    request = SampleRequest(fields["label"], fields["seed"], fields["steps"], float(fields.get("scale", DEFAULT_SCALE)),
                            fields.get("rule", DEFAULT_RULE))
    return reference.sample_alone(request, bucket=bucket).numpy()


def decode_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


NPY_CASES = [
    dict(label=7, seed=1, steps=8, format="npy"),  # the default rule and scale
    dict(label=0, seed=2, steps=4, scale=1.0, rule="cfg", format="npy"),
    dict(label=3, seed=2**40, steps=10, scale=4.5, rule="recfg-paper", format="npy"),
    dict(label=9, seed=5, steps=6, scale=2, rule="recfg-ls", format="npy"),  # an int scale
    dict(label=5, seed=6, steps=5, scale=3.5, rule="cfg-zero-star", format="npy"),
    dict(label=1, seed=7, steps=7, scale=2.5, rule="apg", format="npy"),
    dict(label=7, seed=1, steps=8, scale=3.0, rule="cfg", format="npy"),  # == the first, spelled out
]


def test_npy_samples_equal_the_librarys_bit_for_bit(client, reference):
    got = []
    for fields in NPY_CASES:
        status, headers, content = client.sample(**fields)
        assert status == 200, content
        assert headers["content-type"] == "application/x-npy"
        assert float(headers["x-fastguide-queued-ms"]) >= 0 and float(headers["x-fastguide-run-ms"]) > 0
        sample = decode_npy(content)
        assert sample.dtype == np.float32 and sample.shape == (1, 8, 8)
        np.testing.assert_array_equal(sample, expected_sample(reference, fields, headers), err_msg=str(fields))
        got.append(sample)
    assert np.array_equal(got[0], got[-1])  # the defaults are cfg at g = 3
    assert not np.array_equal(got[0], got[1])


def test_png_is_the_8_bit_grayscale_of_the_sample(client, reference):
    from PIL import Image

    fields = dict(label=4, seed=11, steps=6, rule="apg", scale=2.0)  # format png is the default
    status, headers, content = client.sample(**fields)
    assert status == 200 and headers["content-type"] == "image/png", content
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG" and image.mode == "L" and image.size == (8, 8)
    x = expected_sample(reference, fields, headers)[0].astype(np.float64)
    # as `fastguide sample` draws digits (gray_r, vmin -1, vmax 1): -1 white, 1 black
    want = np.rint((np.clip(x, -1, 1) - 1) * -127.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(image), want)
    assert want.min() < 64 and want.max() > 192  # a digit: ink and background both present
    status, _, again = client.sample(**fields, format="png")
    assert status == 200 and again == content


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


VALID = dict(label=3, seed=1, steps=4)
TOO_LARGE = _body(**VALID, rule="x" * 20000)
MALFORMED = {  # name -> (method, path, body, headers, status, the field the error names)
    "bad JSON": ("POST", "/v1/samples", b'{"label": 3, "seed": ', JSON_TYPE, 400, "body"),
    "array body": ("POST", "/v1/samples", b"[3, 1, 4]", JSON_TYPE, 400, "body"),
    "string body": ("POST", "/v1/samples", b'"label"', JSON_TYPE, 400, "body"),
    "deeply nested body": ("POST", "/v1/samples", b"[" * 5000 + b"]" * 5000, JSON_TYPE, 400, "body"),
    "missing label": ("POST", "/v1/samples", _body(seed=1, steps=4), JSON_TYPE, 400, "label"),
    "missing seed": ("POST", "/v1/samples", _body(label=3, steps=4), JSON_TYPE, 400, "seed"),
    "missing steps": ("POST", "/v1/samples", _body(label=3, seed=1), JSON_TYPE, 400, "steps"),
    "seed negative": ("POST", "/v1/samples", _body(label=3, seed=-1, steps=4), JSON_TYPE, 400, "seed"),
    "seed float": ("POST", "/v1/samples", _body(label=3, seed=1.5, steps=4), JSON_TYPE, 400, "seed"),
    "seed string": ("POST", "/v1/samples", _body(label=3, seed="7", steps=4), JSON_TYPE, 400, "seed"),
    "seed 2**64": ("POST", "/v1/samples", _body(label=3, seed=2**64, steps=4), JSON_TYPE, 400, "seed"),
    "steps 0": ("POST", "/v1/samples", _body(label=3, seed=1, steps=0), JSON_TYPE, 400, "steps"),
    "steps 1000": ("POST", "/v1/samples", _body(label=3, seed=1, steps=1000), JSON_TYPE, 400, "steps"),
    "steps bool": ("POST", "/v1/samples", _body(label=3, seed=1, steps=True), JSON_TYPE, 400, "steps"),
    "label 10 (the null label)": ("POST", "/v1/samples", _body(label=10, seed=1, steps=4), JSON_TYPE, 400, "label"),
    "label -1": ("POST", "/v1/samples", _body(label=-1, seed=1, steps=4), JSON_TYPE, 400, "label"),
    "label string": ("POST", "/v1/samples", _body(label="3", seed=1, steps=4), JSON_TYPE, 400, "label"),
    "label null": ("POST", "/v1/samples", _body(label=None, seed=1, steps=4), JSON_TYPE, 400, "label"),
    "scale negative": ("POST", "/v1/samples", _body(**VALID, scale=-1), JSON_TYPE, 400, "scale"),
    "scale 'nan'": ("POST", "/v1/samples", _body(**VALID, scale="nan"), JSON_TYPE, 400, "scale"),
    "scale NaN": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "scale": NaN}', JSON_TYPE, 400,
                  "scale"),
    "scale 1e999": ("POST", "/v1/samples", b'{"label": 3, "seed": 1, "steps": 4, "scale": 1e999}', JSON_TYPE, 400,
                    "scale"),
    "scale 10**400": ("POST", "/v1/samples", _body(**VALID, scale=10**400), JSON_TYPE, 400, "scale"),
    "rule unknown": ("POST", "/v1/samples", _body(**VALID, rule="magic"), JSON_TYPE, 400, "rule"),
    "rule a number": ("POST", "/v1/samples", _body(**VALID, rule=1), JSON_TYPE, 400, "rule"),
    "format unknown": ("POST", "/v1/samples", _body(**VALID, format="gif"), JSON_TYPE, 400, "format"),
    "format a list": ("POST", "/v1/samples", _body(**VALID, format=["npy"]), JSON_TYPE, 400, "format"),
    "unknown field": ("POST", "/v1/samples", _body(**VALID, guidance=2), JSON_TYPE, 400, "guidance"),
    "the library's name cond": ("POST", "/v1/samples", _body(cond=3, seed=1, steps=4), JSON_TYPE, 400, "cond"),
    "wrong content type": ("POST", "/v1/samples", _body(**VALID), {"content-type": "text/plain"}, 415,
                           "content-type"),
    "no content type": ("POST", "/v1/samples", _body(**VALID), {}, 415, "content-type"),
    "body too large": ("POST", "/v1/samples", TOO_LARGE, JSON_TYPE, 413, "body"),
    "body too large, chunked": ("POST", "/v1/samples", [TOO_LARGE[:10000], TOO_LARGE[10000:]], JSON_TYPE, 413,
                                "body"),  # a body in parts and no length: http.client sends it chunked
    "wrong method": ("GET", "/v1/samples", None, {}, 405, "method"),
    "wrong method on /health": ("POST", "/health", b"{}", JSON_TYPE, 405, "method"),
    "unknown path": ("POST", "/v1/sample", _body(**VALID), JSON_TYPE, 404, "path"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_request_gets_a_4xx_naming_the_field(client, name):
    method, path, body, headers, want_status, field = MALFORMED[name]
    status, response_headers, content = client.send(method, path, body, headers)
    assert status == want_status, content
    assert response_headers["content-type"] == "application/json"
    error = json.loads(content)["error"]
    assert error.startswith(f"{field}:"), error
    assert "Traceback" not in error and len(error) < 600


def test_the_server_still_answers_after_the_malformed_requests(client, reference):
    status, health = client.health()
    assert status == 200
    assert health == {"status": "ok", "queue_depth": 0, "rules": ["cfg", "recfg-paper", "recfg-ls", "cfg-zero-star",
                                                                   "apg"],
                      "buckets": list(BUCKETS), "steps_range": [2, 50], "latent_shape": [1, 8, 8]}
    fields = dict(label=2, seed=31, steps=9, scale=3.25, rule="recfg-ls", format="npy")
    status, headers, content = client.sample(**fields)
    assert status == 200
    np.testing.assert_array_equal(decode_npy(content), expected_sample(reference, fields, headers))


def send_at_once(client, requests: list[dict]) -> list:
    """Each request from its own thread, all released together; the answers in request order."""
    answers = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def send(i):
        start.wait()
        answers[i] = client.sample(**requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return answers


def test_concurrent_requests_co_batch_and_each_equals_the_librarys(client, reference):
    requests = [dict(label=i % 10, seed=100 + i, steps=4 + i % 7, scale=1.0 + 0.25 * i,
                     rule=("cfg", "apg")[i % 2], format="npy") for i in range(24)]
    answers = send_at_once(client, requests)
    assert all(a is not None and a[0] == 200 for a in answers), [a and a[2][:200] for a in answers]
    buckets = [int(headers["x-fastguide-bucket"]) for _, headers, _ in answers]
    assert max(buckets) == 4  # 24 requests at once do not all run alone
    for fields, (_, headers, content) in zip(requests, answers):
        np.testing.assert_array_equal(decode_npy(content), expected_sample(reference, fields, headers),
                                      err_msg=f"{fields} in bucket {headers['x-fastguide-bucket']}")


def test_continuous_server_requests_of_mixed_rules_each_equal_the_librarys():
    """`fastguide serve --continuous --buckets 4`: 12 requests at once of two rules and 4-10 steps run as rows
    that join between steps; with one bucket size each equals the library's sample alone at it, bit for bit."""
    requests = [dict(label=i % 10, seed=300 + i, steps=4 + i % 7, scale=1.5 + 0.5 * i, rule=("cfg", "apg")[i % 2],
                     format="npy") for i in range(12)]
    with load_test.ServerProcess("--continuous", "--buckets", "4", "--max-wait-ms", "5", "--no-warmup") as server:
        client = Client(server.port)
        answers = send_at_once(client, requests)
        forwards = client.metrics()["fastguide_batches_total"]
        assert server.stop() == 0
    assert all(a is not None and a[0] == 200 for a in answers), [a and a[2][:200] for a in answers]
    reference = digits_batcher(buckets=(4,), continuous=True)
    for fields, (_, headers, content) in zip(requests, answers):
        assert headers["x-fastguide-bucket"] == "4"
        want = reference.sample_alone(SampleRequest(fields["label"], fields["seed"], fields["steps"],
                                                    float(fields["scale"]), fields["rule"]), bucket=4)
        np.testing.assert_array_equal(decode_npy(content), want.numpy(), err_msg=str(fields))
    assert forwards < sum(r["steps"] for r in requests) / 2  # rows shared forwards (4 at a time at most)


def test_two_worker_server_requests_each_equal_the_librarys_at_its_thread_count():
    """`fastguide serve --workers 2`: both workers answer (X-Fastguide-Worker), each with cores // 2 intra-op
    threads; every sample equals the library's alone in its bucket at that thread count, bit for bit."""
    requests = [dict(label=i % 10, seed=500 + i, steps=4 + i % 7, scale=1.0 + 0.25 * i, rule=("cfg", "apg")[i % 2],
                     format="npy") for i in range(24)]
    with load_test.ServerProcess("--workers", "2", "--buckets", ",".join(map(str, BUCKETS)), "--max-wait-ms", "5",
                                 "--no-warmup") as server:
        answers = send_at_once(Client(server.port), requests)
        assert server.stop() == 0
    assert all(a is not None and a[0] == 200 for a in answers), [a and a[2][:200] for a in answers]
    assert {headers["x-fastguide-worker"] for _, headers, _ in answers} == {"0", "1"}
    threads = torch.get_num_threads()
    torch.set_num_threads(worker_threads(2))
    try:
        reference = digits_batcher(buckets=BUCKETS)
        for fields, (_, headers, content) in zip(requests, answers):
            np.testing.assert_array_equal(decode_npy(content), expected_sample(reference, fields, headers),
                                          err_msg=f"{fields} in bucket {headers['x-fastguide-bucket']}")
    finally:
        torch.set_num_threads(threads)


PROM_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]\w*="[^"]*"(,[a-zA-Z_]\w*="[^"]*")*\})? '
                         r'(NaN|[+-]Inf|[-+]?[0-9.]+(e[-+]?[0-9]+)?)$')


def parse_prometheus(text: str) -> dict:
    """'name{labels}' -> value; asserts every line is a HELP / TYPE comment or a sample of a declared metric."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "summary", "histogram", "untyped"), line
            types[name] = kind
            continue
        match = PROM_SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        assert match.group(1) in types, f"{match.group(1)} has no TYPE line"
        key = line.rsplit(" ", 1)[0]
        assert key not in samples, f"{key} twice"
        samples[key] = float(line.rsplit(" ", 1)[1])
    return samples


def test_metrics_are_prometheus_text_with_the_right_counts(client):
    assert client.sample(label=6, seed=41, steps=4, format="npy")[0] == 200
    assert client.sample(label=6, seed=41)[0] == 400
    answered_before = Counter(client.answers)  # the server renders the text before counting its own response
    status, headers, content = client.send("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(content.decode())
    assert samples["fastguide_submitted_total"] == samples["fastguide_completed_total"] == client.samples
    assert samples["fastguide_failed_total"] == samples["fastguide_rejected_total"] == 0
    assert 1 <= samples["fastguide_batches_total"] <= client.samples
    assert samples["fastguide_queue_depth"] == 0
    for code in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        assert samples[f'fastguide_http_responses_total{{code="{code}"}}'] == answered_before[code], code


def send_and_hang_up(port: int, body: bytes, declared_length: int | None = None) -> None:
    """A POST /v1/samples whose client closes the connection right after sending (part of) it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /v1/samples HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {declared_length or len(body)}\r\n\r\n".encode() + body)


def test_hang_ups_and_sigterm_with_requests_in_flight(reference):
    # requests wait up to 4 s for their batch to fill, so they are still queued when SIGTERM arrives
    with load_test.ServerProcess("--buckets", "1,4", "--max-wait-ms", "4000", "--no-warmup") as server:
        client = Client(server.port)
        # clients that hang up: one after its whole request (withdrawn from the queue), one halfway through its body
        send_and_hang_up(server.port, _body(label=9, seed=999, steps=4))
        send_and_hang_up(server.port, _body(**VALID)[:10], declared_length=100)
        deadline = time.monotonic() + 30
        while client.metrics()['fastguide_http_responses_total{code="4xx"}'] < 2:  # both answered, to nobody
            assert time.monotonic() < deadline, "the hung-up requests were never answered"
            time.sleep(0.05)

        requests = [dict(label=i, seed=200 + i, steps=s, format="npy") for i, s in enumerate((4, 6, 5))]
        answers = [None] * len(requests)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, client.sample(**requests[i])))
                   for i in range(len(requests))]
        for t in threads:
            t.start()
        # all three wait (a withdrawn request left in the queue would fill the bucket of 4 and run them at once)
        while client.health()[1].get("queue_depth") != len(requests):
            assert time.monotonic() < deadline, "the requests never queued"
            time.sleep(0.05)
        exit_code = server.stop(timeout=60)
        for t in threads:
            t.join(60)
        assert exit_code == 0, server.stderr()
        assert [a and a[0] for a in answers] == [200] * len(requests), answers
        for fields, (_, headers, content) in zip(requests, answers):
            assert headers["x-fastguide-bucket"] == "4"
            np.testing.assert_array_equal(decode_npy(content), expected_sample(reference, fields, headers))
        assert server.lines[-1] == f"fastguide serve: stopped after {len(requests)} samples (0 failed)"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


class GatedNanModel(torch.nn.Module):
    """The digits model behind a gate (a forward blocks until the test opens it) that returns NaN for the rows of
    label ``nan_label``."""

    def __init__(self, model, nan_label: int):
        super().__init__()
        self.model, self.nan_label, self.num_classes = model, nan_label, model.num_classes
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def forward(self, x, t, c):
        self.entered.set()
        assert self.gate.wait(60)
        out = self.model(x, t, c)
        return torch.where((c == self.nan_label).view(-1, 1, 1, 1), torch.full_like(out, float("nan")), out)


@contextlib.contextmanager
def server_in_this_process(batcher):
    """create_app(batcher) under uvicorn in a thread, on a free loopback port."""
    import uvicorn

    from fastguide.server import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(batcher), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield Client(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_your_own_batcher_nan_full_queue_and_closed():
    """create_app over a Batcher of any model: a NaN sample is a 500 naming it, a full queue a 503 with
    Retry-After, a closed batcher a 503 and /health 503 closing."""
    from fastguide.demo import digits

    model = GatedNanModel(digits.load_digits_model(), nan_label=3)
    batcher = Batcher(model, lambda n: digits.make_solver("ddim", n), {"cfg": digits.make_guidance("cfg", 2.0)},
                      null_cond=digits.NULL_LABEL, latent_shape=digits.IMAGE_SHAPE, buckets=(1,), max_queue=1,
                      steps_range=(2, 6)).start(warmup=False)
    with server_in_this_process(batcher) as client:
        status, _, content = client.sample(label=3, seed=1, steps=2)
        assert status == 500 and json.loads(content)["error"].startswith("sample: ") and "NaN" in content.decode()
        status, headers, content = client.sample(label=2, seed=1, steps=2, format="npy")
        assert status == 200 and headers["x-fastguide-bucket"] == "1"
        assert client.health()[1]["rules"] == ["cfg"] and client.health()[1]["steps_range"] == [2, 6]

        model.gate.clear()
        model.entered.clear()
        answers = []
        first = threading.Thread(target=lambda: answers.append(client.sample(label=1, seed=2, steps=2)))
        first.start()
        assert model.entered.wait(30)  # the first request's batch runs (and blocks in the model)
        second = threading.Thread(target=lambda: answers.append(client.sample(label=1, seed=3, steps=2)))
        second.start()
        deadline = time.monotonic() + 30
        while client.health()[1]["queue_depth"] != 1:  # the second waits: the queue (max_queue 1) is full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, content = client.sample(label=1, seed=4, steps=2)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(content)["error"].startswith("queue:")
        model.gate.set()
        first.join(60)
        second.join(60)
        assert [a[0] for a in answers] == [200, 200]

        batcher.close()
        status, headers, content = client.sample(label=1, seed=5, steps=2)
        assert status == 503 and headers["retry-after"] == "1" and json.loads(content)["error"].startswith("server:")
        assert client.health() == (503, {"status": "closing"})
        metrics = client.metrics()
        assert metrics["fastguide_failed_total"] == 1 and metrics["fastguide_rejected_total"] == 1
        assert metrics['fastguide_http_responses_total{code="5xx"}'] == 4  # 500, 503 full, 503 closed, /health


@pytest.mark.parametrize("argv, option", [
    (["--buckets", "4,1"], "--buckets"), (["--buckets", "0,4"], "--buckets"), (["--buckets", "1,x"], "--buckets"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"), (["--max-wait-ms", "nan"], "--max-wait-ms"),
    (["--port", "70000"], "--port"), (["--port", "-1"], "--port"), (["--port", "eighty"], "--port"),
    (["--max-queue", "0"], "--max-queue"), (["--scale", "-1"], "--scale"), (["--solver", "magic"], "--solver"),
    (["--device", "tpu"], "--device"), (["--cuda-graph"], "--cuda-graph"), (["--step-buckets", "8,4"], "--step-buckets"),
    (["--step-buckets", "10,20"], "step_buckets"), (["--continuous", "--step-buckets", "10,50"], "--continuous"),
    (["--workers", "0"], "--workers"),
])
def test_bad_options_are_one_line_errors(capsys, argv, option):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastguide serve: error: ") and option in err, err
    assert "Traceback" not in err


def test_a_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--port", str(port), "--no-warmup"]) == 2
    err = capsys.readouterr().err
    assert err == f"fastguide serve: error: --port: 127.0.0.1:{port} is already in use (another process listens " \
                  "there; pick another --port)\n"


def test_a_server_that_does_not_start_is_reported_with_its_own_error():
    with pytest.raises(RuntimeError, match="did not start listening") as failed:
        with load_test.ServerProcess("--buckets", "x", timeout=120):
            pass
    assert "--buckets: expected comma-separated sizes" in str(failed.value)


def test_load_test_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "load.json"
    assert load_test.main(["--requests", "40", "--concurrency", "8", "--buckets", "1,4", "--max-wait-ms", "5",
                           "--no-warmup", "--baseline-reps", "1", "--spot-checks", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["requests"]["valid"] + report["requests"]["malformed"] == 40
    assert report["requests"]["malformed"] == 2  # 5% of 40
    assert sum(report["requests"]["answered_by_bucket"].values()) == report["requests"]["valid"]
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    assert "4 of 4" in next(c["found"] for c in report["checks"] if c["check"].startswith("spot check"))
    base = report["baseline"]
    assert base["batch"] == 4 and base["direct_images_per_s"] == pytest.approx(4 / base["direct_batch_s"])
    assert base["direct_batch_s"] == pytest.approx((base["before"]["direct_batch_s"]
                                                   + base["after"]["direct_batch_s"]) / 2)
    assert report["vs_direct"] == pytest.approx(report["images_per_s"] / base["direct_images_per_s"])
    cpu = report["cpu"]  # (Linux: /proc)
    assert cpu["contention"] * cpu["efficiency"] == pytest.approx(report["vs_direct"])
    assert cpu["server_sampling_cpu_s"] > 0 and cpu["client_cpu_s"] > 0
    assert 0 < base["direct_cores_busy"] <= cpu["cores"] + 0.1
    spent = cpu["client_cpu_s"] + cpu["server_event_loop_cpu_s"] + cpu["server_sampling_cpu_s"] + cpu["idle_cpu_s"]
    assert spent == pytest.approx(cpu["cores"] * report["wall_s"])
    throughput, *latency = report["goals"]
    assert throughput["met"] == (report["vs_direct"] >= 0.8)
    for goal, which in zip(latency, ("direct", "batcher")):
        bound_ms = 5 + 2 * base[f"{which}_batch_s"] * 1e3
        assert goal["met"] == (report["latency_p99_ms"] <= bound_ms)
