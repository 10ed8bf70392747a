"""The aiohttp front actor: OpenAI-compatible endpoints (and Anthropic's Messages API) on every
node, and their wiring.

The process hosting the head (the one with the engine) serves generation itself; any other node
forwards API requests to the head's API and streams the answer back event by event.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/{id}]`,
`POST /v1/messages`, `POST /v1/messages/count_tokens` (Anthropic's), `GET /health`,
`GET /cluster/status`, `GET /metrics` (Prometheus text, this process's own), and the web page
`GET /` with its files under `/web/`. Every error body has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`, but under /v1/messages, Anthropic's.

A generation request goes: parse (schema, or anthropic) → tokenize → fit the context → admit
(admission) → the engine's tokens as text (mlxring.engine.text) → one body or an SSE stream
(openai, or anthropic); `generation` is the part both APIs share.
Where each part lives: errors, schema, admission, state (the API's view of the runtime),
middleware (request ids, auth, log lines), openai (response shapes, SSE), proxy (forwarding to
the head), status (health, cluster status, models, metrics), web (the page).

Decisions worth knowing:
- A prompt that leaves no room for one generated token is 413 (`context_length_exceeded`); a
  prompt that fits but with an explicit `max_tokens` that does not is 400 with the same code
  (OpenAI's answer). Without `max_tokens` a request may generate up to the end of the context.
- `temperature` defaults to 0 (greedy), as in mlx-lm's server, not OpenAI's 1.
- Generation ends at the first token after which a stop string appears; the text is cut right
  before it. While streaming, a tail that could begin a stop string is held back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

import structlog
from aiohttp import web

from mlxring.api import anthropic
from mlxring.api.errors import ApiError, invalid, unavailable
from mlxring.api.limits import Gate, GatedSite, raise_fd_limit
from mlxring.api.middleware import middleware
from mlxring.api.openai import complete, stream
from mlxring.api.proxy import forward
from mlxring.api.schema import GenerationRequest, Kind, parse_generation, parse_json_body, read_body
from mlxring.api.state import ARRIVED, RID, STATE, ApiState, note
from mlxring.api.status import cluster_status, get_model, health, list_models, metrics
from mlxring.api.web import web_file, web_index
from mlxring.engine.lifecycle import GeneratedToken
from mlxring.engine.text import Piece, TextAssembler, assembler, pieces
from mlxring.ring.runtime import Runtime

log = structlog.get_logger()

SHUTDOWN_S = 5.0  # how long a stopping node lets in-flight responses finish


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "completion")


async def _generation(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.hosts_head:
        return await forward(request)
    data = parse_json_body(await read_body(request, state.api))
    req = parse_generation(kind, data, state.vocab_size())
    if req.model is not None and req.model not in state.model_names:
        raise ApiError(
            400,
            f"The model {req.model!r} does not exist on this server; it serves "
            f"{state.model_name!r} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    async with generation(request, req) as gen:
        if req.stream:
            return await stream(request, req, gen.n_prompt, gen.pieces)
        return await complete(request, req, gen.n_prompt, gen.pieces)


async def messages(request: web.Request) -> web.StreamResponse:
    """Anthropic's `POST /v1/messages`."""
    state = request.app[STATE]
    if not state.hosts_head:
        return await forward(request, anthropic.STREAM)
    data = parse_json_body(await read_body(request, state.api))
    req = anthropic.parse_request(data, state.vocab_size())
    async with generation(request, req) as gen:
        answer = anthropic.stream if req.stream else anthropic.complete
        return await answer(request, gen.n_prompt, gen.pieces, gen.text)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """Anthropic's `POST /v1/messages/count_tokens`: the prompt's tokens through the template."""
    state = request.app[STATE]
    if not state.hosts_head:
        return await forward(request, anthropic.STREAM)
    data = parse_json_body(await read_body(request, state.api))
    req = anthropic.parse_request(data, state.vocab_size(), count=True)
    if state.tokenizer is None:
        raise unavailable(state.not_serving() or "the head has no tokenizer yet")
    return web.json_response({"input_tokens": len(await _prompt_ids(state, req))})


@dataclass(frozen=True)
class Generation:
    n_prompt: int
    pieces: AsyncGenerator[Piece, None]
    text: TextAssembler  # the completion's whole text, a stop string included


