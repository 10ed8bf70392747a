"""OpenAI's response shapes: a whole completion as one JSON body, or a stream of SSE events.

`Formatter` builds one request's bodies and chunks (chat or text completion, with logprobs when
asked); `complete` and `stream` send the Pieces of text the engine side produces.
`usage.completion_tokens` counts every token the ring sampled, the EOS token included. A stream's
headers wait for its first piece, so a ring that cannot serve still gets a real 503; after them
an error can only travel as an event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog
from aiohttp import web

from mlxring.api.errors import internal_error, unavailable
from mlxring.api.schema import GenerationRequest
from mlxring.api.state import RID, STATE, ApiState, note
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.engine.text import Piece, TokenInfo

log = structlog.get_logger()

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer the stream
}


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }


class Formatter:
    """OpenAI's JSON shapes for one request's responses and stream chunks."""

    def __init__(self, state: ApiState, req: GenerationRequest, rid: str) -> None:
        self.state = state
        self.req = req
        self.chat = req.kind == "chat"
        self.id = f"chatcmpl-{rid}" if self.chat else f"cmpl-{rid}"
        self.created = int(time.time())
        self.model = state.model_name

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def logprobs(self, tokens: Sequence[TokenInfo]) -> dict[str, Any] | None:
        if self.req.params.logprobs is None:
            return None
        tt = self.state.token_text
        if self.chat:

            def entry(t: int, lp: float) -> dict[str, Any]:
                text, raw = tt(t)
                return {"token": text, "logprob": lp, "bytes": raw}

            return {
                "content": [
                    {**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                    for t in tokens
                ],
                "refusal": None,
            }
        return {
            "tokens": [tt(t.token)[0] for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{tt(i)[0]: v for i, v in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens],  # from the start of the completion
        }

    def response(
        self, text: str, tokens: Sequence[TokenInfo], finish: str | None, usage: dict[str, int]
    ) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self.logprobs(tokens),
                "finish_reason": finish,
            }
            return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage}
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self.logprobs(tokens),
            "finish_reason": finish,
        }
        return {**self._envelope("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, piece: Piece | None, first: bool = False) -> dict[str, Any]:
        usage: dict[str, Any] = {"usage": None} if self.req.include_usage else {}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if piece is not None and piece.text:
                delta["content"] = piece.text
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": self.logprobs(piece.tokens) if piece else None,
                "finish_reason": piece.finish_reason if piece else None,
            }
            return {**self._envelope("chat.completion.chunk"), "choices": [choice], **usage}
        assert piece is not None
        choice = {
            "index": 0,
            "text": piece.text,
            "logprobs": self.logprobs(piece.tokens),
            "finish_reason": piece.finish_reason,
        }
        return {**self._envelope("text_completion"), "choices": [choice], **usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage}


async def complete(
    request: web.Request, req: GenerationRequest, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    texts: list[str] = []
    tokens: list[TokenInfo] = []
    last = Piece("", ())
    try:
        async for p in pieces:
            texts.append(p.text)
            tokens.extend(p.tokens)
            last = p
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    usage = _usage(n_prompt, last.completion_tokens)
    note(request, **usage, finish_reason=last.finish_reason)
    return web.json_response(fmt.response("".join(texts), tokens, last.finish_reason, usage))


async def stream(
    request: web.Request, req: GenerationRequest, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    # Headers wait for the first piece so that a ring that cannot serve still gets a real 503.
    try:
        piece = await anext(pieces)
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    try:
        try:
            if fmt.chat:
                await resp.write(sse(fmt.chunk(None, first=True)))
            while True:
                if piece.text or piece.tokens or piece.finish_reason:
                    await resp.write(sse(fmt.chunk(piece)))
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
            usage = _usage(n_prompt, piece.completion_tokens)
            note(request, **usage, finish_reason=piece.finish_reason)
            if req.include_usage:
                await resp.write(sse(fmt.usage_chunk(usage)))
        except RingUnavailable as e:
            log.warning("stream_failed", reason=str(e))
            note(request, finish_reason="error")
            await resp.write(sse(unavailable(str(e)).body()))
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
