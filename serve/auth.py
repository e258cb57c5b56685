"""Bearer-token auth for serve: only the gateway (which holds the shared token) may generate.

serve's routes take any prompt and any sampling values, so nothing but the gateway (which authenticates
users, rate-limits and validates) should reach them. With ``INSTRUCTLOOP_SERVE_AUTH_TOKEN`` set, every
route except ``/health`` (the kubelet's and the gateway's health checks) and ``/metrics`` (Prometheus)
needs ``Authorization: Bearer <token>``; the gateway sends it (``INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN``).
The comparison is constant-time (``hmac.compare_digest``), so the answer's timing says nothing about
how much of a guess was right. A refusal is a TGI-style error: 401 ``{"error", "error_type"}``.
"""

from __future__ import annotations

import hmac
import json
import logging

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})


class BearerTokenAuth:
    """Plain ASGI middleware (streaming untouched): refuse requests without the right bearer token."""

    def __init__(self, app, token: str, on_refused=None):
        if not token:
            raise ValueError(
                "an empty serve auth token would accept anything: set INSTRUCTLOOP_SERVE_AUTH_TOKEN"
            )
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        reason = "missing" if not given else "wrong"
        log.warning(
            "refused a request without the serve token",
            extra={"path": scope["path"], "reason": reason, "client": (scope.get("client") or ("?",))[0]},
        )
        if self._on_refused is not None:
            self._on_refused()
        body = json.dumps(
            {
                "error": f"{reason} bearer token: serve answers only the gateway "
                "(INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN must equal INSTRUCTLOOP_SERVE_AUTH_TOKEN)",
                "error_type": "unauthorized",
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
