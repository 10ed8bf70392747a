"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, their request
parsing into the GenerationRequest the OpenAI chat uses, their response shapes, their SSE event
stream, and their error bodies.

A request becomes a chat: `system` (a string or text blocks) is the first message, then the turns
with their text; `stop_sequences` are stop strings; `max_tokens` is required, as Anthropic's
is. Tools, tool_choice other than "auto"/"none", tool_use/tool_result blocks and thinking other
than `{"type": "disabled"}` are refused with a 400 for now, as is a last turn of the assistant's
(a prefill). Any model name is accepted: Anthropic clients send their own model ids, and the ring
serves one model, which the response names.

A stream is `message_start`, `content_block_start` (one text block), `ping`,
`content_block_delta`s (`text_delta`), `content_block_stop`, `message_delta` (the stop reason
and the usage) and `message_stop`; an error after the headers is an `error` event, the last.

Every error on these routes has Anthropic's shape `{"type": "error", "error": {"type",
"message"}}`: the status picks the type. Two choices: a prompt over the context is 400 (as
Anthropic's "prompt is too long"), not the OpenAI routes' 413; a ring that cannot serve (503 on
the OpenAI routes) and a full queue (429 there) are both 529 `overloaded_error` with
Retry-After, Anthropic's answer for "the service cannot take this now, retry shortly", which its
clients retry and report as an overload.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from mlxring.api.errors import ApiError, internal_error, invalid, unavailable
from mlxring.api.openai import SSE_HEADERS
from mlxring.api.proxy import StreamKind
from mlxring.api.schema import API, MAX_STOP, ChatMessage, GenerationRequest
from mlxring.api.state import RID, STATE, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece
from mlxring.fields import Fields
from mlxring.protocol.messages import SamplingParams

log = structlog.get_logger()

PREFIX = "/v1/messages"  # every route under it answers errors in Anthropic's shape
MAX_STOP_SEQUENCES = 4 * MAX_STOP  # each is checked against every new piece of text
ROLES = ("user", "assistant")
# Block types known to the Messages API that this server does not take yet, and why.
NOT_YET = {
    "tool_use": "tool calling is not supported by this server yet",
    "tool_result": "tool calling is not supported by this server yet",
    "server_tool_use": "tool calling is not supported by this server yet",
    "thinking": "extended thinking is not supported by this server yet",
    "redacted_thinking": "extended thinking is not supported by this server yet",
}

# The error type for each status, as Anthropic's API names them.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def is_route(request: web.Request) -> bool:
    """Whether the request is for a route of this API (and so gets its error shape)."""
    path = request.path
    return path == PREFIX or path.startswith(PREFIX + "/")


# --- errors ---------------------------------------------------------------------------------


def _status(e: ApiError) -> int:
    if e.code == "context_length_exceeded":
        return 400
    if e.code in ("cluster_unavailable", "queue_full", "queue_timeout"):
        return OVERLOADED
    return e.status


def error_body(e: ApiError) -> dict[str, Any]:
    status = _status(e)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def error_response(e: ApiError) -> web.Response:
    """The error answered in Anthropic's shape, with its headers (Retry-After, Allow)."""
    return e.response(body=error_body(e), status=_status(e))


def event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event: its name, then its data (whose "type" is the name, as Anthropic's)."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_event(e: ApiError) -> bytes:
    return event("error", error_body(e))


# A relayed stream has ended with message_stop or an error event.
STREAM = StreamKind((b"event: message_stop\n", b"event: error\n"), error_event)


# --- requests -------------------------------------------------------------------------------


def _text_blocks(param: str, value: Any) -> str:
    """A content value (a string or blocks) as text; refuses blocks that are not text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(
            param, f"Invalid type for '{param}': expected a string or an array of content blocks."
        )
    parts = []
    for j, block in enumerate(value):
        p = f"{param}[{j}]"
        if not isinstance(block, dict):
            raise API.wrong_type(p, "table", block)
        kind = block.get("type")
        if kind != "text":
            why = NOT_YET.get(str(kind), "this server serves a text model and takes text blocks")
            raise invalid(f"{p}.type", f"Unsupported content block type {kind!r} in '{p}': {why}.")
        parts.append(Fields(block, API, p).string("text"))
    return "".join(parts)


def _messages(data: dict[str, Any]) -> tuple[ChatMessage, ...]:
    out = []
    system = data.get("system")
    if system is not None:
        text = _text_blocks("system", system)
        if text:
            out.append(ChatMessage("system", text))
    value = data.get("messages")
    if value is None:
        raise API.missing("messages")
    if not isinstance(value, list):
        raise API.wrong_type("messages", "list", value)
    if not value:
        raise invalid("messages", "'messages' must hold at least one message.")
    for i, m in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise API.wrong_type(p, "table", m)
        f = Fields(m, API, p)
        role = f.string("role")
        if role not in ROLES:
            raise invalid(
                f"{p}.role", f"Invalid value for '{p}.role': {role!r}; supported: user, assistant."
            )
        if "content" not in m:
            raise API.missing(f"{p}.content")
        out.append(ChatMessage(role, _text_blocks(f"{p}.content", m["content"])))
    if out[-1].role == "assistant":
        raise invalid(
            f"messages[{len(value) - 1}].role",
            "A last message of the assistant (a prefill to continue) is not supported by this "
            "server yet: end with a user message.",
        )
    return tuple(out)


def _refuse_agent_fields(data: dict[str, Any]) -> None:
    """Tools and thinking are parsed and refused until this server runs them."""
    tools = data.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise API.wrong_type("tools", "list", tools)
    if tools:
        raise invalid("tools", "Tool use is not supported by this server yet: send no 'tools'.")
    choice = data.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict):
            raise API.wrong_type("tool_choice", "table", choice)
        kind = Fields(choice, API, "tool_choice").string("type")
        if kind not in ("auto", "none"):
            raise invalid(
                "tool_choice.type",
                f"tool_choice {kind!r} is not supported by this server yet (no tool use): "
                "only 'auto' and 'none'.",
            )
    thinking = data.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict):
            raise API.wrong_type("thinking", "table", thinking)
        kind = Fields(thinking, API, "thinking").string("type")
        if kind != "disabled":
            raise invalid(
                "thinking.type",
                f"thinking {kind!r} is not supported by this server yet: only 'disabled'.",
            )


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise API.wrong_type("stop_sequences", "list", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid(
            "stop_sequences",
            f"'stop_sequences' may hold at most {MAX_STOP_SEQUENCES} strings, got {len(value)}.",
        )
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise API.wrong_type(f"stop_sequences[{i}]", "string", s)
        if not s:
            raise invalid(f"stop_sequences[{i}]", "Stop sequences must not be empty.")
    return tuple(value)


def parse_request(
    data: dict[str, Any], vocab_size: int, *, count: bool = False
) -> GenerationRequest:
    """A Messages request as the chat GenerationRequest; `count`: a count_tokens request, which
    has no max_tokens and no sampling."""
    f = Fields(data, API)
    model = f.opt_string("model")
    _refuse_agent_fields(data)
    messages = _messages(data)
    if count:
        return GenerationRequest("chat", model, SamplingParams(), None, (), False, False, messages)
    max_tokens = f.integer("max_tokens", lo=1)
    temperature = f.opt_number("temperature", lo=0, hi=1)
    top_p = f.opt_number("top_p", lo=0, hi=1, lo_open=True)
    top_k = f.opt_integer("top_k", lo=0)
    params = SamplingParams(
        # Greedy unless asked, as on this server's OpenAI routes (Anthropic's default is 1).
        temperature=temperature if temperature is not None else 0.0,
        top_p=top_p if top_p is not None else 1.0,
        top_k=top_k if top_k is not None and top_k < vocab_size else 0,
    )
    return GenerationRequest(
        kind="chat",
        model=model,
        params=params,
        max_tokens=max_tokens,
        stop=_stop_sequences(data.get("stop_sequences")),
        stream=f.boolean("stream", False),
        include_usage=False,
        messages=messages,
    )


# --- responses ------------------------------------------------------------------------------


def _stop(last: Piece) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for the last piece of a completion."""
    if last.finish_reason == "length":
        return "max_tokens", None
    if last.finish_reason == "stop":
        return ("stop_sequence", last.stop) if last.stop is not None else ("end_turn", None)
    return None, None


class Shapes:
    """Anthropic's JSON shapes for one request's message and events."""

    def __init__(self, request: web.Request, n_prompt: int) -> None:
        self.id = f"msg_{request[RID]}"
        self.model = request.app[STATE].model_name
        self.n_prompt = n_prompt

    def message(
        self,
        content: list[dict[str, Any]],
        stop: tuple[str | None, str | None],
        n_out: int,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": {"input_tokens": self.n_prompt, "output_tokens": n_out},
        }


async def complete(
    request: web.Request, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    shapes = Shapes(request, n_prompt)
    parts: list[str] = []
    last = Piece("", ())
    try:
        async for p in pieces:
            parts.append(p.text)
            last = p
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    n_out = last.completion_tokens
    note(request, output_tokens=n_out, finish_reason=last.finish_reason)
    body = shapes.message([{"type": "text", "text": "".join(parts)}], _stop(last), n_out)
    return web.json_response(body)


async def stream(
    request: web.Request, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    shapes = Shapes(request, n_prompt)
    # Headers wait for the first piece so that a ring that cannot serve still gets a real 529.
    try:
        piece = await anext(pieces)
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    try:
        try:
            start = shapes.message([], (None, None), 0)
            await resp.write(event("message_start", {"type": "message_start", "message": start}))
            block = {"type": "text", "text": ""}
            await resp.write(
                event(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                )
            )
            await resp.write(event("ping", {"type": "ping"}))
            while True:
                if piece.text:
                    delta = {"type": "text_delta", "text": piece.text}
                    await resp.write(
                        event(
                            "content_block_delta",
                            {"type": "content_block_delta", "index": 0, "delta": delta},
                        )
                    )
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
            n_out = piece.completion_tokens
            note(request, output_tokens=n_out, finish_reason=piece.finish_reason)
            reason, sequence = _stop(piece)
            end = [
                event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                        "usage": {"input_tokens": n_prompt, "output_tokens": n_out},
                    },
                ),
                event("message_stop", {"type": "message_stop"}),
            ]
            await resp.write(b"".join(end))
        except RingUnavailable as e:
            log.warning("stream_failed", reason=str(e))
            note(request, finish_reason="error")
            await resp.write(error_event(unavailable(str(e))))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # headers are sent: the error can only travel as an event
            log.exception("stream_failed")
            note(request, finish_reason="error")
            await resp.write(error_event(internal_error()))
        await resp.write_eof()
    except ConnectionError:  # the client went away; leaving closes the generation
        log.info("client_disconnected")
        note(request, finish_reason="disconnected")
    return resp
