"""One thin router per resource: translate HTTP to a serving call and its result back to HTTP."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from gateway.protocol import APIError, ErrorResponse
from gateway.request_context import log_server_error
from gateway.serving_stream import CompletionStream
from instructloop.wire import POLICY_VERSION_HEADER

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 413, 422, 429, 503)}


def error_response(error: APIError) -> JSONResponse:
    """The OpenAI-shaped error answer; a 5xx is logged with the request id and its reason."""
    if error.status >= 500:
        log_server_error(error.status, error.message, error.code, type=error.type)
    return JSONResponse(
        error.to_response_model().model_dump(), status_code=error.status, headers=error.headers
    )


def client_gone() -> Response:
    """What a request whose client disconnected gets (nobody reads it; 499 in the access log and metrics)."""
    return Response(status_code=499)


def render(result: BaseModel | CompletionStream | APIError, status_code: int = 200):
    """A serving result as an HTTP response."""
    if isinstance(result, APIError):
        return error_response(result)
    if isinstance(result, CompletionStream):
        return StreamingResponse(
            result.body,
            media_type="text/event-stream",
            headers={
                POLICY_VERSION_HEADER: result.policy_version,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **result.headers,
            },
        )
    headers = {}
    version = getattr(result, "policy_version", None)
    if version:
        headers[POLICY_VERSION_HEADER] = version
    return JSONResponse(result.model_dump(mode="json"), status_code=status_code, headers=headers)
