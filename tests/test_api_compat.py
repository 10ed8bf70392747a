"""What real OpenAI clients send and expect, through a real ring: tools declared with
tool_choice "none", any model name, CORS, n > 1 as batched rows, echo and batches of prompts,
the routes without /v1, logprobs of byte tokens, and the stream's first and last chunks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from mlxring.engine.text import BYTE_LEVEL, assembler

from .ringutil import (
    OpenAIRing,
    chat_ids,
    decode,
    encode,
    loaded,
    local_ring,
    openai_ring,
    process_ring,
    reference,
    serve_api,
    tiny_model,
    write_valid_config,
)

MODEL = tiny_model("qwen3")
MESSAGES = [{"role": "user", "content": "Which clients speak to a ring of Macs?"}]
PROMPT = "Clients of every kind"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[OpenAIRing]:
    async with openai_ring(tmp_path, MODEL, 2) as ring:
        yield ring


def want_chat(n: int) -> str:
    return decode(MODEL, reference(MODEL, chat_ids(MODEL, MESSAGES), n))


def want_completion(prompt: str, n: int) -> str:
    return decode(MODEL, reference(MODEL, encode(MODEL, prompt), n))


async def raw_stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        events = (await r.read()).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    return [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]


def tool_template_model(directory: Path) -> Path:
    """The tiny model with a chat template that renders `tools` (as Qwen's and Llama's do)."""
    out = directory / "with-tools"
    out.mkdir()
    for f in MODEL.iterdir():
        (out / f.name).symlink_to(f)
    (out / "tokenizer_config.json").unlink()
    config = json.loads((MODEL / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{%- if tools -%}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif -%}"
        + config["chat_template"]
    )
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


async def test_tools_with_tool_choice_none_are_accepted_and_not_shown(tmp_path: Path) -> None:
    model = tool_template_model(tmp_path)
    _, tok = loaded(model)
    with_tools = tok.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True)
    plain = chat_ids(model, MESSAGES)
    assert len(with_tools) > len(plain)  # the template does render tools when given them
    want = decode(model, reference(model, plain, 12))
    cfg = write_valid_config(tmp_path, model, 2)
    async with local_ring(cfg) as rt, serve_api(rt) as url:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = await client.chat.completions.create(
            model=rt.model_name,
            messages=MESSAGES,  # type: ignore[arg-type]
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="none",
            parallel_tool_calls=False,
            max_tokens=12,
        )
        # The model saw the plain prompt: the tools were not rendered into it.
        assert r.usage is not None and r.usage.prompt_tokens == len(plain)
        assert r.choices[0].message.content == want
        for kw, param in [
            # auto, by default, with tools: this template shows tools, but mlx-lm knows no
            # format to read the calls of a model whose template and vocabulary name none.
            ({"tools": TOOLS}, "tools"),
            ({"tools": TOOLS, "tool_choice": "required"}, "tools"),
            ({"tool_choice": "required"}, "tool_choice"),  # requires tools
            ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
            (
                {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                "tool_choice.function.name",
            ),
            (
                {"tools": [{"type": "function", "function": {"name": "a b"}}]},
                "tools[0].function.name",
            ),
            ({"tools": [{"type": "retrieval"}], "tool_choice": "none"}, "tools[0].type"),
            (
                {"tools": TOOLS, "tool_choice": "none", "parallel_tool_calls": "no"},
                "parallel_tool_calls",
            ),
        ]:
            with pytest.raises(openai.BadRequestError) as e:
                await client.chat.completions.create(
                    model=rt.model_name,
                    messages=MESSAGES,
                    max_tokens=2,
                    **kw,  # type: ignore[arg-type]
                )
            assert isinstance(e.value.body, dict) and e.value.body["param"] == param, (
                kw,
                e.value.body,
            )
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(
                model=rt.model_name,
                messages=MESSAGES,
                tools=TOOLS,
                max_tokens=2,  # type: ignore[arg-type]
            )
        assert "This model cannot call tools: mlx-lm knows no tool-call format" in str(e.value.body)
        await client.close()


async def test_any_model_name_is_served_and_the_answer_names_the_served_model(
    api: OpenAIRing,
) -> None:
    want = want_chat(6)
    for name in ("gpt-4o", "local", api.model):
        r = await api.client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6)  # type: ignore[arg-type]
        assert r.model == api.model and r.choices[0].message.content == want
    stream = await api.client.completions.create(
        model="text-davinci-003", prompt=PROMPT, max_tokens=4, stream=True
    )
    assert {c.model async for c in stream} == {api.model}


async def test_routes_without_v1(api: OpenAIRing) -> None:
    client = openai.AsyncOpenAI(base_url=api.url, api_key="x", max_retries=0)
    r = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6)  # type: ignore[arg-type]
    assert r.choices[0].message.content == want_chat(6)
    c = await client.completions.create(model="m", prompt=PROMPT, max_tokens=5)
    assert c.choices[0].text == want_completion(PROMPT, 5)
    assert [m.id for m in (await client.models.list()).data] == [api.model]
    assert (await client.models.retrieve(api.model)).id == api.model
    await client.close()


async def test_cors_default_allows_every_origin_on_every_answer(api: OpenAIRing) -> None:
    origin = {"Origin": "http://localhost:3000"}
    async with aiohttp.ClientSession() as s:
        ask = {
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        }
        async with s.options(f"{api.url}/v1/chat/completions", headers=ask) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            allowed = {
                h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")
            }
            assert {"authorization", "content-type", "x-api-key", "anthropic-version"} <= allowed
            assert "x-stainless-os" in allowed  # what the page asked for, too
        body = {"messages": MESSAGES, "max_tokens": 3}
        async with s.post(f"{api.url}/v1/chat/completions", json=body, headers=origin) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
        async with s.post(
            f"{api.url}/v1/chat/completions", json={**body, "stream": True}, headers=origin
        ) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        async with s.post(
            f"{api.url}/v1/chat/completions", json={"max_tokens": 3}, headers=origin
        ) as r:
            assert r.status == 400 and r.headers["Access-Control-Allow-Origin"] == "*"
        async with s.get(f"{api.url}/nowhere", headers=origin) as r:
            assert r.status == 404 and r.headers["Access-Control-Allow-Origin"] == "*"
        async with s.get(f"{api.url}/v1/models") as r:  # no Origin: not a browser's request
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_listed_origins_only_and_preflight_without_the_key(tmp_path: Path) -> None:
    api = 'api_key = "k"\nallowed_origins = ["http://app.example:8080"]'
    cfg = write_valid_config(tmp_path, MODEL, 2, api=api)
    ask = {"Access-Control-Request-Method": "POST"}
    key = {"Authorization": "Bearer k"}
    async with local_ring(cfg) as rt, serve_api(rt) as url, aiohttp.ClientSession() as s:
        good = {"Origin": "http://app.example:8080"}
        async with s.options(f"{url}/v1/completions", headers={**good, **ask}) as r:
            assert r.status == 204  # no key: browsers send none with a preflight
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.example:8080"
            assert r.headers["Vary"] == "Origin"
        body = {"prompt": PROMPT, "max_tokens": 2}
        async with s.post(f"{url}/v1/completions", json=body, headers={**good, **key}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.example:8080"
        async with s.post(f"{url}/v1/completions", json=body, headers=good) as r:
            assert r.status == 401  # the key is still needed, and the page may read why
            assert r.headers["Access-Control-Allow-Origin"] == "http://app.example:8080"
        bad = {"Origin": "http://evil.example"}
        async with s.options(f"{url}/v1/completions", headers={**bad, **ask}) as r:
            assert r.status == 204
            assert not any(h.startswith("Access-Control-") for h in r.headers)
        async with s.post(f"{url}/v1/completions", json=body, headers={**bad, **key}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers


async def test_n_choices_are_batched_rows_streamed_and_not(api: OpenAIRing) -> None:
    want = want_chat(10)
    r = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=10, n=3
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [want] * 3  # greedy: equal answers
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(chat_ids(MODEL, MESSAGES))  # the prompt counts once
    assert r.usage.completion_tokens == 30
    body = {
        "messages": MESSAGES,
        "max_tokens": 10,
        "n": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = await raw_stream(f"{api.url}/v1/chat/completions", body)
    texts: dict[int, str] = {}
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["delta"] == {} and mine[-1]["finish_reason"] == "length"
        assert all(c["finish_reason"] is None for c in mine[:-1])
        texts[i] = "".join(c["delta"].get("content", "") for c in mine)
    assert texts == {0: want, 1: want, 2: want}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 30
    # Sampled with one seed, the choices differ (each row its own seed) and repeat exactly.
    kw: dict[str, Any] = {"temperature": 1.0, "seed": 7, "max_tokens": 16, "n": 2}
    a = await api.client.chat.completions.create(model=api.model, messages=MESSAGES, **kw)  # type: ignore[arg-type]
    b = await api.client.chat.completions.create(model=api.model, messages=MESSAGES, **kw)  # type: ignore[arg-type]
    got = [c.message.content for c in a.choices]
    assert got == [c.message.content for c in b.choices] and got[0] != got[1]


async def test_echo_and_a_batch_of_prompts(api: OpenAIRing) -> None:
    second = "A ring"
    r = await api.client.completions.create(
        model=api.model, prompt=[PROMPT, second], max_tokens=6, n=2, echo=True
    )
    want = [PROMPT + want_completion(PROMPT, 6), second + want_completion(second, 6)]
    assert [(c.index, c.text) for c in r.choices] == [
        (0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])
    ]  # fmt: skip
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(encode(MODEL, PROMPT)) + len(encode(MODEL, second))
    ids = encode(MODEL, PROMPT)  # token ids echo as their text
    r = await api.client.completions.create(model=api.model, prompt=[ids], max_tokens=4, echo=True)
    assert r.choices[0].text == decode(MODEL, ids) + want_completion(PROMPT, 4)
    body = {"prompt": [PROMPT, second], "max_tokens": 6, "echo": True, "stream": True}
    chunks = await raw_stream(f"{api.url}/v1/completions", body)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["text"] == [PROMPT, second][i]  # the echo comes first
        assert "".join(c["text"] for c in mine) == want[i]
        assert mine[-1]["text"] == "" and mine[-1]["finish_reason"] == "length"
    with pytest.raises(openai.BadRequestError) as e:
        await api.client.completions.create(
            model=api.model, prompt=PROMPT, max_tokens=2, echo=True, logprobs=1
        )
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "echo"


async def test_stream_finish_chunk_carries_no_text(api: OpenAIRing) -> None:
    full = want_chat(12)
    body = {"messages": MESSAGES, "max_tokens": 12, "stream": True, "stop": [full[6:8]]}
    chunks = await raw_stream(f"{api.url}/v1/chat/completions", body)
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    assert choices[-1] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "".join(c["delta"].get("content", "") for c in choices) == full[: full.index(full[6:8])]
    body = {"prompt": PROMPT, "max_tokens": 5, "stream": True}
    chunks = await raw_stream(f"{api.url}/v1/completions", body)
    assert chunks[-1]["choices"][0]["text"] == ""
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == want_completion(PROMPT, 5)


def byte_ids() -> dict[int, int]:
    """Byte -> the tiny tokenizer's single-byte token id."""
    _, tok = loaded(MODEL)
    return {b: int(tok.convert_tokens_to_ids(c)) for c, b in BYTE_LEVEL.items()}


