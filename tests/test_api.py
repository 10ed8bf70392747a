"""The OpenAI-compatible API against a real ring of tiny models: the official `openai` client,
streaming and not, equals mlx-lm's greedy output; stop strings, logprobs, usage, seeds,
concurrency, cancellation and forwarding from a non-head node."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxring.engine.text import IncrementalDecoder, TextAssembler
from mlxring.ring.runtime import Runtime

from .ringutil import (
    OpenAIRing,
    chat_ids,
    decode,
    encode,
    local_ring,
    openai_ring,
    process_ring,
    reference,
    serve_api,
    tiny_model,
    wait_for,
    write_valid_config,
)

MODEL = tiny_model("qwen3")
MESSAGES = [
    {"role": "system", "content": "You are a ring of Macs."},
    {"role": "user", "content": "Tell me about activations travelling over Thunderbolt."},
]
PROMPT = "The ring carries activations from one Mac to the next."


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[OpenAIRing]:
    async with openai_ring(tmp_path, MODEL, 3) as ring:
        yield ring


def want_chat(n: int, messages: list[dict[str, str]] = MESSAGES) -> str:
    return decode(MODEL, reference(MODEL, chat_ids(MODEL, messages), n))


def want_completion(prompt: str, n: int) -> str:
    return decode(MODEL, reference(MODEL, encode(MODEL, prompt), n))


async def chat_stream_text(api: OpenAIRing, **kw: object) -> tuple[str, str | None]:
    stream = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, stream=True, **kw
    )
    parts, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    return "".join(parts), finish


async def caches_freed(rt: Runtime) -> None:
    await wait_for(
        lambda: (
            all(not n.actor.requests for n in rt.nodes.values())
            and (rt.engine is None or rt.engine.active == 0)
        ),
        timeout=10,
    )


async def test_chat_streamed_and_not_equal_mlx_lm(api: OpenAIRing) -> None:
    want = want_chat(32)
    assert len(set(want)) > 5, "degenerate oracle output"
    r = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=32, temperature=0
    )
    assert r.object == "chat.completion" and r.model == api.model
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    streamed, finish = await chat_stream_text(api, max_completion_tokens=32, temperature=0)
    assert streamed == want and finish == "length"


async def test_completions_streamed_and_not_equal_mlx_lm(api: OpenAIRing) -> None:
    for prompt in (PROMPT, "Hello", "A long time ago"):
        want = want_completion(prompt, 24)
        r = await api.client.completions.create(model=api.model, prompt=prompt, max_tokens=24)
        assert r.object == "text_completion"
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        stream = await api.client.completions.create(
            model=api.model, prompt=prompt, max_tokens=24, stream=True
        )
        assert "".join([c.choices[0].text async for c in stream]) == want
    ids = encode(MODEL, PROMPT)  # a prompt given as token ids
    r = await api.client.completions.create(model=api.model, prompt=ids, max_tokens=12)
    assert r.choices[0].text == want_completion(PROMPT, 12)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)


async def test_sync_client_from_a_thread(api: OpenAIRing) -> None:
    def run() -> tuple[str, str]:
        with openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=0) as c:
            r = c.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=16)
            s = c.chat.completions.create(
                model=api.model, messages=MESSAGES, max_tokens=16, stream=True
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
            return r.choices[0].message.content or "", text

    got, streamed = await asyncio.to_thread(run)
    assert got == streamed == want_chat(16)


async def test_model_may_be_omitted_and_unknown_fields_are_ignored(api: OpenAIRing) -> None:
    async with aiohttp.ClientSession() as s:
        body = {"messages": MESSAGES, "max_tokens": 8, "frobnicate": {"x": 1}, "user": "u"}
        async with s.post(f"{api.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Request-Id"]
            data = await r.json()
    assert data["choices"][0]["message"]["content"] == want_chat(8)


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_string_cuts_exactly_before_it(api: OpenAIRing, stream: bool) -> None:
    full = want_chat(40)
    stop = full[12:15]
    cut = full.index(stop)
    assert 0 < cut, full
    stops = ["never-there", stop]
    if stream:
        text, finish = await chat_stream_text(api, max_tokens=40, stop=stops)
    else:
        r = await api.client.chat.completions.create(
            model=api.model, messages=MESSAGES, max_tokens=40, stop=stops
        )
        text, finish = r.choices[0].message.content or "", r.choices[0].finish_reason
    assert text == full[:cut] and finish == "stop"
    await caches_freed(api.rt)  # stopping early ended the generation on every shard


async def test_stop_string_on_completions_stream(api: OpenAIRing) -> None:
    full = want_completion(PROMPT, 40)
    stop = full[20:22]
    stream = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=40, stop=stop, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_logprobs_shape(api: OpenAIRing) -> None:
    r = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=10, logprobs=True, top_logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 10
    raw = b"".join(bytes(t.bytes or []) for t in lp.content)
    assert raw.decode(errors="replace") == r.choices[0].message.content
    for t in lp.content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.bytes is not None and bytes(t.bytes).decode(errors="replace")
        # Greedy: the chosen token is the most likely one.
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert [x.logprob for x in t.top_logprobs] == sorted(
            (x.logprob for x in t.top_logprobs), reverse=True
        )
    plain = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=4
    )
    assert plain.choices[0].logprobs is None
    stream = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=10, logprobs=True, stream=True
    )
    entries = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            entries += chunk.choices[0].logprobs.content
    assert [e.token for e in entries] == [t.token for t in lp.content]
    assert all(e.top_logprobs == [] for e in entries)


async def test_completion_logprobs_shape(api: OpenAIRing) -> None:
    r = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=8, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and len(lp.tokens) == 8
    assert lp.token_logprobs is not None and len(lp.token_logprobs) == 8
    assert lp.top_logprobs is not None and all(1 <= len(d) <= 2 for d in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)


async def test_usage_and_include_usage(api: OpenAIRing) -> None:
    n_prompt = len(chat_ids(MODEL, MESSAGES))
    r = await api.client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=9)
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 9)
    assert r.usage.total_tokens == n_prompt + 9
    stream = await api.client.chat.completions.create(
        model=api.model,
        messages=MESSAGES,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (n_prompt, 9)
    assert all(c.usage is None for c in content)
    r2 = await api.client.completions.create(model=api.model, prompt=PROMPT, max_tokens=5)
    assert r2.usage is not None and r2.usage.prompt_tokens == len(encode(MODEL, PROMPT))


async def test_seed_makes_sampling_reproducible(api: OpenAIRing) -> None:
    async def sample(seed: int) -> str:
        r = await api.client.chat.completions.create(
            model=api.model, messages=MESSAGES, max_tokens=24, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content or ""

    a, b = await asyncio.gather(sample(1234), sample(1234))
    assert a == b
    others = {await sample(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should give different samples"
    stream = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=99, stream=True
    )
    streamed = "".join([c.choices[0].text async for c in stream])
    r = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=99
    )
    assert r.choices[0].text == streamed


async def test_sampling_parameters_are_accepted(api: OpenAIRing) -> None:
    r = await api.client.chat.completions.create(
        model=api.model,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logit_bias={"5": 10, "7": -100},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    assert r.usage is not None and r.usage.completion_tokens == 8
    for top_k in (512, 10**6):  # >= the vocabulary: no filter (mlx-lm itself would refuse it)
        r = await api.client.completions.create(
            model=api.model, prompt=PROMPT, max_tokens=4, temperature=1, extra_body={"top_k": top_k}
        )
        assert r.usage is not None and r.usage.completion_tokens == 4
    # A strong bias makes greedy decoding pick that token every time.
    biased = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=4, logit_bias={"261": 100}
    )
    assert biased.choices[0].text == decode(MODEL, [261] * 4)


async def test_32_concurrent_streams_each_equal_their_reference(api: OpenAIRing) -> None:
    prompts = [f"Request {i} asks about topic number {i * 7}." for i in range(32)]
    wants = [want_completion(p, 12) for p in prompts]

    async def one(p: str) -> str:
        stream = await api.client.completions.create(
            model=api.model, prompt=p, max_tokens=12, stream=True
        )
        return "".join([c.choices[0].text async for c in stream])

    assert await asyncio.gather(*(one(p) for p in prompts)) == wants
    await caches_freed(api.rt)


async def test_client_closing_a_stream_frees_caches_on_every_shard(api: OpenAIRing) -> None:
    stream = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=3000, stream=True
    )
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    assert any(n.actor.requests for n in api.rt.nodes.values())
    await stream.close()
    await caches_freed(api.rt)
    # The ring serves the next request as before.
    r = await api.client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=8)
    assert r.choices[0].message.content == want_chat(8)


async def test_models_health_and_cluster_status(api: OpenAIRing) -> None:
    models = await api.client.models.list()
    assert [m.id for m in models.data] == [api.model]
    assert (await api.client.models.retrieve(api.model)).id == api.model
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{api.url}/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with s.get(f"{api.url}/cluster/status") as r:
            assert r.status == 200
            status = await r.json()
    assert status["head"] == "n0" and status["model"] == api.model
    assert status["ring"]["ok"] is True and status["ring"]["hop_ms"] > 0
    nodes = status["nodes"]
    assert [n["name"] for n in nodes] == ["n0", "n1", "n2"]
    assert [n["layers"] for n in nodes] == [list(r) for r in api.rt.plan]
    assert all(n["up"] for n in nodes) and [n["head"] for n in nodes] == [True, False, False]
    cfg = api.rt.config
    assert [n["api_port"] for n in nodes] == [cfg.api_port(n) for n in cfg.names]
    assert [n["ring_port"] for n in nodes] == [n.port for n in cfg.nodes]
    assert all(n["address"] == "127.0.0.1" for n in nodes)
    assert all(n["member"] and n["memory_active_bytes"] > 0 for n in nodes)
    assert all(n["memory_total_bytes"] >= n["memory_active_bytes"] for n in nodes)
    assert status["requests"]["generating"] == 0 and "tokens_per_s" in status["requests"]


async def test_every_port_of_the_process_serves(api: OpenAIRing) -> None:
    """A process hosting several nodes serves the API on each node's port."""
    port = api.rt.config.api_port("n2")
    c = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    r = await c.completions.create(model=api.model, prompt=PROMPT, max_tokens=6)
    await c.close()
    assert r.choices[0].text == want_completion(PROMPT, 6)


