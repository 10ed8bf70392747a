"""Anthropic's Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, their response
shapes, their SSE event stream, and their error bodies.

A request becomes a chat (api/anthropic_request.py).

The answer's content blocks follow the completion's channels (engine.channels): `thinking`
(its `signature` empty: there is nothing to sign), `text`, then a `tool_use` block per call
(its id `toolu_...`, its `input` the arguments object); `stop_reason` is `tool_use` after a
call. A stream is `message_start`, `ping`, then each block as `content_block_start`, its
deltas (`thinking_delta` and a closing `signature_delta`, `text_delta`, or the whole arguments
in one `input_json_delta`) and `content_block_stop`, then `message_delta` (the stop reason and
the usage) and `message_stop`. A block opens when its first content arrives and closes when
content of another kind (or another call) comes; a completion with no content at all has one
empty text block. An error after the headers is an `error` event, the last.

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

from mlxring.api.errors import ApiError, internal_error, unavailable
from mlxring.api.openai import SSE_HEADERS
from mlxring.api.proxy import StreamKind
from mlxring.api.state import RID, STATE, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece, ToolCall

log = structlog.get_logger()

PREFIX = "/v1/messages"  # every route under it answers errors in Anthropic's shape

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


# --- responses ------------------------------------------------------------------------------


def _stop(last: Piece) -> tuple[str | None, str | None]:
    """Anthropic's stop_reason and stop_sequence for the last piece of a completion."""
    if last.finish_reason == "length":
        return "max_tokens", None
    if last.finish_reason == "tool_calls":
        return "tool_use", None
    if last.finish_reason == "stop":
        return ("stop_sequence", last.stop) if last.stop is not None else ("end_turn", None)
    return None, None


def tool_use_id(call: ToolCall) -> str:
    """A call's id in Anthropic's form: `toolu_` and the random part of OpenAI's `call_...`."""
    if call.id.startswith("toolu_"):
        return call.id
    return "toolu_" + call.id.removeprefix("call_")


def _input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as the object a tool_use block's input is."""
    try:
        args = json.loads(call.arguments)
    except ValueError:
        args = None
    if not isinstance(args, dict):  # the family's parser let other JSON through
        log.info("tool_input_not_an_object", name=call.name, arguments=call.arguments[:200])
        return {}
    return args


Event = dict[str, Any]  # one SSE event's data; its "type" is the event's name


class Blocks:
    """A completion's content blocks, built as its pieces arrive, with the events that stream
    them: a block opens on its first content and closes when content of another kind comes."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None  # the type of the block taking content, if one is

    def feed(self, piece: Piece) -> list[Event]:
        """The events for one piece's content: reasoning, then text, then each call."""
        out: list[Event] = []
        if piece.reasoning:
            out += self._add("thinking", piece.reasoning)
        if piece.text:
            out += self._add("text", piece.text)
        for call in piece.calls:
            args = _input(call)
            block = {"type": "tool_use", "id": tool_use_id(call), "name": call.name}
            out += self._start({**block, "input": {}})
            self.content[-1]["input"] = args
            delta = {"type": "input_json_delta", "partial_json": json.dumps(args)}
            out.append(self._delta(delta))
        return out

    def finish(self) -> list[Event]:
        """The events that end the content (an empty text block when there was none)."""
        out = [] if self.content else self._start({"type": "text", "text": ""})
        return out + self._close()

    def _add(self, kind: str, text: str) -> list[Event]:
        out = [] if self._open == kind else self._start({"type": kind, kind: ""})
        self.content[-1][kind] += text
        out.append(self._delta({"type": f"{kind}_delta", kind: text}))
        return out

    def _start(self, block: dict[str, Any]) -> list[Event]:
        out = self._close()
        if block["type"] == "thinking":
            block["signature"] = ""
        out.append(
            {"type": "content_block_start", "index": len(self.content), "content_block": block}
        )
        self.content.append(dict(block))  # the block as it grows (its event keeps the start)
        self._open = block["type"]
        return out

    def _delta(self, delta: dict[str, Any]) -> Event:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":  # Anthropic's thinking blocks end with their signature
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        self._open = None
        return [*out, {"type": "content_block_stop", "index": len(self.content) - 1}]


class Shapes:
    """Anthropic's JSON shapes for one request's message and events."""

    def __init__(self, request: web.Request, n_prompt: int) -> None:
        self.id = f"msg_{request[RID]}"
        self.model = request.app[STATE].model_name
        self.n_prompt = n_prompt
        self.cached = 0  # prompt tokens the ring's prompt cache gave, once the first piece came

    def usage(self, n_out: int) -> dict[str, int]:
        """Anthropic's usage: `input_tokens` are those after the cached ones, which are
        `cache_read_input_tokens` (this server writes no cache on request, it keeps prompts
        by itself: nothing is `cache_creation_input_tokens`)."""
        return {
            "input_tokens": self.n_prompt - self.cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached,
            "output_tokens": n_out,
        }

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
            "usage": self.usage(n_out),
        }


async def complete(
    request: web.Request, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    shapes = Shapes(request, n_prompt)
    blocks = Blocks()
    last = Piece("", ())
    try:
        async for p in pieces:
            blocks.feed(p)
            last = p
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    blocks.finish()
    n_out = last.completion_tokens
    shapes.cached = last.cached
    note(request, output_tokens=n_out, finish_reason=last.finish_reason)
    return web.json_response(shapes.message(blocks.content, _stop(last), n_out))


def _events(events: list[Event]) -> bytes:
    return b"".join(event(e["type"], e) for e in events)


async def stream(
    request: web.Request, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    shapes = Shapes(request, n_prompt)
    # Headers wait for the first piece so that a ring that cannot serve still gets a real 529.
    try:
        piece = await anext(pieces)
        shapes.cached = piece.cached
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    blocks = Blocks()
    try:
        try:
            start = shapes.message([], (None, None), 0)
            await resp.write(
                _events([{"type": "message_start", "message": start}, {"type": "ping"}])
            )
            while True:
                if events := blocks.feed(piece):
                    await resp.write(_events(events))
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
            n_out = piece.completion_tokens
            note(request, output_tokens=n_out, finish_reason=piece.finish_reason)
            reason, sequence = _stop(piece)
            end = {
                "type": "message_delta",
                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                "usage": shapes.usage(n_out),
            }
            await resp.write(_events([*blocks.finish(), end, {"type": "message_stop"}]))
        except RingUnavailable as e:
            log.warning("stream_failed", reason=str(e))
            note(request, finish_reason="error")
            await resp.write(error_event(unavailable(str(e))))
        except ApiError as e:  # refused after the headers (the ring went down meanwhile)
            log.warning("stream_failed", reason=e.message)
            note(request, finish_reason="error")
            await resp.write(error_event(e))
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
