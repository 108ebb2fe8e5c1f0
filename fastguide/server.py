"""`fastguide serve`'s HTTP layer: an ASGI app over a :class:`fastguide.serving.Batcher`, and :func:`serve`,
which runs it with uvicorn.

    batcher = Batcher(model, solver_for, rules, null_cond=..., latent_shape=...).start()  # warm-up first
    serve(batcher, host="127.0.0.1", port=8000)  # until SIGTERM / SIGINT; requests in flight finish first

Starlette rather than FastAPI: the fields are checked by ``Batcher.check_request``, whose errors already name the
field, so a pydantic model would only restate those checks (and their messages) for two more dependencies.

Endpoints (docs/serving.md): ``POST /v1/samples`` (JSON label, seed, steps, scale, rule, format -> the sample as
PNG or .npy), ``GET /health``, ``GET /metrics`` (Prometheus text). Every error is JSON ``{"error": "<field>: ..."}``.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import signal
import socket
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fastguide.serving import Batcher, BatcherClosed, QueueFull

SAMPLE_FIELDS = ("label", "seed", "steps", "scale", "rule", "format")
REQUIRED_FIELDS = ("label", "seed", "steps")
MEDIA_TYPES = {"png": "image/png", "npy": "application/x-npy"}
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"
ENDPOINTS = "POST /v1/samples, GET /health, GET /metrics"
CLIENT_GONE = 499  # nginx's "client closed request": the status of a response nobody receives
RETRY_AFTER = {"Retry-After": "1"}


class _Refusal(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServerState:
    """What the app keeps besides the batcher: whether it is closing, and responses by status class."""

    closing: bool = False
    responses: dict = field(default_factory=lambda: {f"{c}xx": 0 for c in range(1, 6)})
    in_flight: int = 0

    def prometheus_text(self, prefix: str = "fastguide") -> str:
        lines = [f"# HELP {prefix}_http_responses_total HTTP responses sent, by status code class.",
                 f"# TYPE {prefix}_http_responses_total counter"]
        lines += [f'{prefix}_http_responses_total{{code="{code}"}} {n}' for code, n in self.responses.items()]
        lines += [f"# HELP {prefix}_http_requests_in_flight HTTP requests being handled.",
                  f"# TYPE {prefix}_http_requests_in_flight gauge",
                  f"{prefix}_http_requests_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"


class _CountResponses:
    """ASGI middleware: counts each response's status class as it starts (every ASGI call runs on the event loop's
    thread, so the counts need no lock)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                key = f"{message['status'] // 100}xx"
                if key in self.state.responses:
                    self.state.responses[key] += 1
            await send(message)

        self.state.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.state.in_flight -= 1


def _error(status: int, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _field_named(error: Exception) -> str:
    """The batcher's message with its ``cond`` spelled as the HTTP field ``label``."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "label" + message[len("cond"):] if message.startswith("cond:") else message


def _json_kind(value) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _parse_sample_request(batcher: Batcher, body: bytes):
    """(the validated SampleRequest, the format) of a POST /v1/samples body; a _Refusal naming the field otherwise."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested too deeply for the parser
        raise _Refusal(400, f"body: not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise _Refusal(400, f"body: expected a JSON object with fields {', '.join(SAMPLE_FIELDS)}, got "
                            f"{_json_kind(payload)}")
    unknown = [name for name in payload if name not in SAMPLE_FIELDS]
    if unknown:
        raise _Refusal(400, f"{unknown[0][:100]}: unknown field (expected {', '.join(SAMPLE_FIELDS)})")
    missing = [name for name in REQUIRED_FIELDS if name not in payload]
    if missing:
        raise _Refusal(400, f"{missing[0]}: required field missing")
    fmt = payload.get("format")
    fmt = "png" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt not in MEDIA_TYPES:
        raise _Refusal(400, f"format: expected one of {sorted(MEDIA_TYPES)}, got {fmt!r}")
    scale = payload.get("scale")
    try:
        request = batcher.check_request(payload["label"], payload["seed"], payload["steps"], scale,
                                        payload.get("rule"))
    except (ValueError, TypeError) as e:
        raise _Refusal(400, _field_named(e)) from None
    if fmt == "png" and batcher.latent_shape[0] != 1:
        raise _Refusal(400, f"format: png needs one-channel samples, this model's are {list(batcher.latent_shape)}; "
                            "ask for npy")
    return request, fmt


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"body: {declared} bytes, more than the {limit} accepted")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies declare no length: counted as they arrive
        body += chunk
        if len(body) > limit:
            raise _Refusal(413, f"body: more than the {limit} bytes accepted")
    return bytes(body)