async def test_non_head_node_forwards_to_the_head(tmp_path: Path) -> None:
    """n0 (the head) runs here; n1 is an `mlxring node` process with its own API."""
    cfg = write_valid_config(tmp_path, MODEL, 2)
    with process_ring(cfg, ["n1"], tmp_path) as procs:
        async with local_ring(cfg, ["n0"]) as rt, serve_api(rt) as head_url:
            await asyncio.to_thread(procs["n1"].wait_log, "node_started")
            n1_url = f"http://127.0.0.1:{rt.config.api_port('n1')}"
            head = openai.AsyncOpenAI(base_url=f"{head_url}/v1", api_key="x", max_retries=0)
            other = openai.AsyncOpenAI(base_url=f"{n1_url}/v1", api_key="x", max_retries=0)
            kw = dict(model=rt.model_name, messages=MESSAGES, max_tokens=20)
            a = await head.chat.completions.create(**kw)  # type: ignore[call-overload]
            b = await other.chat.completions.create(**kw)  # type: ignore[call-overload]
            assert a.choices[0].message.content == b.choices[0].message.content == want_chat(20)
            stream = await other.chat.completions.create(stream=True, **kw)  # type: ignore[call-overload]
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == want_chat(20)
            async with aiohttp.ClientSession() as s:
                # Errors come back from the head as they are.
                async with s.post(f"{n1_url}/v1/completions", json={"prompt": 5}) as r:
                    assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"
                async with s.get(f"{n1_url}/health") as r:
                    assert r.status == 200, await r.text()
                async with s.get(f"{n1_url}/cluster/status") as r:
                    status = await r.json()
                assert status["answered_by"] == "n0" and status["ring"]["ok"]
                assert all(n["up"] for n in status["nodes"])
                # A client that hangs up on the non-head node cancels the generation at the head.
                async with s.post(
                    f"{n1_url}/v1/completions",
                    json={"prompt": PROMPT, "max_tokens": 3000, "stream": True},
                ) as r:
                    assert r.status == 200
                    await r.content.readuntil(b"\n\n")
                await caches_freed(rt)
            await head.close()
            await other.close()