@contextlib.asynccontextmanager
async def generation(request: web.Request, req: GenerationRequest) -> AsyncIterator[Generation]:
    """One request's generation, whichever API asked: tokenize, fit the context, wait for a
    slot, and the engine's tokens as Pieces of text (closed, with the slot, on leaving)."""
    state = request.app[STATE]
    ids = await _prompt_ids(state, req)
    max_tokens = _fit_context(state.context_length(), req, len(ids))
    # Refuse at once when the ring cannot serve, rather than time out inside the engine.
    if reason := state.not_serving():
        raise unavailable(reason)
    note(request, prompt_tokens=len(ids))
    async with state.admission.slot():
        # Checked again: the ring may have gone down while this request waited for a slot.
        engine, tok = state.engine, state.tokenizer
        reason = state.not_serving()
        if engine is None or tok is None or reason:
            raise unavailable(reason or "the head is not serving")
        timer = state.metrics.timer(len(ids), request[ARRIVED])
        tokens = cast(
            AsyncGenerator[GeneratedToken, None],
            engine.generate(
                ids, req.params, max_tokens, rid=request[RID], ignore_eos=req.ignore_eos
            ),
        )
        asm = assembler(tok, ids, req.stop)
        text = pieces(tokens, asm, timer.token)
        async with contextlib.aclosing(text):
            yield Generation(len(ids), text, asm)


async def _prompt_ids(state: ApiState, req: GenerationRequest) -> list[int]:
    tok = state.tokenizer
    assert tok is not None
    if req.prompt_ids is not None:
        return list(req.prompt_ids)

    def run() -> list[int]:
        if req.kind == "chat":
            msgs = [m.template_dict() for m in req.messages]
            return list(tok.apply_chat_template(msgs, add_generation_prompt=True))
        assert req.prompt_text is not None
        return list(tok.encode(req.prompt_text))

    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(state.tokenize_pool, run)
    except Exception as e:  # noqa: BLE001 - the template or tokenizer rejected this input
        what = "the model's chat template" if req.kind == "chat" else "the tokenizer"
        log.info("prompt_rejected", error=f"{type(e).__name__}: {e}")
        raise invalid(
            req.prompt_param, f"The {req.prompt_param} could not be processed by {what}: {e}"
        ) from None
    if not ids:
        raise invalid(req.prompt_param, f"The {req.prompt_param} encodes to no tokens.")
    return ids


def _fit_context(ctx: int | None, req: GenerationRequest, n_prompt: int) -> int:
    """The max_tokens to generate; 413 for a prompt over the context, 400 for a budget over."""
    if ctx is None:
        return req.max_tokens or 4096
    if n_prompt >= ctx:
        raise ApiError(
            413,
            f"This model's maximum context length is {ctx} tokens. However, your "
            f"{req.prompt_param} resulted in {n_prompt} tokens, which leaves no room to generate.",
            param=req.prompt_param,
            code="context_length_exceeded",
        )
    if req.max_tokens is None:
        return ctx - n_prompt
    if n_prompt + req.max_tokens > ctx:
        raise invalid(
            "max_tokens",
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the {req.prompt_param}, "
            f"{req.max_tokens} for the completion). Please reduce the length of the "
            f"{req.prompt_param} or the completion.",
            code="context_length_exceeded",
        )
    return req.max_tokens


def create_app(runtime: Runtime, state: ApiState | None = None) -> web.Application:
    """One aiohttp app; apps of one process share `state` (queue, tokenizer thread, client)."""
    if state is None:
        state = ApiState.of(runtime)
    # aiohttp's own size check is a backstop; read_body answers 413 before reading.
    app = web.Application(client_max_size=state.api.max_body_bytes, middlewares=[middleware])
    app[STATE] = state

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await state.open()
        yield
        await state.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/cluster/status", cluster_status, name="cluster-status")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/", web_index, name="web-index")
    app.router.add_get("/web/{name}", web_file, name="web-file")
    return app


async def start_api(runtime: Runtime) -> list[web.AppRunner]:
    """One HTTP server per distinct API port of this process's nodes."""
    state = ApiState.of(runtime)
    host = state.api.host
    raise_fd_limit(state.api)
    gate = Gate(state.api)  # one count of connections for all of this process's API ports
    runners: list[web.AppRunner] = []
    try:
        for port in state.api_ports():
            runner = web.AppRunner(
                create_app(runtime, state),
                access_log=None,
                # A client that hangs up cancels its handler, and so its generation, at once.
                handler_cancellation=True,
                shutdown_timeout=SHUTDOWN_S,
                # aiohttp closes a connection without a complete request this long after the
                # last response (the first head has the gate's shorter deadline).
                keepalive_timeout=state.api.idle_timeout_s,
            )
            runners.append(runner)
            await runner.setup()
            await GatedSite(runner, gate, host, port).start()
            log.info("api_listening", host=host, port=port)
    except BaseException:  # e.g. a port in use: stop the servers already listening
        for r in runners:
            await r.cleanup()
        raise
    return runners
