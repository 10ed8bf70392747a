"""OpenAI's response shapes: a whole completion as one JSON body, or a stream of SSE events.

`Formatter` builds one request's bodies and chunks (chat or text completion, with logprobs when
asked); `complete` and `stream` send the Pieces of text the engine side produces, for each of
the request's choices (n per prompt, each prompt of a batch). Usage counts each prompt once and
every choice's completion tokens.
`usage.completion_tokens` counts every token the ring sampled, the EOS token included. A stream's
headers wait for its first piece, so a ring that cannot serve still gets a real 503; after them
an error can only travel as an event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from mlxring.api.errors import ApiError, internal_error, unavailable
from mlxring.api.schema import GenerationRequest
from mlxring.api.state import RID, STATE, ApiState, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece, TokenInfo, ToolCall, token_name

log = structlog.get_logger()

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer the stream
}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(n_prompt: int, n_completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage; `cached`: prompt tokens the ring's prompt cache gave (not prefilled)."""
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass(frozen=True)
class Choice:
    """One choice of a response: its index, its prompt's length, the text that opens it."""

    index: int
    n_prompt: int
    echo: str = ""  # the prompt's text, for a completion with `echo`


class Formatter:
    """OpenAI's JSON shapes for one request's responses and stream chunks."""

    def __init__(self, state: ApiState, req: GenerationRequest, rid: str) -> None:
        self.state = state
        self.req = req
        self.chat = req.kind == "chat"
        self.id = f"chatcmpl-{rid}" if self.chat else f"cmpl-{rid}"
        self.created = int(time.time())
        self.model = state.model_name  # whatever name the request gave: the model served

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def _name(self, token: int) -> tuple[str, list[int]]:
        text, raw = self.state.token_text(token)
        return token_name(text, raw), raw

    def logprobs(self, tokens: Sequence[TokenInfo]) -> dict[str, Any] | None:
        if self.req.params.logprobs is None:
            return None
        if self.chat:

            def entry(t: int, lp: float) -> dict[str, Any]:
                name, raw = self._name(t)
                return {"token": name, "logprob": lp, "bytes": raw}

            return {
                "content": [
                    {**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                    for t in tokens
                ],
                "refusal": None,
            }
        return {
            "tokens": [self._name(t.token)[0] for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{self._name(i)[0]: v for i, v in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens],  # from the start of the completion
        }

    def response(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": choices, "usage": usage}

    def choice(
        self,
        index: int,
        text: str,
        tokens: Sequence[TokenInfo],
        finish: str | None,
        reasoning: str = "",
        calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        if self.chat:
            # OpenAI's content is null in a message that only calls tools.
            message: dict[str, Any] = {
                "role": "assistant",
                "content": text if text or not calls else None,
                "refusal": None,
            }
            message.update(_reasoning(reasoning))
            if calls:
                message["tool_calls"] = [_call(c) for c in calls]
            return {
                "index": index,
                "message": message,
                "logprobs": self.logprobs(tokens),
                "finish_reason": finish,
            }
        return {
            "index": index,
            "text": text,
            "logprobs": self.logprobs(tokens),
            "finish_reason": finish,
        }

    def chunk(
        self,
        index: int,
        text: str,
        tokens: Sequence[TokenInfo] = (),
        finish: str | None = None,
        first: bool = False,
        reasoning: str = "",
        calls: Sequence[tuple[int, ToolCall]] = (),
    ) -> dict[str, Any]:
        """A stream chunk of one choice. A chat's first chunk is OpenAI's own `{"role":
        "assistant", "content": ""}`; the finish chunk carries only the finish_reason (an empty
        delta, or empty text), after the chunk with the last text. Reasoning travels in
        `reasoning_content` (and `reasoning`); each tool call whole, in one `tool_calls` delta
        with its index among the choice's calls."""
        usage: dict[str, Any] = {"usage": None} if self.req.include_usage else {}
        logprobs = self.logprobs(tokens) if tokens else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            delta.update(_reasoning(reasoning))
            if calls:
                delta["tool_calls"] = [{"index": k, **_call(c)} for k, c in calls]
            choice: dict[str, Any] = {
                "index": index,
                "delta": delta,
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            return {**self._envelope("chat.completion.chunk"), "choices": [choice], **usage}
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope("text_completion"), "choices": [choice], **usage}

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage}


def _reasoning(text: str) -> dict[str, str]:
    """A thinking model's reasoning under both names clients read: `reasoning_content` (vLLM,
    DeepSeek, llama.cpp) and `reasoning` (newer OpenAI-compatible clients)."""
    return {"reasoning_content": text, "reasoning": text} if text else {}


def _call(c: ToolCall) -> dict[str, Any]:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


def _logged(usage: dict[str, Any]) -> dict[str, int]:
    """The usage's counts for the request's log line."""
    counts = {k: v for k, v in usage.items() if isinstance(v, int)}
    return {**counts, "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def _prompt_tokens(choices: Sequence[Choice], n: int) -> int:
    """Prompt tokens as OpenAI counts them: each prompt once, however many choices it has."""
    return sum(c.n_prompt for c in choices[::n])


async def complete(
    request: web.Request,
    req: GenerationRequest,
    choices: Sequence[Choice],
    rows: AsyncIterator[tuple[int, Piece]],
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    texts: list[list[str]] = [[c.echo] for c in choices]
    thoughts: list[list[str]] = [[] for _ in choices]
    calls: list[list[ToolCall]] = [[] for _ in choices]
    tokens: list[list[TokenInfo]] = [[] for _ in choices]
    last = [Piece("", ()) for _ in choices]
    try:
        async for i, p in rows:
            texts[i].append(p.text)
            thoughts[i].append(p.reasoning)
            calls[i].extend(p.calls)
            tokens[i].extend(p.tokens)
            last[i] = p
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    usage = _usage(
        _prompt_tokens(choices, req.n),
        sum(p.completion_tokens for p in last),
        sum(p.cached for p in last[:: req.n]),
    )
    note(request, **_logged(usage), finish_reason=last[0].finish_reason)
    body = [
        fmt.choice(
            c.index,
            "".join(texts[c.index]),
            tokens[c.index],
            last[c.index].finish_reason,
            "".join(thoughts[c.index]),
            calls[c.index],
        )
        for c in choices
    ]
    return web.json_response(fmt.response(body, usage))


async def first_row(rows: AsyncIterator[tuple[int, Piece]]) -> tuple[int, Piece] | None:
    """A stream's first piece (None: there is none), read before its headers are sent, so that
    a ring that cannot serve still gets a real 503."""
    try:
        return await anext(rows)
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    except StopAsyncIteration:
        return None


async def stream(
    request: web.Request,
    req: GenerationRequest,
    choices: Sequence[Choice],
    rows: AsyncIterator[tuple[int, Piece]],
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    item = await first_row(rows)
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    completion = cached = 0
    finish: str | None = None
    n_calls = [0 for _ in choices]  # each choice's calls so far: the next call's index
    try:
        try:
            for c in choices:
                if fmt.chat:
                    await resp.write(sse(fmt.chunk(c.index, "", first=True)))
                elif c.echo:
                    await resp.write(sse(fmt.chunk(c.index, c.echo)))
            while item is not None:
                i, piece = item
                if piece.text or piece.tokens or piece.reasoning or piece.calls:
                    calls = list(enumerate(piece.calls, n_calls[i]))
                    n_calls[i] += len(calls)
                    chunk = fmt.chunk(
                        i, piece.text, piece.tokens, reasoning=piece.reasoning, calls=calls
                    )
                    await resp.write(sse(chunk))
                if piece.finish_reason is not None:
                    await resp.write(sse(fmt.chunk(i, "", finish=piece.finish_reason)))
                    completion += piece.completion_tokens
                    cached += piece.cached if i % req.n == 0 else 0
                    finish = finish or piece.finish_reason
                item = await anext(rows, None)
            usage = _usage(_prompt_tokens(choices, req.n), completion, cached)
            note(request, **_logged(usage), finish_reason=finish)
            if req.include_usage:
                await resp.write(sse(fmt.usage_chunk(usage)))
        except RingUnavailable as e:
            log.warning("stream_failed", reason=str(e))
            note(request, finish_reason="error")
            await resp.write(sse(unavailable(str(e)).body()))
        except ApiError as e:  # a later choice refused (e.g. the queue filled up meanwhile)
            log.warning("stream_failed", reason=e.message)
            note(request, finish_reason="error")
            await resp.write(sse(e.body()))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # headers are sent: the error can only travel as an event
            log.exception("stream_failed")
            note(request, finish_reason="error")
            await resp.write(sse(internal_error().body()))
        await resp.write(SSE_DONE)
        await resp.write_eof()
    except ConnectionError:  # the client went away; leaving closes the generation
        log.info("client_disconnected")
        note(request, finish_reason="disconnected")
    return resp
