"""The request being handled: its id (a context variable the middleware sets), the 5xx log, and
``until_disconnected`` (cancel the work when the client goes away, then raise ``ClientGone``).

Every answer carries ``X-Request-Id`` (the client's, when it is a sane token, else a new one), and every
5xx the gateway sends is logged once, at error level, with that id, the status, the error code and why:
an operator can always go from a client's 5xx to its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TypeVar

from fastapi import Request

log = logging.getLogger(__name__)
errors_log = logging.getLogger("gateway.errors")

T = TypeVar("T")

_SANE = re.compile(r"[A-Za-z0-9._:-]{1,64}")

request_id: ContextVar[str] = ContextVar("request_id", default="-")
"""The current request's id ("-" outside a request)."""

server_error_logged: ContextVar[bool] = ContextVar("server_error_logged", default=False)


def new_request_id(client_value: bytes | None) -> str:
    """The client's ``X-Request-Id`` if it is 1-64 characters of ``[A-Za-z0-9._:-]``, else a new uuid."""
    if client_value:
        text = client_value.decode("latin-1")
        if _SANE.fullmatch(text):
            return text
    return uuid.uuid4().hex


def log_server_error(status: int, reason: str, code: str | None = None, **extra: object) -> None:
    """Log a 5xx answer with the request id (once per request)."""
    server_error_logged.set(True)
    errors_log.error(
        "answered %d: %s",
        status,
        reason,
        extra={"request_id": request_id.get(), "status": status, "code": code, **extra},
    )


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def until_disconnected(request: Request | None, work: Awaitable[T]) -> T:
    """The gateway's one client-disconnect helper (serve has its own, with the same contract): await
    ``work``; if the client disconnects first, cancel ``work`` (so the backends stop), wait until it has
    stopped, and raise ``ClientGone`` (the app answers 499). ``request=None`` just awaits ``work``."""
    if request is None:
        return await work
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch_task.cancel()
    if work_task.done():
        return work_task.result()
    work_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task
    log.info("client disconnected; generation cancelled")
    raise ClientGone()


async def _disconnect(request: Request) -> None:
    """Return once the ASGI server reports that the client went away."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