async def _until_disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _result_unless_disconnected(receive, future):
    """The batcher's result future as an asyncio future, once done; None when the client disconnected first (a
    request still waiting in the queue is then withdrawn)."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()  # cancels the batcher's future too, which succeeds while it waits in the queue
    return None if result.cancelled() else result


def sample_npy(sample: torch.Tensor) -> bytes:
    """The sample as a .npy file: numpy.save of the float32 [C, H, W] array (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, sample.detach().to(torch.float32).cpu().numpy(), allow_pickle=False)
    return buffer.getvalue()


def sample_png(sample: torch.Tensor) -> bytes:
    """A one-channel sample as an 8-bit grayscale PNG, drawn as `fastguide sample` draws digits (gray_r from -1 to
    1): pixel = round(127.5 * (1 - clamp(x, -1, 1))), so -1 is white (255) and 1 black (0)."""
    from PIL import Image  # pillow comes with matplotlib, a dependency

    x = sample.detach().to(torch.float64).cpu().clamp(-1, 1)[0].numpy()
    pixels = np.rint(127.5 * (1.0 - x)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def create_app(batcher: Batcher, *, max_body_bytes: int = 16384) -> Starlette:
    """The ASGI app over a started ``batcher`` (its lifespan shutdown closes the batcher, draining the queue)."""
    state = ServerState()

    async def create_sample(request: Request) -> Response:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            return _error(415, f"content-type: expected application/json, got {content_type or 'none'!r}")
        try:
            sample_request, fmt = _parse_sample_request(batcher, await _read_body(request, max_body_bytes))
        except _Refusal as refusal:
            return _error(refusal.status, refusal.message)
        except ClientDisconnect:
            return _error(CLIENT_GONE, "body: the client disconnected while sending it")
        try:
            future = batcher.submit(sample_request.cond, seed=sample_request.seed, steps=sample_request.steps,
                                    scale=sample_request.scale, rule=sample_request.rule)
        except QueueFull as e:
            return _error(503, str(e), RETRY_AFTER)
        except BatcherClosed as e:
            state.closing = True
            return _error(503, f"server: closing ({e})", RETRY_AFTER)
        except (ValueError, TypeError) as e:
            return _error(400, _field_named(e))
        except Exception as e:  # noqa: BLE001 - e.g. a failing solver_for: reported, never a traceback
            return _error(500, f"server: {type(e).__name__}: {_field_named(e)}")
        done = await _result_unless_disconnected(request.receive, future)
        if done is None:
            return _error(CLIENT_GONE, "client: disconnected before the sample was ready")
        try:
            result = done.result()
        except BatcherClosed as e:
            return _error(503, f"server: closing ({e})", RETRY_AFTER)
        except ValueError as e:  # the batcher's report of a NaN / inf sample
            return _error(500, _field_named(e))
        except Exception as e:  # noqa: BLE001
            return _error(500, f"server: {type(e).__name__}: {_field_named(e)}")
        content = sample_npy(result.sample) if fmt == "npy" else sample_png(result.sample)
        headers = {"X-Fastguide-Bucket": str(result.bucket), "X-Fastguide-Queued-Ms": f"{result.queued_s * 1e3:.3f}",
                   "X-Fastguide-Run-Ms": f"{result.run_s * 1e3:.3f}", "X-Fastguide-Worker": str(result.worker)}
        return Response(content, media_type=MEDIA_TYPES[fmt], headers=headers)

    async def health(request: Request) -> Response:
        if state.closing:
            return JSONResponse({"status": "closing"}, status_code=503, headers=RETRY_AFTER)
        return JSONResponse({"status": "ok", "queue_depth": batcher.metrics().queue_depth, "rules": list(batcher.rules),
                             "buckets": list(batcher.buckets), "steps_range": list(batcher.steps_range),
                             "latent_shape": list(batcher.latent_shape)})

    async def metrics(request: Request) -> Response:
        text = batcher.metrics().prometheus_text() + state.prometheus_text()
        return Response(text, media_type=PROMETHEUS_CONTENT_TYPE)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            message = f"path: no endpoint at {request.url.path} (endpoints: {ENDPOINTS})"
        elif exc.status_code == 405:
            message = (f"method: {request.method} is not allowed on {request.url.path} (allowed: "
                       f"{(exc.headers or {}).get('Allow', '?')})")
        else:
            message = f"request: {exc.detail}"
        return _error(exc.status_code, message, exc.headers)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield  # nothing heavy at startup: the batcher is started (and warmed up) before the port opens
        state.closing = True
        await asyncio.to_thread(batcher.close, drain=True)  # queued requests still run

    app = Starlette(routes=[Route("/v1/samples", create_sample, methods=["POST"]),
                            Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])],
                    middleware=[Middleware(_CountResponses, state=state)],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.state.fastguide = state
    return app