# ---------------------------------------------------------------------------------------------
# The text pipeline on its own: stop strings and the incremental decoder


def _chars_decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abc", max_size=40),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=4),
)
def test_stop_strings_never_leak_and_cut_at_the_first(text: str, stops: list[str]) -> None:
    asm = TextAssembler(IncrementalDecoder(_chars_decode, []), stops)
    out, stopped = "", False
    for i, ch in enumerate(text):
        asm.add(ord(ch), 0.0, ())
        final = i == len(text) - 1
        if final:
            asm.finalize()
        piece, _, stopped = asm.take(final)
        out += piece
        if stopped:
            break
    # Generation stops at the first token after which some stop string has appeared.
    want, cut = text, False
    for i in range(1, len(text) + 1):
        if found := [text[:i].find(s) for s in stops if s in text[:i]]:
            want, cut = text[: min(found)], True
            break
    assert out == want and stopped == cut


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 511), max_size=30), ctx=st.lists(st.integers(3, 96)))
def test_incremental_decoder_equals_decoding_at_once(ids: list[int], ctx: list[int]) -> None:
    from .ringutil import loaded

    _, tok = loaded(MODEL)

    def dec(x: list[int]) -> str:
        return str(tok.decode(x))  # type: ignore[attr-defined]

    d = IncrementalDecoder(dec, ctx)  # ASCII-only context: its text ends on a whole character
    text = "".join(d.add(t) for t in ids) + d.flush()
    assert text == dec(ids)


def test_sse_lines_are_well_formed(tmp_path: Path) -> None:
    """Raw SSE: `data: {json}` events, `data: [DONE]` last, and nothing else."""

    async def run() -> list[bytes]:
        async with local_ring(write_valid_config(tmp_path, MODEL, 2)) as rt, serve_api(rt) as url:
            async with aiohttp.ClientSession() as s:
                body = {"messages": MESSAGES, "max_tokens": 5, "stream": True}
                async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                    assert r.headers["Content-Type"].startswith("text/event-stream")
                    return (await r.read()).split(b"\n\n")

    events = asyncio.run(run())
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for e in events[:-2]:
        assert e.startswith(b"data: ")
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"
