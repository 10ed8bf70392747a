"""OpenAI's Responses API (`POST /v1/responses`), text only, on the chat pieces.

A Responses request is read as the chat request it amounts to (`instructions` a system message,
`input` the messages, `max_output_tokens` the budget; parts of type `input_text` / `output_text`
are text) and checked by the chat schema, so its errors name the chat field. The answer is one
assistant message with one `output_text` part, as a body or as Responses' event sequence
(`response.created`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`..., the `.done` events, `response.completed`, also when the
budget ran out: then its response's status is "incomplete", the event stays the one the
official client's stream helper waits for). Not served: input
items other than messages (function calls and their outputs, reasoning), `previous_response_id`
and stored responses, built-in tools; `text.format` other than `text` is a 400.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import structlog
from aiohttp import web

from mlxring.api.errors import ApiError, internal_error, invalid, unavailable
from mlxring.api.openai import SSE_DONE, SSE_HEADERS
from mlxring.api.schema import API, GenerationRequest, parse_generation
from mlxring.api.state import RID, STATE, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece
from mlxring.fields import Fields

log = structlog.get_logger()

TEXT_PARTS = ("input_text", "output_text", "text")


def parse_responses(data: dict[str, Any], vocab_size: int) -> GenerationRequest:
    """The chat request a Responses request amounts to, checked as one."""
    f = Fields(data, API)
    messages: list[dict[str, Any]] = []
    if (instructions := f.opt_string("instructions")) is not None:
        messages.append({"role": "system", "content": instructions})
    value = data.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        messages += [_message(f"input[{i}]", item) for i, item in enumerate(value)]
    else:
        raise invalid("input", "'input' must be a string or an array of input items.")
    if data.get("text") is not None:
        kind = f.table("text").table("format", {"type": "text"}).raw("type")
        if kind != "text":
            raise invalid(
                "text.format", f"Only text.format type 'text' is supported, got {kind!r}."
            )
    chat: dict[str, Any] = {k: data[k] for k in _SAME if k in data}
    chat["messages"] = messages
    if "max_output_tokens" in data:
        chat["max_completion_tokens"] = data["max_output_tokens"]
    if "tools" in data:  # Responses' function tools are flat: {"type", "name", ...}
        chat["tools"] = [_chat_tool(i, t) for i, t in enumerate(f.array("tools"))]
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and "name" in choice:
        chat["tool_choice"] = {"type": choice.get("type"), "function": {"name": choice["name"]}}
    return parse_generation("chat", chat, vocab_size)


_SAME = ("model", "stream", "temperature", "top_p", "tool_choice", "parallel_tool_calls", "seed")


def _message(param: str, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise invalid(param, f"'{param}' must be an input item (an object).")
    kind = item.get("type", "message")
    if kind != "message":
        raise invalid(
            f"{param}.type",
            f"Input items of type {kind!r} are not supported by this server; only messages.",
        )
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                raise invalid(
                    f"{param}.content[{j}]",
                    f"Only content parts of type {', '.join(TEXT_PARTS)} are supported.",
                )
            parts.append({"type": "text", "text": part.get("text")})
        content = parts
    return {"role": item.get("role"), "content": content}


def _chat_tool(i: int, tool: Any) -> Any:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool  # the chat schema names what is wrong
    return {
        "type": "function",
        "function": {
            k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool
        },
    }


class Shapes:
    """The Responses API's JSON for one request: the response object, its message, events."""

    def __init__(self, model: str, req: GenerationRequest, rid: str) -> None:
        self.id = f"resp_{rid}"
        self.msg_id = f"msg_{rid}"
        self.created = int(time.time())
        self.model = model
        self.req = req
        self.seq = 0

    def message(self, text: str, done: bool) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": []}] if done else []
        return {
            "type": "message",
            "id": self.msg_id,
            "status": "completed" if done else "in_progress",
            "role": "assistant",
            "content": content,
        }

    def response(
        self, text: str | None, finish: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        status = "in_progress" if text is None else "completed"
        if finish == "length":
            status = "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if finish == "length" else None,
            "model": self.model,
            "output": [] if text is None else [self.message(text, True)],
            "parallel_tool_calls": self.req.tools.parallel,
            "tool_choice": self.req.tools.mode,
            "tools": [],
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


def _usage(n_prompt: int, n_completion: int) -> dict[str, Any]:
    return {
        "input_tokens": n_prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": n_completion,
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
    if not req.stream:
        texts: list[str] = []
        last = Piece("", ())
        try:
            async for _, p in rows:
                texts.append(p.text)
                last = p
        except RingUnavailable as e:
            raise unavailable(str(e)) from None
        usage = _usage(n_prompt, last.completion_tokens)
        note(request, prompt_tokens=n_prompt, completion_tokens=last.completion_tokens)
        return web.json_response(shapes.response("".join(texts), last.finish_reason, usage))
    try:
        item: tuple[int, Piece] | None = await anext(rows)
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    ev = shapes.event
    where = {"item_id": shapes.msg_id, "output_index": 0, "content_index": 0}
    try:
        try:
            await resp.write(ev("response.created", response=shapes.response(None, None, None)))
            await resp.write(ev("response.in_progress", response=shapes.response(None, None, None)))
            await resp.write(
                ev("response.output_item.added", output_index=0, item=shapes.message("", False))
            )
            part = {"type": "output_text", "text": "", "annotations": []}
            await resp.write(ev("response.content_part.added", **where, part=part))
            texts = []
            piece = Piece("", ())
            while item is not None:
                piece = item[1]
                if piece.text:
                    texts.append(piece.text)
                    await resp.write(
                        ev("response.output_text.delta", **where, delta=piece.text, logprobs=[])
                    )
                item = await anext(rows, None)
            text = "".join(texts)
            await resp.write(ev("response.output_text.done", **where, text=text, logprobs=[]))
            part = {"type": "output_text", "text": text, "annotations": []}
            await resp.write(ev("response.content_part.done", **where, part=part))
            await resp.write(
                ev("response.output_item.done", output_index=0, item=shapes.message(text, True))
            )
            usage = _usage(n_prompt, piece.completion_tokens)
            note(request, prompt_tokens=n_prompt, completion_tokens=piece.completion_tokens)
            # Always `response.completed` (its status may say "incomplete"): the official
            # client's stream helper takes its final response from that event alone.
            final = shapes.response(text, piece.finish_reason, usage)
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
