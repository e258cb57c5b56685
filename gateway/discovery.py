"""Finding the backend replicas behind one DNS name (Kubernetes: a headless Service).

A ClusterIP Service hides its pods behind one address, so the gateway would balance, health-check and
retry over one "replica" while kube-proxy spreads connections it cannot see. A headless Service
(``clusterIP: None``) instead answers a DNS query for its name with one A (or AAAA) record per ready pod.
``DnsDiscovery.resolve()`` asks the system resolver (``getaddrinfo``: ``/etc/hosts``, then DNS, as
``/etc/nsswitch.conf`` says) for every address of the URL's host and returns one replica URL per
address, with the URL's scheme and port; ``Backend`` re-resolves every ``refresh_s`` seconds and adds
or retires replicas to match (``Backend.set_replicas``).

A failed lookup raises ``DiscoveryError``; the caller keeps the replicas it had (a DNS hiccup must not
empty the pool; a pod that really went away fails its health checks meanwhile). A headless Service with
no ready pod answers NXDOMAIN, which is such a failure: the gateway is then not ready either way.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from gateway.backend import Backend

log = logging.getLogger(__name__)


class DiscoveryError(RuntimeError):
    """The name could not be resolved; the message names it and the resolver's error."""


def replica_url(template: str, address: str) -> str:
    """``template``'s scheme and port with ``address`` as the host (IPv6 in brackets), no trailing ``/``.

    ``replica_url("http://serve-pods:8080", "10.1.2.3") == "http://10.1.2.3:8080"``
    """
    parts = urlsplit(template)
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path.rstrip('/')}"


@dataclass(frozen=True)
class DnsDiscovery:
    """Every address of ``url``'s host name is one replica (``url``: e.g. ``http://serve-pods:8080``)."""

    url: str
    refresh_s: float = 5.0

    @property
    def host(self) -> str:
        host = urlsplit(self.url).hostname
        if not host:
            raise ValueError(f"{self.url!r} has no host name to resolve")
        return host

    async def resolve(self) -> list[str]:
        """The replica URLs, sorted and without duplicates; ``DiscoveryError`` when the lookup fails."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise DiscoveryError(f"cannot resolve {self.host!r} (from {self.url}): {exc}") from exc
        addresses = {info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)}
        return sorted(replica_url(self.url, address) for address in addresses)

    async def refresh(self, backend: Backend) -> None:
        """Resolve once and make the result ``backend``'s replicas; on a failed lookup keep the ones it has
        (counted in ``gateway_backend_discovery_errors_total``, logged). Joiners are health-checked at
        once."""
        try:
            urls = await self.resolve()
        except DiscoveryError as exc:
            backend.metrics.backend_discovery_errors.inc()
            log.warning(
                "backend discovery failed; keeping the current replicas",
                extra={"error": str(exc), "replicas": [r.url for r in backend.replicas]},
            )
            return
        added, _ = backend.set_replicas(urls)
        if added:  # they take traffic once healthy: check them now, not at the next health tick
            await backend.check_health([r for r in backend.replicas if r.url in added])

    async def follow(self, backend: Backend) -> None:
        """``refresh`` every ``refresh_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh(backend)
            except Exception:  # a bug here must not stop discovery
                log.exception("backend discovery failed")
