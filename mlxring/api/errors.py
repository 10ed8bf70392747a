"""Errors answered to a client, all in OpenAI's shape `{"error": {message, type, param, code}}`.

`ApiError` is raised anywhere below a handler and answered by the middleware; the constructors
here are the ones several modules share, and `http_error` gives aiohttp's own errors (no route,
wrong method, body too big) the same shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.close = close  # closes the connection once the answer is sent

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(
        self, *, body: dict[str, Any] | None = None, status: int | None = None
    ) -> web.Response:
        """The answer; another API's shape gives its own `body` and `status` for the error."""
        body = self.body() if body is None else body
        status = self.status if status is None else status
        if self.close is None:
            return web.json_response(body, status=status, headers=self.headers)
        return _Closing(self.close, body, status, self.headers)


class _Closing(web.Response):
    """An error answer after which its connection closes at once. Not a keep-alive close: with
    part of a request's body unread, aiohttp would read on for its lingering time (10 s) first,
    from a client that may be dripping it."""

    def __init__(
        self, close: Callable[[], None], body: Any, status: int, headers: dict[str, str]
    ) -> None:
        super().__init__(
            text=json.dumps(body), status=status, headers=headers, content_type="application/json"
        )
        self._close_connection = close
        self.force_close()  # says `Connection: close`

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data)
        self._close_connection()  # the answer is in the transport's buffer: flushed, then closed


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(reason: str) -> ApiError:
    # Retry-After: the ring re-forms within a few heartbeats once its nodes are back.
    return ApiError(
        503,
        f"The cluster cannot serve this request: {reason}",
        type_="cluster_unavailable",
        code="cluster_unavailable",
        headers={"Retry-After": "2"},
    )


def internal_error() -> ApiError:
    return ApiError(
        500,
        "The server had an error while processing your request. Check the node's log.",
        type_="server_error",
    )


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes "
        "(api.max_body_bytes).",
        code="request_too_large",
    )


def body_too_slow(timeout_s: float, close: Callable[[], None]) -> ApiError:
    """408 for a body that has not all come in time; `close` ends its connection after the
    answer (the rest of the body may still be on its way)."""
    return ApiError(
        408,
        f"The request body did not arrive within this server's limit of {timeout_s:g} s "
        "(api.body_timeout_s).",
        code="request_timeout",
        close=close,
    )


def http_error(e: web.HTTPException, request: web.Request, max_body_bytes: int) -> ApiError:
    """aiohttp's own errors (no route, wrong method, body too big) in OpenAI's shape."""
    if isinstance(e, web.HTTPNotFound):
        return ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return ApiError(
            405,
            f"Method {request.method} is not allowed for {request.path} (allowed: {allowed})",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return body_too_large(max_body_bytes)
    return ApiError(e.status, e.reason, type_="invalid_request_error")
