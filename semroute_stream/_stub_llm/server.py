"""The stub's HTTP server on loopback: ``LLMStub`` (start, stop, scripted failures, counts).

See the package docstring for the endpoints and the answers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .answers import STUB_OWNER, StubFailure, StubRequest, expected_content, text_of, words

__all__ = ["LLMStub"]


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # many clients connect at once (the default backlog is 5)
    daemon_threads = True
    allow_reuse_address = True
    stub: LLMStub

    def __init__(self, addr: tuple[str, int], stub: LLMStub) -> None:
        self.stub = stub
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conn_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conn_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.conn_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # dropped connections (down mode, disconnect failures) are expected


class _Handler(BaseHTTPRequestHandler):
    disable_nagle_algorithm = True  # headers and body go out in two sends: no 40 ms ACK wait
    protocol_version = "HTTP/1.1"  # keep-alive, like a real endpoint
    server: _Server
    server_version = "llm-stub/1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.stub.verbose:
            super().log_message(format, *args)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self._leave()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.server.stub.name:
            self.send_header("X-Stub-Name", self.server.stub.name)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        err_type = "invalid_request_error" if status < 500 else "server_error"
        if status == 429:
            err_type = "rate_limit_error"
        body = {"error": {"message": message, "type": err_type, "param": None, "code": status}}
        self._send_json(status, body, headers)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        stub = self.server.stub
        if path == "/healthz":
            self._send_json(200, {"status": "ok", "name": stub.name})
        elif path in ("/v1/models", "/models"):
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": stub.owner}
                for m in stub.models
            ]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._error(404, f"no route GET {path}")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route POST {path}")
            return
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        stub = self.server.stub
        req = StubRequest(
            method="POST",
            path=path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.time(),
        )
        stub._enter(req)
        self._in_flight = True
        try:
            self._complete(stub, req)
        finally:
            self._leave()

    def _leave(self) -> None:
        # before the response goes out: a client holding its answer sees the counters final
        if getattr(self, "_in_flight", False):
            self._in_flight = False
            self.server.stub._leave()

    def _complete(self, stub: LLMStub, req: StubRequest) -> None:
        latency = stub.latency
        if latency > 0 and stub._stopping.wait(latency):
            self.close_connection = True  # stopped while "thinking": drop the connection
            return
        failure = stub._next_failure()
        if failure is not None:
            stub._count("failure")
            if failure.disconnect:
                self._leave()
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            headers = {}
            if failure.retry_after is not None:
                headers["Retry-After"] = f"{failure.retry_after:g}"
            self._error(failure.status, failure.message, headers)
            return
        body = req.body
        if stub.api_key is not None and req.headers.get("authorization") != (
            f"Bearer {stub.api_key}"
        ):
            stub._count("failure")
            self._error(401, "invalid api key")
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            stub._count("failure")
            self._error(400, "body must be a JSON object with a 'messages' list")
            return
        if not body.get("model"):
            stub._count("failure")
            self._error(400, "'model' is required")
            return
        if body.get("stream"):
            stub._count("failure")
            self._error(400, "llm-stub does not stream")
            return
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        content = expected_content(messages, stub.name)
        prompt_tokens = sum(words(text_of(m.get("content"))) for m in messages)
        completion_tokens = words(content)
        stub._count("success")
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
                "system_fingerprint": "llm-stub",
            },
        )


class LLMStub:
    """An OpenAI-compatible chat-completions server in a background thread.

    ``port=0`` picks a free port on start; ``stop()`` keeps the port so that ``start()`` comes
    back on the same one (connections are refused in between). ``latency`` (seconds) is slept
    before every completion. Thread-safe: tests change behaviour while requests are in flight.
    """

    def __init__(
        self,
        port: int = 0,
        latency: float = 0.0,
        *,
        host: str = "127.0.0.1",
        name: str | None = None,
        models: tuple[str, ...] = ("stub-model",),
        api_key: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.name = name
        self.models = models
        self.owner = STUB_OWNER  # /v1/models' owned_by (tests set another to play a real server)
        self.api_key = api_key  # when set, requests must send "Authorization: Bearer KEY"
        self.verbose = verbose
        self._lock = threading.Lock()
        self._failures: deque[StubFailure] = deque()
        self._always: StubFailure | None = None
        self._requests: list[StubRequest] = []
        self._counts = {"success": 0, "failure": 0}
        self._in_flight = 0
        self._max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> LLMStub:
        """Listen (again) and serve in a daemon thread. Returns self."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"llm-stub:{self.port}"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: clients now get connection refused.

        Requests waiting out their latency are dropped without a response."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> LLMStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (no path)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://HOST:PORT/v1``: the base URL an OpenAI-compatible client wants."""
        return self.base_url + "/v1"

    @property
    def completions_url(self) -> str:
        return self.url + "/chat/completions"

    # -- behaviour -------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        retry_after: float | None = None,
        *,
        message: str = "injected failure",
        disconnect: bool = False,
    ) -> None:
        """Fail the next ``n`` completions (after any already queued) with ``status`` and an
        OpenAI-style error body, plus ``Retry-After`` if given; or, with ``disconnect``,
        drop the connection without a response."""
        failure = StubFailure(status, retry_after, message, disconnect)
        with self._lock:
            self._failures.extend([failure] * n)

    def fail_always(
        self,
        status: int = 400,
        retry_after: float | None = None,
        *,
        message: str = "injected failure",
        disconnect: bool = False,
    ) -> None:
        """Fail every completion (once the fail_next queue is empty) until clear()."""
        with self._lock:
            self._always = StubFailure(status, retry_after, message, disconnect)

    def clear(self) -> None:
        """Forget every scripted failure (latency, the request log and counters stay)."""
        with self._lock:
            self._failures.clear()
            self._always = None

    def reset(self) -> None:
        """clear(), and forget the request log and counters (latency stays)."""
        self.clear()
        with self._lock:
            self._requests.clear()
            self._counts = {"success": 0, "failure": 0}
            self._max_in_flight = self._in_flight

    # -- observations ----------------------------------------------------------------------

    @property
    def requests(self) -> list[StubRequest]:
        """A copy of the chat-completions requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    @property
    def success_count(self) -> int:
        with self._lock:
            return self._counts["success"]

    @property
    def failure_count(self) -> int:
        """Completions answered with an error (injected or invalid) or a dropped connection."""
        with self._lock:
            return self._counts["failure"]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most completions handled at the same time (for concurrency-limit tests)."""
        with self._lock:
            return self._max_in_flight

    # -- used by the handler ---------------------------------------------------------------

    def _enter(self, req: StubRequest) -> None:
        with self._lock:
            self._requests.append(req)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _next_failure(self) -> StubFailure | None:
        with self._lock:
            if self._failures:
                return self._failures.popleft()
            return self._always

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1
