"""Backend balancing and failure handling with real serve replicas over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.conftest import free_port
from tests.gateway.conftest import MODEL_NAME


def test_connect_failure_is_retried_on_another_replica(start_gateway, serve, redis_server):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    gateway = start_gateway([dead, serve.url], redis_server.url_for("gateway"), health_interval_s=3600)
    replicas = {r.url: r for r in gateway.state.backend.replicas}
    assert replicas[dead].healthy is False and replicas[serve.url].healthy is True
    # a replica that died after its last health check: the checker has not noticed yet
    replicas[dead].healthy = True
    client = gateway.openai("alice")
    for _ in range(4):
        assert (
            len(client.completions.create(model=MODEL_NAME, prompt="retry", max_tokens=2, n=2).choices) == 2
        )
    assert replicas[dead].healthy is False
    assert (
        gateway.metric("gateway_backend_requests_total", f'{{backend="{dead}",outcome="connect_error"}}') == 1
    )
    assert gateway.metric("gateway_backend_requests_total", f'{{backend="{serve.url}",outcome="ok"}}') >= 8
    assert gateway.metric("gateway_backend_healthy", f'{{backend="{dead}"}}') == 0


def test_no_healthy_backend_answers_503(start_gateway, redis_server):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway([dead], redis_server.url_for("gateway"))
    with pytest.raises(openai.InternalServerError) as raised:
        gateway.openai("alice").completions.create(model=MODEL_NAME, prompt="anyone?", max_tokens=2)
    assert raised.value.status_code == 503
    assert raised.value.response.headers["Retry-After"]
    assert raised.value.body["code"] == "backend_unavailable"
    with gateway.http() as http:
        ready = http.get("/readyz")
    assert ready.status_code == 503 and ready.json()["backends"][dead]["healthy"] is False


def test_least_outstanding_balancing_spreads_concurrent_choices(start_gateway, serve, redis_server):
    # the same serve twice under two names: both healthy, so the n=6 choices must be spread 3/3
    alias = serve.url.replace("127.0.0.1", "localhost")
    gateway = start_gateway([serve.url, alias], redis_server.url_for("gateway"))
    gateway.openai("alice").completions.create(model=MODEL_NAME, prompt="spread", max_tokens=2, n=6)
    ok = [
        gateway.metric("gateway_backend_requests_total", f'{{backend="{u}",outcome="ok"}}')
        for u in (serve.url, alias)
    ]
    assert ok == [3, 3]


def test_client_gone_mid_stream_is_counted(gateway):
    body = {
        "model": MODEL_NAME,
        "prompt": "A long story:",
        "max_tokens": 400,
        "stream": True,
        "temperature": 1.0,
    }
    with httpx.Client(base_url=gateway.url, headers=gateway.headers("alice"), timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # one token, then hang up
    deadline = time.monotonic() + 20
    while gateway.metric("gateway_stream_write_failures_total") < 1:
        assert time.monotonic() < deadline, "the dropped stream was not noticed"
        time.sleep(0.1)
    # nothing half-done is logged as a served completion
    assert gateway.metric("gateway_completions_logged_total") == 0


class _ClosesReusedConnections:
    """A TGI-protocol server that, like uvicorn closing an idle keep-alive connection at the moment the
    gateway reuses it, drops the second /generate that arrives on one connection without answering."""

    ANSWER = json.dumps(
        {
            "generated_text": "ok",
            "details": {"finish_reason": "length", "generated_tokens": 1, "prefill": [], "tokens": []},
        }
    ).encode()

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.dropped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader, generates = conn.makefile("rb"), 0
        with conn:
            while request_line := reader.readline():
                headers = {}
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                reader.read(int(headers.get("content-length", 0)))
                if b"/generate" in request_line:
                    generates += 1
                    if generates == 2:
                        self.dropped += 1
                        return  # closed under the client's feet
                body = self.ANSWER if b"/generate" in request_line else b"{}"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Policy-Version: base\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
async def test_a_keep_alive_connection_closed_by_the_replica_is_retried_not_a_502():
    """The unexplained 502 under load: a pooled connection serve had just closed was reused and the call
    failed with "Server disconnected" before any answer. Such a call is retried once on a fresh connection."""
    from gateway.backend import Backend
    from gateway.metrics import GatewayMetrics

    server = _ClosesReusedConnections()
    url = server.url
    backend = Backend([url], GatewayMetrics(), health_interval_s=3600)
    await backend.start()
    try:
        for _ in range(4):  # sequential: every call reuses the one pooled connection
            generation = await backend.generate("hi", {"max_new_tokens": 1})
            assert generation.text == "ok" and generation.policy_version == "base"
    finally:
        await backend.close()
        server.close()
    assert server.dropped >= 1
    assert backend.metrics.backend_requests.labels(url, "stale_connection_retry")._value.get() >= 1


def test_adapter_id_travels_in_the_tgi_parameters():
    """text-generation 0.7's Parameters has no adapter_id: the backend adds TGI's field itself."""
    from gateway.backend import PolicyAwareClient

    named = PolicyAwareClient._request("Hi", False, max_new_tokens=3, adapter_id="v0002")
    assert named["inputs"] == "Hi" and named["parameters"]["adapter_id"] == "v0002"
    assert named["parameters"]["max_new_tokens"] == 3
    assert "adapter_id" not in PolicyAwareClient._request("Hi", False, max_new_tokens=3)["parameters"]
