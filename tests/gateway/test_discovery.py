"""Backend discovery: one replica per address a DNS name resolves to (Kubernetes: a headless Service).

Resolution goes through the system resolver like in a pod; here the names are ones that need no DNS
server: ``localhost`` (``/etc/hosts``), IP literals, and a ``.invalid`` name that never resolves. The
multi-pod case (two serve pods behind a headless Service, one killed) is proven by the deployment smoke
test (tests/deploy/test_smoke.py), where each pod's ``/etc/hosts`` stands in for the cluster DNS.
"""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from gateway.backend import Backend
from gateway.discovery import DiscoveryError, DnsDiscovery, replica_url
from gateway.metrics import GatewayMetrics
from gateway.settings import Settings
from tests.conftest import free_port
from tests.gateway.conftest import MODEL_NAME


def test_replica_url_keeps_scheme_port_and_brackets_ipv6():
    assert replica_url("http://serve-pods:8080", "10.1.2.3") == "http://10.1.2.3:8080"
    assert replica_url("https://serve-pods/", "10.1.2.3") == "https://10.1.2.3"
    assert replica_url("http://serve-pods:8080", "fd00::7") == "http://[fd00::7]:8080"


async def test_localhost_resolves_through_the_hosts_file():
    expected = {
        replica_url("http://x:8080", info[4][0])
        for info in socket.getaddrinfo("localhost", 8080, type=socket.SOCK_STREAM)
    }
    urls = await DnsDiscovery("http://localhost:8080").resolve()
    assert "http://127.0.0.1:8080" in urls
    assert set(urls) == expected and urls == sorted(set(urls))
    assert await DnsDiscovery("http://127.0.0.1:9").resolve() == ["http://127.0.0.1:9"]


async def test_a_name_that_does_not_resolve_raises_with_the_name():
    with pytest.raises(DiscoveryError, match="no-such-serve.invalid"):
        await DnsDiscovery("http://no-such-serve.invalid:8080").resolve()


async def test_set_replicas_adds_and_retires_and_drops_their_gauges():
    metrics = GatewayMetrics()
    backend = Backend([], metrics, discovery=DnsDiscovery("http://unused:1"))
    a, b = "http://10.0.0.1:8080", "http://10.0.0.2:8080"
    assert backend.set_replicas([a, b]) == ([a, b], [])
    for replica in backend.replicas:
        metrics.backend_healthy.labels(replica.url).set(1)
    old_b = backend.replicas[1]
    old_b.outstanding = 1  # a call still running on b when b leaves the name
    assert backend.set_replicas([a]) == ([], [b])
    assert [r.url for r in backend.replicas] == [a]
    assert old_b.retired and not old_b.healthy
    assert metrics.registry.get_sample_value("gateway_backend_healthy", {"backend": b}) is None
    assert metrics.registry.get_sample_value("gateway_backend_replicas") == 1
    session = old_b.client.session()
    backend._count_outstanding(old_b, -1)  # the call ends: the retired replica's client closes
    await backend.close()
    assert session.closed
    with pytest.raises(Exception, match="no healthy"):
        backend.pick()


async def test_a_failed_lookup_keeps_the_replicas_and_is_counted():
    metrics = GatewayMetrics()
    port = free_port()
    backend = Backend([], metrics, discovery=DnsDiscovery(f"http://127.0.0.1:{port}"), health_interval_s=3600)
    await backend.discovery.refresh(backend)
    assert [r.url for r in backend.replicas] == [f"http://127.0.0.1:{port}"]
    backend.discovery = DnsDiscovery(f"http://no-such-serve.invalid:{port}")
    await backend.discovery.refresh(backend)
    assert [r.url for r in backend.replicas] == [f"http://127.0.0.1:{port}"]
    assert metrics.registry.get_sample_value("gateway_backend_discovery_errors_total") == 1
    await backend.close()


def test_gateway_finds_serve_by_name_and_balances_over_what_it_resolved(start_gateway, serve, redis_server):
    port = serve.url.rsplit(":", 1)[1]
    gateway = start_gateway(
        [],
        redis_server.url_for("gateway"),
        backends_dns=f"http://localhost:{port}",
        backends_dns_refresh_s=0.2,
    )
    client = gateway.openai("alice")
    assert len(client.completions.create(model=MODEL_NAME, prompt="found", max_tokens=2, n=2).choices) == 2
    with gateway.http() as http:
        backends = http.get("/readyz").json()["backends"]
    assert backends[f"http://127.0.0.1:{port}"]["healthy"] is True
    assert (
        gateway.metric(
            "gateway_backend_requests_total", f'{{backend="http://127.0.0.1:{port}",outcome="ok"}}'
        )
        == 2
    )


def test_backends_dns_settings_are_checked_with_the_fix():
    assert (
        Settings(dev_mode=True, backends_dns="http://serve-pods:8080/").backends_dns
        == "http://serve-pods:8080"
    )
    with pytest.raises(ValidationError, match="BACKENDS_DNS=http://"):
        Settings(dev_mode=True, backends_dns="serve-pods:8080")
    with pytest.raises(ValidationError, match="unset one"):
        Settings(dev_mode=True, backends_dns="http://serve-pods:8080", backends=["http://a:1"])
    with pytest.raises(ValidationError, match="WORKERS=1"):
        Settings(dev_mode=True, metrics_port=9091, workers=2)
    with pytest.raises(ValidationError, match="equals"):
        Settings(dev_mode=True, metrics_port=8000)


def test_metrics_port_moves_metrics_off_the_api_port(start_gateway, serve, redis_server):
    import httpx

    metrics_port = free_port()
    gateway = start_gateway([serve.url], redis_server.url_for("gateway"), metrics_port=metrics_port)
    with gateway.http() as http:
        public = http.get("/metrics")
        assert http.get("/healthz").status_code == 200
    assert public.status_code == 404 and public.json()["error"]["code"] == "not_found"
    scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert scraped.status_code == 200 and "gateway_backend_healthy" in scraped.text
