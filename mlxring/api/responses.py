"""OpenAI's Responses API (`POST /v1/responses`), text and function tools, on the chat pieces.

A Responses request is read as the chat request it amounts to (api/responses_request.py).

The answer is its output items in the order the model wrote them (`Items`): its reasoning as a
`reasoning` item (`content` of one `reasoning_text`; no summary), its text as a `message` with
one `output_text`, each tool call as a `function_call` item (`call_id` the call's id). A
message with no text is left out when there are calls, and given empty when nothing else is.
Streamed, each item is `response.output_item.added` ... `.done` around its own events
(`response.content_part.*` and `response.reasoning_text.delta`/`.done`, `output_text` likewise,
`response.function_call_arguments.delta`/`.done` with the arguments whole), then
`response.completed` with the whole output, the same as the body: also when the budget ran out
(its status "incomplete", incomplete_details max_output_tokens, the last item "incomplete"),
as the official client's stream helper waits for that event alone.

Not served: `previous_response_id` and stored responses (`item_reference` items), built-in
tools (web_search, file_search, ...), content other than text, reasoning summaries (a request
may ask; none are written), and `text.format` other than `text` (a 400).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from mlxring.api.errors import ApiError, internal_error, unavailable
from mlxring.api.openai import SSE_DONE, SSE_HEADERS, first_row
from mlxring.api.schema import GenerationRequest
from mlxring.api.state import RID, STATE, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece, ToolCall

log = structlog.get_logger()


class Shapes:
    """The Responses API's JSON for one request: the response object, its items, events."""

    def __init__(self, model: str, req: GenerationRequest, rid: str) -> None:
        self.id = f"resp_{rid}"
        self.rid = rid
        self.created = int(time.time())
        self.model = model
        self.req = req
        self.seq = 0

    def item_id(self, prefix: str, index: int) -> str:
        return f"{prefix}_{self.rid}_{index}"

    def response(
        self, output: list[dict[str, Any]] | None, finish: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        status = "in_progress" if output is None else "completed"
        if finish == "length":
            status = "incomplete"
        tools = self.req.tools
        choice: Any = tools.mode
        if tools.named is not None:
            choice = {"type": "function", "name": tools.named}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "model": self.model,
            "output": output or [],
            "parallel_tool_calls": tools.parallel,
            "tool_choice": choice,
            "tools": [
                {
                    "type": "function",
                    "name": fn.name,
                    "description": fn.description,
                    "parameters": fn.parameters,
                    "strict": fn.strict,
                }
                for fn in tools.functions
            ],
            "temperature": self.req.params.temperature,
            "top_p": self.req.params.top_p,
            "max_output_tokens": self.req.max_tokens,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "usage": usage,
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


Event = tuple[str, dict[str, Any]]


class Items:
    """A completion's output items, built as its Pieces come, and the events that build them.

    An item of text (`reasoning`, `message`) stays open while its channel goes on; text of the
    other channel, or a call, closes it. The body's output and the stream's are the same."""

    def __init__(self, shapes: Shapes) -> None:
        self.shapes = shapes
        self.output: list[dict[str, Any]] = []  # items done
        self.kind: str | None = None  # the open item's type
        self.texts: list[str] = []  # the open item's text so far
        self.messages = 0  # message items written
        self.calls = 0

    def piece(self, p: Piece) -> list[Event]:
        out: list[Event] = []
        if p.reasoning:
            out += self._write("reasoning", p.reasoning)
        if p.text:
            out += self._write("message", p.text)
        for c in p.calls:
            out += self._close("completed") + self._call(c)
        return out

    def end(self, finish: str | None) -> list[Event]:
        """The events that close the output; a message with no text is given when there is
        neither a message nor a call."""
        status = "incomplete" if finish == "length" else "completed"
        out = self._close(status)
        if not self.messages and not self.calls:
            out += self._open("message") + self._close(status)
        return out

    @property
    def _where(self) -> dict[str, Any]:
        index = len(self.output)
        prefix = "rs" if self.kind == "reasoning" else "msg"
        return {
            "item_id": self.shapes.item_id(prefix, index),
            "output_index": index,
            "content_index": 0,
        }

    def _write(self, kind: str, text: str) -> list[Event]:
        out = self._close("completed") if self.kind not in (None, kind) else []
        if self.kind is None:
            out += self._open(kind)
        self.texts.append(text)
        delta = (
            "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        )
        extra: dict[str, Any] = {} if kind == "reasoning" else {"logprobs": []}
        return [*out, (delta, {**self._where, "delta": text, **extra})]

    def _item(self, kind: str, text: str | None, status: str) -> dict[str, Any]:
        index = len(self.output)
        if kind == "reasoning":
            return {
                "type": "reasoning",
                "id": self.shapes.item_id("rs", index),
                "summary": [],
                "content": [] if text is None else [_part(kind, text)],
                "status": status,
            }
        return {
            "type": "message",
            "id": self.shapes.item_id("msg", index),
            "status": status,
            "role": "assistant",
            "content": [] if text is None else [_part(kind, text)],
        }

    def _open(self, kind: str) -> list[Event]:
        self.kind, self.texts = kind, []
        index = len(self.output)
        item = self._item(kind, None, "in_progress")
        return [
            ("response.output_item.added", {"output_index": index, "item": item}),
            ("response.content_part.added", {**self._where, "part": _part(kind, "")}),
        ]

    def _close(self, status: str) -> list[Event]:
        kind = self.kind
        if kind is None:
            return []
        text = "".join(self.texts)
        where = self._where
        done = (
            "response.reasoning_text.done" if kind == "reasoning" else "response.output_text.done"
        )
        extra: dict[str, Any] = {} if kind == "reasoning" else {"logprobs": []}
        item = self._item(kind, text, status)
        self.messages += kind == "message"
        self.output.append(item)
        self.kind, self.texts = None, []
        return [
            (done, {**where, "text": text, **extra}),
            ("response.content_part.done", {**where, "part": _part(kind, text)}),
            ("response.output_item.done", {"output_index": where["output_index"], "item": item}),
        ]

    def _call(self, c: ToolCall) -> list[Event]:
        index = len(self.output)
        item = {
            "type": "function_call",
            "id": self.shapes.item_id("fc", index),
            "call_id": c.id,
            "name": c.name,
            "arguments": c.arguments,
            "status": "completed",
        }
        self.output.append(item)
        self.calls += 1
        where = {"item_id": item["id"], "output_index": index}
        return [
            (
                "response.output_item.added",
                {"output_index": index, "item": {**item, "arguments": "", "status": "in_progress"}},
            ),
            ("response.function_call_arguments.delta", {**where, "delta": c.arguments}),
            ("response.function_call_arguments.done", {**where, "arguments": c.arguments}),
            ("response.output_item.done", {"output_index": index, "item": item}),
        ]


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": text}
    return {"type": "output_text", "text": text, "annotations": []}


def _usage(n_prompt: int, n_completion: int, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": n_prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n_completion,
        # Not counted: the splitter hands out text, not which channel each token went to.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": n_prompt + n_completion,
    }


async def respond(
    request: web.Request,
    req: GenerationRequest,
    n_prompt: int,
    rows: AsyncIterator[tuple[int, Piece]],
) -> web.StreamResponse:
    shapes = Shapes(request.app[STATE].model_name, req, request[RID])
    items = Items(shapes)
    if not req.stream:
        last = Piece("", ())
        try:
            async for _, p in rows:
                items.piece(p)
                last = p
        except RingUnavailable as e:
            raise unavailable(str(e)) from None
        items.end(last.finish_reason)
        usage = _usage(n_prompt, last.completion_tokens, last.cached)
        note(request, prompt_tokens=n_prompt, completion_tokens=last.completion_tokens)
        return web.json_response(shapes.response(items.output, last.finish_reason, usage))
    item = await first_row(rows)
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    ev = shapes.event
    try:
        try:
            await resp.write(ev("response.created", response=shapes.response(None, None, None)))
            await resp.write(ev("response.in_progress", response=shapes.response(None, None, None)))
            piece = Piece("", ())
            while item is not None:
                piece = item[1]
                for kind, fields in items.piece(piece):
                    await resp.write(ev(kind, **fields))
                item = await anext(rows, None)
            for kind, fields in items.end(piece.finish_reason):
                await resp.write(ev(kind, **fields))
            usage = _usage(n_prompt, piece.completion_tokens, piece.cached)
            note(request, prompt_tokens=n_prompt, completion_tokens=piece.completion_tokens)
            # Always `response.completed` (its status may say "incomplete"): the official
            # client's stream helper takes its final response from that event alone.
            final = shapes.response(items.output, piece.finish_reason, usage)
            await resp.write(ev("response.completed", response=final))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as e:  # headers are sent: the error can only travel as an event
            err = (
                unavailable(str(e))
                if isinstance(e, RingUnavailable)
                else e
                if isinstance(e, ApiError)
                else internal_error()
            )
            log.warning("stream_failed", reason=err.message)
            note(request, finish_reason="error")
            await resp.write(ev("error", code=err.code, message=err.message, param=err.param))
        # Not sent by OpenAI here, and skipped by its clients; a forwarding node reads it as
        # the stream's whole end (api/proxy.py), as for the chat streams.
        await resp.write(SSE_DONE)
        await resp.write_eof()
    except ConnectionError:
        log.info("client_disconnected")
        note(request, finish_reason="disconnected")
    return resp
