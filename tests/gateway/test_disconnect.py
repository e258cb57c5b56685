"""A client that leaves before its answer is ready: the gateway cancels every choice's backend request
(serve takes the sequences out of its batch) and records nothing."""

from __future__ import annotations

import time

import httpx
import pytest

from instructloop.streams import Stream, stream_key
from tests.gateway.conftest import MODEL_NAME


def _serve_metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/completions", {"prompt": "Go on and on"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Go on and on"}]}),
    ],
)
def test_a_client_that_leaves_cancels_its_choices(gateway, serve, redis_server, route, body):
    cancelled = "instructloop_serve_request_cancelled_total"
    before = _serve_metric(serve.url, cancelled)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.url}{route}",
            headers=gateway.headers("alice"),
            timeout=httpx.Timeout(60, read=0.5),
            json={"model": MODEL_NAME, "max_tokens": 1400, "n": 2, "temperature": 1.0, "seed": 3, **body},
        )
    deadline = time.monotonic() + 30
    while _serve_metric(serve.url, cancelled) < before + 2:
        assert time.monotonic() < deadline, "serve never saw both choices cancelled"
        time.sleep(0.1)
    assert redis_server.client().xlen(stream_key(Stream.completions)) == 0