def bind_socket(host: str = "127.0.0.1", port: int = 8000, option_prefix: str = "") -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening (uvicorn listens once the app is up). Errors name the
    host or port (``option_prefix`` "--": as command-line options)."""
    host_name, port_name = f"{option_prefix}host", f"{option_prefix}port"
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{port_name}: expected a TCP port in 0..65535 (0: any free one), got {port!r}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"{host_name}: cannot resolve {host!r} ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"{port_name}: {host}:{port} is already in use (another process listens there; "
                             f"pick another {port_name})") from None
        name = port_name if e.errno == errno.EACCES else host_name
        raise ValueError(f"{name}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def serve(batcher: Batcher, host: str = "127.0.0.1", port: int = 8000, *, sock: socket.socket | None = None,
          max_body_bytes: int = 16384, on_listening: Callable[[str], None] | None = None, **uvicorn_kw) -> None:
    """Serve ``batcher`` (started: :meth:`Batcher.start` warms it up) over HTTP on host:port (or the bound ``sock``)
    until SIGTERM / SIGINT, then stop accepting, let requests in flight finish, close the batcher (draining its
    queue) and return. ``on_listening(url)`` runs once the socket accepts connections. ``uvicorn_kw``: options of
    ``uvicorn.Config`` (log_level defaults to "warning")."""
    if not batcher.running:
        raise ValueError("batcher: not running; start() it (which warms it up) before serving it")
    app = create_app(batcher, max_body_bytes=max_body_bytes)
    sock = bind_socket(host, port) if sock is None else sock
    config = uvicorn.Config(app, lifespan="on", **{"log_level": "warning", **uvicorn_kw})
    server = _Server(config, app.state.fastguide, host, on_listening)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        batcher.close(drain=False)  # a no-op after the lifespan's drain; stops the worker if uvicorn failed


class _Server(uvicorn.Server):
    """uvicorn's Server, reporting when it listens, marking the app closing on a signal, and returning normally after
    a signal's graceful shutdown (uvicorn itself re-raises the signal once it has shut down)."""

    def __init__(self, config, state: ServerState, host: str, on_listening):
        super().__init__(config)
        self._state, self._host, self._on_listening = state, host, on_listening

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if self.started and self._on_listening is not None:
            port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self._host}]" if ":" in self._host else self._host
            self._on_listening(f"http://{host}:{port}")

    def handle_exit(self, sig, frame):
        self._state.closing = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