async def test_logprobs_of_byte_tokens_keep_every_entry(api: OpenAIRing) -> None:
    ids = byte_ids()
    # Steer the ring onto five partial-UTF-8 byte tokens (each alone decodes as U+FFFD).
    steer = {str(ids[b]): 100 for b in (0xE2, 0x82, 0xAC, 0xC3, 0xA9)}
    r = await api.client.completions.create(
        model=api.model, prompt=PROMPT, max_tokens=6, logprobs=5, logit_bias=steer
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.top_logprobs and lp.text_offset is not None
    names = {f"bytes:\\x{b:02x}" for b in (0xE2, 0x82, 0xAC, 0xC3, 0xA9)}
    assert all(len(d) == 5 and set(d) == names for d in lp.top_logprobs)
    assert set(lp.tokens) <= names
    raw = bytes(int(t[-2:], 16) for t in lp.tokens)
    assert r.choices[0].text == raw.decode(errors="replace")
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(r.choices[0].text)
    chat = await api.client.chat.completions.create(
        model=api.model, messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=5,
        logit_bias=steer,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert all(len({t.token for t in e.top_logprobs}) == 5 for e in content)
    assert all(e.token == f"bytes:\\x{e.bytes[0]:02x}" for e in content if e.bytes)


def test_text_offset_of_byte_tokens_is_where_their_character_starts() -> None:
    _, tok = loaded(MODEL)
    ids = byte_ids()
    # "€" in three tokens, then "A": the three start in character 0, "A" at 1. Then bytes that
    # are no character (E2 82 then "B"): U+FFFD at 2, and "B" at 3.
    seq = [ids[0xE2], ids[0x82], ids[0xAC], ids[0x41], ids[0xE2], ids[0x82], ids[0x42]]
    text = assembler(tok, encode(MODEL, PROMPT), ())
    for t in seq:
        text.add(t, 0.0, ())
    text.finalize()
    out, infos, _ = text.take(final=True)
    assert out == "€A\ufffdB"
    assert [i.offset for i in infos] == [0, 0, 0, 1, 2, 2, 3]


def test_n_and_choices_are_bounded() -> None:
    from mlxring.api.errors import ApiError
    from mlxring.api.schema import MAX_CHOICES, MAX_N, parse_generation

    parse_generation("chat", {"messages": MESSAGES, "n": MAX_N}, 512)
    for body in (
        {"messages": MESSAGES, "n": MAX_N + 1},
        {"prompt": ["a"] * (MAX_CHOICES // 2 + 1), "n": 2},
    ):
        kind = "chat" if "messages" in body else "completion"
        with pytest.raises(ApiError) as e:
            parse_generation(kind, body, 512)  # type: ignore[arg-type]
        assert e.value.status == 400 and e.value.param == "n"


async def test_a_non_head_node_forwards_the_new_shapes(tmp_path: Path) -> None:
    """n0 (the head) runs here; n1 is a node process that forwards to it."""
    cfg = write_valid_config(tmp_path, MODEL, 2)
    with process_ring(cfg, ["n1"], tmp_path) as procs:
        async with local_ring(cfg, ["n0"]) as rt, serve_api(rt):
            await asyncio.to_thread(procs["n1"].wait_log, "node_started")
            n1 = f"http://127.0.0.1:{rt.config.api_port('n1')}"
            want = want_chat(6)
            body = {"messages": MESSAGES, "max_tokens": 6, "n": 2, "stream": True}
            chunks = await raw_stream(f"{n1}/chat/completions", body)  # no /v1, n = 2
            for i in range(2):
                mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
                assert "".join(c["delta"].get("content", "") for c in mine) == want
            events = []
            body = {"model": "x", "input": MESSAGES[0]["content"], "max_output_tokens": 6}
            async with aiohttp.ClientSession() as s:
                headers = {"Origin": "http://page.example"}
                async with s.post(f"{n1}/v1/responses", json={**body, "stream": True}) as r:
                    assert r.status == 200
                    for e in (await r.read()).split(b"\n\n")[:-2]:
                        events.append(json.loads(e.split(b"data: ", 1)[1]))
                async with s.post(f"{n1}/v1/responses", json=body, headers=headers) as r:
                    assert r.headers["Access-Control-Allow-Origin"] == "*"
                    assert (await r.json())["output"][0]["content"][0]["text"] == want
            # The head's stream came through whole: no error event of a broken relay.
            assert events[-1]["type"] == "response.completed"
            assert all(e["type"] != "error" for e in events)
            deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
            assert "".join(deltas) == want
