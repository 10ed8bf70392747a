"""The aiohttp front actor: OpenAI-compatible endpoints on every node, and their wiring.

The process hosting the head (the one with the engine) serves generation itself; any other node
forwards API requests to the head's API and streams the answer back event by event.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/{id}]`,
`GET /health`, `GET /cluster/status`, `GET /metrics` (Prometheus text, this process's own), and
the web page `GET /` with its files under `/web/`. Every error body has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

A generation request goes: parse (schema) → tokenize → fit the context → admit (admission) →
the engine's tokens as text (mlxring.engine.text) → one body or an SSE stream (openai).
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
from dataclasses import replace
from typing import cast

import structlog
from aiohttp import web

from mlxring.api.cors import allow
from mlxring.api.errors import invalid, unavailable
from mlxring.api.limits import Gate, GatedSite, raise_fd_limit
from mlxring.api.middleware import middleware
from mlxring.api.openai import Choice, complete, stream
from mlxring.api.proxy import forward
from mlxring.api.schema import GenerationRequest, Kind, parse_generation, parse_json_body, read_body
from mlxring.api.state import ARRIVED, RID, STATE, ApiState, note
from mlxring.api.status import cluster_status, get_model, health, list_models, metrics
from mlxring.api.web import web_file, web_index
from mlxring.engine.lifecycle import GeneratedToken
from mlxring.engine.text import Piece, assembler, pieces
from mlxring.protocol.messages import SamplingParams
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
    # Any model name is taken: one model is served, and clients send whatever name their
    # settings hold (mlx-lm's and llama.cpp's servers do the same). The answer names the model.
    req = parse_generation(kind, data, state.vocab_size())
    prompts = await _prompt_ids(state, req)
    budgets = [_fit_context(state.context_length(), req, len(ids)) for ids in prompts]
    # Refuse at once when the ring cannot serve, rather than time out inside the engine.
    if reason := state.not_serving():
        raise unavailable(reason)
    note(request, prompt_tokens=sum(map(len, prompts)))
    echoes = await _echoes(state, req, prompts)
    # Choice i is of prompt i // n, as OpenAI orders a batch's choices.
    choices = [
        Choice(i, len(prompts[i // req.n]), echoes[i // req.n]) for i in range(len(prompts) * req.n)
    ]
    rows = _rows(request, req, prompts, budgets)
    async with contextlib.aclosing(rows):
        if req.stream:
            return await stream(request, req, choices, rows)
        return await complete(request, req, choices, rows)


async def _rows(
    request: web.Request, req: GenerationRequest, prompts: list[list[int]], budgets: list[int]
) -> AsyncGenerator[tuple[int, Piece], None]:
    """Every choice's Pieces as (choice index, piece), as they come: n choices of each prompt,
    each generated as its own request of the engine, so the ring batches them together. The
    first failure of any ends them all."""
    rid = request[RID]
    items: asyncio.Queue[tuple[int, Piece] | BaseException | None] = asyncio.Queue()

    async def one(index: int) -> None:
        p = index // req.n
        params = req.params
        if params.seed is not None and index:  # one seed, n different samples
            params = replace(params, seed=(params.seed + index) % (1 << 64))
        row_rid = rid if index == 0 else f"{rid}-{index}"
        try:
            async for piece in _row(request, req, prompts[p], budgets[p], params, row_rid):
                items.put_nowait((index, piece))
            items.put_nowait(None)
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            items.put_nowait(e)

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts) * req.n)]
    try:
        left = len(tasks)
        while left:
            item = await items.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        # Cancelling a row closes its engine generator: End(rid) frees its caches everywhere.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _row(
    request: web.Request,
    req: GenerationRequest,
    ids: list[int],
    max_tokens: int,
    params: SamplingParams,
    rid: str,
) -> AsyncGenerator[Piece, None]:
    """One choice's Pieces: an admission slot, then the engine's tokens as text."""
    state = request.app[STATE]
    async with state.admission.slot():
        # Checked again: the ring may have gone down while this request waited for a slot.
        engine, tok = state.engine, state.tokenizer
        reason = state.not_serving()
        if engine is None or tok is None or reason:
            raise unavailable(reason or "the head is not serving")
        timer = state.metrics.timer(len(ids), request[ARRIVED])
        tokens = cast(
            AsyncGenerator[GeneratedToken, None],
            engine.generate(ids, params, max_tokens, rid=rid, ignore_eos=req.ignore_eos),
        )
        text = pieces(tokens, assembler(tok, ids, req.stop), timer.token)
        async with contextlib.aclosing(text):
            async for piece in text:
                yield piece


async def _prompt_ids(state: ApiState, req: GenerationRequest) -> list[list[int]]:
    """Each prompt's token ids (a chat request has one prompt: its messages)."""
    tok = state.tokenizer
    assert tok is not None

    def run() -> list[list[int]]:
        if req.kind == "chat":
            msgs = [m.template_dict() for m in req.messages]
            return [list(tok.apply_chat_template(msgs, add_generation_prompt=True))]
        return [list(tok.encode(p)) if isinstance(p, str) else list(p) for p in req.prompts]

    loop = asyncio.get_running_loop()
    try:
        prompts = await loop.run_in_executor(state.tokenize_pool, run)
    except Exception as e:  # noqa: BLE001 - the template or tokenizer rejected this input
        what = "the model's chat template" if req.kind == "chat" else "the tokenizer"
        log.info("prompt_rejected", error=f"{type(e).__name__}: {e}")
        raise invalid(
            req.prompt_param, f"The {req.prompt_param} could not be processed by {what}: {e}"
        ) from None
    for i, ids in enumerate(prompts):
        if not ids:
            param = req.prompt_param if len(prompts) == 1 else f"{req.prompt_param}[{i}]"
            raise invalid(param, f"The {param} encodes to no tokens.")
    return prompts


async def _echoes(state: ApiState, req: GenerationRequest, prompts: list[list[int]]) -> list[str]:
    """The text that opens each prompt's choices: the prompt itself with `echo`, else ""."""
    if not req.echo:
        return [""] * len(prompts)
    tok = state.tokenizer
    assert tok is not None

    def run() -> list[str]:
        return [
            p if isinstance(p, str) else str(tok.decode(ids))
            for p, ids in zip(req.prompts, prompts, strict=True)
        ]

    return await asyncio.get_running_loop().run_in_executor(state.tokenize_pool, run)


def _fit_context(ctx: int | None, req: GenerationRequest, n_prompt: int) -> int:
    """The max_tokens to generate; a 400 `context_length_exceeded` for a prompt over the
    context or a budget over it (OpenAI's answer, the one clients catch)."""
    if ctx is None:
        return req.max_tokens or 4096
    if n_prompt >= ctx:
        raise invalid(
            req.prompt_param,
            f"This model's maximum context length is {ctx} tokens. However, your "
            f"{req.prompt_param} resulted in {n_prompt} tokens, which leaves no room to generate.",
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
    app.on_response_prepare.append(allow)
    # The OpenAI routes answer without the /v1 prefix too: some clients take a base URL
    # without it.
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_get(f"{prefix}/models", list_models)
        app.router.add_get(f"{prefix}/models/{{model}}", get_model)
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
