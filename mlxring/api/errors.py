"""Errors answered to a client, all in OpenAI's shape `{"error": {message, type, param, code}}`.

`ApiError` is raised anywhere below a handler and answered by the middleware; the constructors
here are the ones several modules share, and `http_error` gives aiohttp's own errors (no route,
wrong method, body too big) the same shape.
"""

from __future__ import annotations

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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


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
