"""serve is closed (finding 3): a bearer token only the gateway holds, a loopback default bind, /metrics alone
on its own port for monitoring; and extreme sampling values neither fail nor disturb other requests."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.backend import Backend
from gateway.metrics import GatewayMetrics
from serve.settings import Settings
from tests.conftest import free_port

TOKEN = "serve-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def closed_server(tmp_path_factory, tokenizer):
    from tests.conftest import build_tiny_model_dir
    from tests.serve.conftest import ServerThread

    model_dir = build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny-closed"), tokenizer, seed=0, initializer_range=0.3
    )
    server = ServerThread(
        model=str(model_dir),
        device="cpu",
        max_batch_size=8,
        max_queue=16,
        auth_token=TOKEN,
        metrics_port=free_port(),
        max_input_tokens=256,
        max_total_tokens=512,
    ).start()
    yield server
    server.stop()


def test_serve_binds_loopback_by_default_and_refuses_an_open_bind_without_a_token(monkeypatch):
    monkeypatch.delenv("INSTRUCTLOOP_SERVE_HOST", raising=False)
    monkeypatch.delenv("INSTRUCTLOOP_SERVE_AUTH_TOKEN", raising=False)
    assert Settings().host == "127.0.0.1"
    with pytest.raises(ValueError, match="INSTRUCTLOOP_SERVE_AUTH_TOKEN"):
        Settings(host="0.0.0.0")
    with pytest.raises(ValueError, match="INSTRUCTLOOP_SERVE_AUTH_TOKEN"):
        Settings(host="0.0.0.0", auth_token="  ")
    open_with_token = Settings(host="0.0.0.0", auth_token=TOKEN)
    assert TOKEN not in repr(open_with_token) and TOKEN not in str(open_with_token.model_dump())


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}],
)
@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/info"])
def test_every_route_but_health_and_metrics_needs_the_token(closed_server, headers, path):
    method = httpx.get if path == "/info" else httpx.post
    kwargs = {} if path == "/info" else {"json": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}}}
    resp = method(f"{closed_server.url}{path}", headers=headers, timeout=30, **kwargs)
    assert resp.status_code == 401
    assert (
        resp.json()["error_type"] == "unauthorized"
        and "INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN" in resp.json()["error"]
    )
    assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.slow
def test_health_and_metrics_stay_open_and_metrics_has_a_port_of_its_own(closed_server):
    assert httpx.get(f"{closed_server.url}/health").status_code == 200
    assert httpx.get(f"{closed_server.url}/metrics").status_code == 200
    resp = httpx.post(
        f"{closed_server.url}/generate", json={"inputs": "Hi"}, headers={"Authorization": "Bearer x"}
    )
    assert resp.status_code == 401
    metrics = httpx.get(f"http://127.0.0.1:{closed_server.settings.metrics_port}/metrics").text
    assert 'tgi_request_failure_total{err="unauthorized"}' in metrics


@pytest.mark.slow
async def test_the_gateway_backend_sends_the_token(closed_server):
    with_token = Backend([closed_server.url], GatewayMetrics(), token=TOKEN)
    without = Backend([closed_server.url], GatewayMetrics())
    try:
        response, version = await with_token.replicas[0].client.generate_versioned("Hi", max_new_tokens=2)
        assert response.details.generated_tokens == 2 and version == "base"
        with pytest.raises(Exception, match="bearer token"):
            await without.replicas[0].client.generate_versioned("Hi", max_new_tokens=2)
    finally:
        await with_token.close()
        await without.close()


@pytest.mark.slow
async def test_extreme_sampling_values_answer_and_do_not_disturb_other_requests(closed_server):
    """temperature or repetition_penalty of 1e38 answer 200 (finite output), and a greedy request decoded in
    the same batches gets exactly the tokens it gets alone."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    greedy = {"inputs": "Tell me about cats.", "parameters": {"max_new_tokens": 12, "details": True}}
    async with httpx.AsyncClient(base_url=closed_server.url, headers=auth, timeout=120) as client:
        alone = (await client.post("/generate", json=greedy)).json()["generated_text"]
        extreme = [
            {
                "inputs": "Hello",
                "parameters": {"max_new_tokens": 12, "do_sample": True, "details": True, **params, "seed": i},
            }
            for i, params in enumerate(
                [
                    {"temperature": 1e38},
                    {"repetition_penalty": 1e38},
                    {"temperature": 1e38, "repetition_penalty": 1e38},
                    {"temperature": 1e-38},
                    {"repetition_penalty": 1e-38},
                ]
            )
        ]
        answers = await asyncio.gather(
            *(client.post("/generate", json=body) for body in extreme), client.post("/generate", json=greedy)
        )
    for body, resp in zip(extreme, answers[:-1], strict=True):
        assert resp.status_code == 200, (body, resp.text)
        assert resp.json()["details"]["generated_tokens"] >= 1
    assert answers[-1].status_code == 200 and answers[-1].json()["generated_text"] == alone
