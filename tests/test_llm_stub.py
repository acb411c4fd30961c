"""Real HTTP tests of the OpenAI-compatible stub (semroute_stream/_stub_llm/, re-exported by
tests/llm_stub.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from llm_stub import LLMStub, expected_content

MESSAGES = [
    {"role": "system", "content": "You are the billing desk.\nBe brief."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "Why was I charged twice?"},
]


def _chat(client: httpx.Client, url: str, model: str = "m-1", **extra: object) -> httpx.Response:
    return client.post(
        url + "/chat/completions",
        json={"model": model, "messages": MESSAGES, **extra},
        headers={"Authorization": "Bearer sk-test"},
    )


def test_response_shape_and_echo(llm_stub: LLMStub) -> None:
    assert llm_stub.url == f"http://127.0.0.1:{llm_stub.port}/v1"
    with httpx.Client() as client:
        resp = _chat(client, llm_stub.url, model="billing-model", temperature=0)
        assert resp.status_code == 200
        body = resp.json()
        assert body["object"] == "chat.completion"
        assert body["id"].startswith("chatcmpl-")
        assert isinstance(body["created"], int)
        assert body["model"] == "billing-model"
        (choice,) = body["choices"]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["role"] == "assistant"
        content = choice["message"]["content"]
        assert content == "[system: You are the billing desk.] echo: Why was I charged twice?"
        assert content == expected_content(MESSAGES)
        usage = body["usage"]
        assert usage["completion_tokens"] == len(content.split())
        assert usage["prompt_tokens"] == 16  # whitespace-separated words
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

        # the path without /v1, other endpoints
        resp2 = client.post(
            llm_stub.base_url + "/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert resp2.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert client.get(llm_stub.url + "/models").json()["data"][0]["id"] == "stub-model"
        assert client.get(llm_stub.base_url + "/healthz").json()["status"] == "ok"
        assert client.get(llm_stub.url + "/nope").status_code == 404
        bad = client.post(llm_stub.url + "/chat/completions", content=b"not json")
        assert bad.status_code == 400
        assert "messages" in bad.json()["error"]["message"]

    reqs = llm_stub.requests
    assert [r.model for r in reqs] == ["billing-model", "x", None]
    assert reqs[0].headers["authorization"] == "Bearer sk-test"
    assert reqs[0].body["temperature"] == 0
    assert reqs[0].messages == MESSAGES
    assert (llm_stub.request_count, llm_stub.success_count, llm_stub.failure_count) == (3, 2, 1)


def test_named_stub_and_content_parts() -> None:
    with LLMStub(name="ep-b") as stub, httpx.Client() as client:
        msgs = [{"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "x"}]}]
        resp = client.post(stub.completions_url, json={"model": "m", "messages": msgs})
        assert resp.json()["choices"][0]["message"]["content"] == "[ep-b] echo: multi"
        assert resp.headers["x-stub-name"] == "ep-b"


def test_failure_script(llm_stub: LLMStub) -> None:
    llm_stub.fail_next(2, status=503, retry_after=1.5)
    llm_stub.fail_next(1, status=429)
    with httpx.Client() as client:
        r1, r2, r3, r4 = (_chat(client, llm_stub.url) for _ in range(4))
        assert (r1.status_code, r1.headers["retry-after"]) == (503, "1.5")
        assert r1.json()["error"]["type"] == "server_error"
        assert r2.status_code == 503
        assert r3.status_code == 429 and "retry-after" not in r3.headers
        assert r3.json()["error"]["type"] == "rate_limit_error"
        assert r4.status_code == 200

        llm_stub.fail_always(status=400, message="bad prompt")
        for _ in range(3):
            resp = _chat(client, llm_stub.url)
            assert resp.status_code == 400
            assert resp.json()["error"]["message"] == "bad prompt"
        llm_stub.clear()
        assert _chat(client, llm_stub.url).status_code == 200

        llm_stub.fail_next(1, disconnect=True)
        with pytest.raises(httpx.RemoteProtocolError):
            _chat(client, llm_stub.url)
        assert _chat(client, llm_stub.url).status_code == 200
    assert (llm_stub.request_count, llm_stub.success_count, llm_stub.failure_count) == (10, 3, 7)
    llm_stub.reset()
    assert llm_stub.requests == [] and llm_stub.failure_count == 0


async def test_latency_and_concurrency() -> None:
    with LLMStub(latency=0.3) as stub:
        async with httpx.AsyncClient() as client:
            t0 = time.perf_counter()
            resps = await asyncio.gather(
                *(
                    client.post(
                        stub.completions_url,
                        json={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
                    )
                    for i in range(5)
                )
            )
            elapsed = time.perf_counter() - t0
        assert [r.json()["choices"][0]["message"]["content"] for r in resps] == [
            f"echo: q{i}" for i in range(5)
        ]
        assert 0.3 <= elapsed < 1.45  # concurrent: 5 in a row would take 1.5 s
        assert stub.max_in_flight == 5
        assert stub.in_flight == 0


def test_down_mode_refuses_then_recovers_on_same_port(llm_stub: LLMStub) -> None:
    port = llm_stub.port
    with httpx.Client() as client:  # keeps a pooled keep-alive connection
        assert _chat(client, llm_stub.url).status_code == 200
        llm_stub.stop()
        assert not llm_stub.running
        with pytest.raises(httpx.ConnectError):
            _chat(client, llm_stub.url)
        llm_stub.start()
        assert llm_stub.port == port
        assert _chat(client, llm_stub.url).status_code == 200


def test_stop_drops_a_request_in_flight() -> None:
    stub = LLMStub(latency=5).start()
    errors: list[Exception] = []

    def call() -> None:
        try:
            httpx.post(stub.completions_url, json={"model": "m", "messages": []}, timeout=10)
        except httpx.HTTPError as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while stub.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    stub.stop()
    t.join(timeout=5)
    assert time.monotonic() - t0 < 2
    assert len(errors) == 1 and isinstance(errors[0], httpx.RemoteProtocolError)


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, str(Path(__file__).with_name("llm_stub.py"))],
        [sys.executable, "-m", "semroute_stream", "stub-llm"],  # as docker/compose.yaml runs it
    ],
    ids=["tests-script", "package-cli"],
)
def test_cli_serves_until_sigterm(command: list[str]) -> None:
    with LLMStub() as probe:  # borrow a free port
        port = probe.port
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--latency-ms", "50", "--name", "cli"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline()
        t0 = time.perf_counter()
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "ping"}]},
        )
        assert time.perf_counter() - t0 >= 0.05
        assert resp.json()["choices"][0]["message"]["content"] == "[cli] echo: ping"
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        if proc.stdout is not None:
            proc.stdout.close()
