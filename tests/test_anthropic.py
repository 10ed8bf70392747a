"""Anthropic's Messages API against a real ring of tiny models, with the official `anthropic`
client and raw SSE over HTTP: text equal to mlx-lm's greedy output, the event sequence, stop
sequences, usage equal to the OpenAI routes', count_tokens, x-api-key, Anthropic-shaped errors,
a non-head node forwarding (a stream cut by a lost node ends with an error event), and the real
smollm2 answering "Paris". Tools and thinking run on a tiny model with Qwen3's template and
markers: a required call (a grammar makes random weights write one) as a tool_use block,
streamed and not, a tool result given back through the template as mlx-lm renders it, thinking
on and off in the template; the content blocks of reasoning, text and calls from scripted
pieces."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlxring import aio
from mlxring.api.anthropic import Blocks
from mlxring.api.anthropic_request import parse_request
from mlxring.api.errors import ApiError
from mlxring.config import load_config
from mlxring.engine.text import Piece, ToolCall
from mlxring.ring.runtime import Runtime

from .ringutil import (
    FAST,
    chat_ids,
    decode,
    loaded,
    local_ring,
    packaged_model,
    post_json,
    process_ring,
    reference,
    serve_api,
    tiny_model,
    wait_for,
    write_valid_config,
)

MODEL = tiny_model("qwen3")
SYSTEM = "You are a ring of Macs."
MESSAGES = [{"role": "user", "content": "Tell me about activations travelling over Thunderbolt."}]
CHAT = [{"role": "system", "content": SYSTEM}, *MESSAGES]  # the same prompt as an OpenAI chat
KEY = "sekrit"

TOOL_MODEL = tiny_model("qwen3", chat="qwen3")  # Qwen3's template: it takes tools and thinks
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"name": "get_weather", "description": "The weather in a city.", "input_schema": CITY},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# A required call of get_weather, one call only: a grammar makes random weights write it.
CALL: dict[str, Any] = dict(
    model="m",
    messages=ASK,
    max_tokens=60,
    tools=TOOLS,
    tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
)


def _ok(**kw: Any) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": 2, **kw}


def _turns(*content: dict[str, Any]) -> dict[str, Any]:
    """A body whose assistant turn holds `content`, answered by a user turn."""
    return _ok(
        messages=[*ASK, {"role": "assistant", "content": list(content)}, *MESSAGES], tools=TOOLS
    )


# Tool and thinking fields Anthropic refuses, and a word of each message.
BAD_AGENT_FIELDS: list[tuple[dict[str, Any], str]] = [
    (_ok(tool_choice={"type": "any"}), "tool_choice"),  # requires tools
    (_ok(tool_choice={"type": "tool", "name": "get_weather"}), "tool_choice"),
    (_ok(tools=TOOLS, tool_choice={"type": "tool", "name": "nope"}), "nope"),
    (_ok(tools=TOOLS, tool_choice={"type": "sometimes"}), "tool_choice.type"),
    (_ok(tools=[{"name": "a b", "input_schema": {"type": "object"}}]), "tools[0].name"),
    (_ok(tools=[{"name": "x" * 65, "input_schema": {"type": "object"}}]), "tools[0].name"),
    (_ok(tools=[TOOLS[0], TOOLS[0]]), "unique"),
    (_ok(tools=[{"name": "f"}]), "input_schema"),
    (_ok(tools=[{"name": "f", "input_schema": {"type": "string"}}]), "input_schema"),
    (_ok(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "server tools"),
    (_turns({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": "x"}), "input"),
    (_turns({"type": "tool_use", "id": "toolu_1", "name": "get_weather"}), "input"),
    (_turns({"type": "image"}), "image"),
    (
        _ok(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
        "tool_use_id",
    ),
    (
        _ok(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{}]}],
                }
            ]
        ),
        "content[0].content[0]",
    ),
    (
        _ok(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]),
        "tool_use",
    ),
    (_ok(thinking={"type": "enabled", "budget_tokens": 1000}, max_tokens=2000), "1024"),
    (_ok(thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=1024), "max_tokens"),
    (_ok(thinking={"type": "enabled"}), "budget_tokens"),
    (_ok(thinking={"type": "sometimes"}), "thinking.type"),
]


def want(n: int, model: Path = MODEL, chat: list[dict[str, str]] = CHAT) -> str:
    return decode(model, reference(model, chat_ids(model, chat), n))


@dataclass
class Api:
    rt: Runtime
    url: str
    client: anthropic.AsyncAnthropic


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with local_ring(write_valid_config(tmp_path, MODEL, 3)) as rt, serve_api(rt) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        yield Api(rt, url, client)
        await client.close()


async def sse_events(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """POST a streamed request; its events as (event name, data), checked to be well formed."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/messages", json={**body, "stream": True}, headers=headers or {}) as r,
    ):
        assert r.status == 200, await r.text()
        assert r.content_type == "text/event-stream"
        raw = (await aio.wait_for(r.read(), 30)).decode()
    assert raw.endswith("\n\n")
    out = []
    for ev in raw.split("\n\n")[:-1]:
        name_line, data_line = ev.split("\n")
        name = name_line.removeprefix("event: ")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line.startswith("event: ") and data["type"] == name, ev
        out.append((name, data))
    return out


def assert_error(body: Any, kind: str) -> str:
    """Anthropic's error shape, exactly; returns the message."""
    assert isinstance(body, dict) and set(body) == {"type", "error"}, body
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "Traceback" not in message
    return str(message)


def prompt_of(usage: Any) -> int:
    """The prompt's tokens in Anthropic's usage: those computed and those the ring's prompt
    cache gave (Anthropic counts cache reads apart from `input_tokens`)."""
    return int(usage.input_tokens + (usage.cache_read_input_tokens or 0))


def assert_sequence(events: list[tuple[str, dict[str, Any]]], n_prompt: int) -> tuple[str, Any]:
    """Anthropic's event order for one text block; the text and the final message_delta."""
    names = [n for n, _ in events]
    k = names.count("content_block_delta")
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * k,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], names
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["role"] == "assistant"
    assert start["content"] == [] and start["stop_reason"] is None
    # The ring's prompt cache may have given some of the prompt (Anthropic counts those apart).
    usage = start["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == n_prompt
    assert usage["cache_creation_input_tokens"] == usage["output_tokens"] == 0
    assert events[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [d for n, d in events if n == "content_block_delta"]
    assert all(d["index"] == 0 and d["delta"]["type"] == "text_delta" for d in deltas)
    assert events[-3][1] == {"type": "content_block_stop", "index": 0}
    return "".join(d["delta"]["text"] for d in deltas), events[-2][1]


async def test_messages_streamed_and_not_equal_mlx_lm_with_the_openai_usage(api: Api) -> None:
    text = want(24)
    assert len(set(text)) > 5, "degenerate oracle output"
    n_prompt = len(chat_ids(MODEL, CHAT))
    kw: dict[str, Any] = dict(model="claude-whatever", messages=MESSAGES, max_tokens=24)
    r = await api.client.messages.create(system=SYSTEM, extra_body={"temperature": 0}, **kw)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model == api.rt.model_name  # any name is accepted; the answer names the model
    assert [(b.type, b.text) for b in r.content] == [("text", text)]
    assert r.stop_reason == "max_tokens" and r.stop_sequence is None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (n_prompt, 24)
    # The OpenAI route counts the same prompt and completion alike.
    status, _, chat = await post_json(
        f"{api.url}/v1/chat/completions", {"messages": CHAT, "max_tokens": 24}
    )
    assert status == 200 and chat["choices"][0]["message"]["content"] == text
    assert chat["usage"]["prompt_tokens"] == r.usage.input_tokens
    assert chat["usage"]["completion_tokens"] == r.usage.output_tokens
    # Streamed, with the system prompt as text blocks: the same text and usage.
    blocks = [{"type": "text", "text": SYSTEM[:9]}, {"type": "text", "text": SYSTEM[9:]}]
    async with api.client.messages.stream(system=blocks, **kw) as s:  # type: ignore[arg-type]
        parts = [t async for t in s.text_stream]
        final = await s.get_final_message()
    assert len(parts) > 1 and "".join(parts) == text
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    # The same prompt again: the ring's prompt cache gave all of it but its last token.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (1, 24)
    assert final.usage.cache_read_input_tokens == n_prompt - 1
    # Raw SSE: Anthropic's event sequence, in order.
    events = await sse_events(api.url, {**kw, "system": SYSTEM})
    streamed, delta = assert_sequence(events, n_prompt)
    assert streamed == text
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 1,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": n_prompt - 1,
        "output_tokens": 24,
    }
    # thinking disabled and tool_choice auto/none without tools change nothing.
    r = await api.client.messages.create(
        system=SYSTEM, thinking={"type": "disabled"}, tool_choice={"type": "none"}, **kw
    )
    assert r.content[0].text == text


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_ends_the_text_before_it(api: Api, stream: bool) -> None:
    full = want(40)
    stop = full[12:15]
    cut = full.index(stop)
    assert cut > 0, full
    kw: dict[str, Any] = dict(
        model="m", system=SYSTEM, messages=MESSAGES, max_tokens=40, stop_sequences=["nowhere", stop]
    )
    if stream:
        async with api.client.messages.stream(**kw) as s:
            r = await s.get_final_message()
    else:
        r = await api.client.messages.create(**kw)
    assert r.content[0].text == full[:cut]  # type: ignore[union-attr]
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == stop
    assert r.usage.output_tokens < 40


async def test_count_tokens_is_the_chat_templates_length(api: Api) -> None:
    c = await api.client.messages.count_tokens(model="m", system=SYSTEM, messages=MESSAGES)  # type: ignore[arg-type]
    assert c.input_tokens == len(chat_ids(MODEL, CHAT))
    c = await api.client.messages.count_tokens(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert c.input_tokens == len(chat_ids(MODEL, MESSAGES))


async def test_errors_have_anthropics_shape(api: Api) -> None:
    url = f"{api.url}/v1/messages"
    ok = {"messages": MESSAGES, "max_tokens": 2}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": MESSAGES}, "max_tokens"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "messages": []}, "messages"),
        ({**ok, "temperature": 1.5}, "temperature"),
        ({**ok, "stop_sequences": "x"}, "stop_sequences"),
        ({**ok, "system": 5}, "system"),
        ({**ok, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({**ok, "messages": [{"role": "user"}]}, "content"),
        ({**ok, "messages": [*MESSAGES, {"role": "assistant", "content": "Sure"}]}, "prefill"),
        # This model's template shows no tools: it cannot be offered them.
        ({**ok, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "cannot call"),
        *BAD_AGENT_FIELDS,
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}], "max_tokens": 2},
            "image",
        ),
    ]
    for body, word in cases:
        status, _, err = await post_json(url, body)
        assert status == 400, body
        assert word in assert_error(err, "invalid_request_error"), (word, err)
    status, _, err = await post_json(url, None, raw=b"{nope")
    assert status == 400
    assert_error(err, "invalid_request_error")
    # A prompt over the context is 400 here, as Anthropic's "prompt is too long".
    status, _, err = await post_json(
        url, {"messages": [{"role": "user", "content": "hello " * 5000}], "max_tokens": 2}
    )
    assert status == 400 and "context length" in assert_error(err, "invalid_request_error")
    status, _, err = await post_json(f"{url}/batches", ok)
    assert status == 404
    assert_error(err, "not_found_error")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
        assert_error(await r.json(), "invalid_request_error")
    # Through the client: its own error types, with the body it read.
    with pytest.raises(anthropic.BadRequestError) as e:
        await api.client.messages.create(model="m", messages=MESSAGES, max_tokens=-1)  # type: ignore[arg-type]
    assert e.value.status_code == 400
    assert_error(e.value.body, "invalid_request_error")
    # The OpenAI routes keep OpenAI's shape.
    status, _, err = await post_json(f"{api.url}/v1/chat/completions", {"messages": 5})
    assert status == 400 and set(err) == {"error"} and err["error"]["param"] == "messages"


async def test_a_ring_that_cannot_serve_is_529_overloaded(tmp_path: Path) -> None:
    """The head's process alone, in a ring where one node cannot hold the model."""
    half = ["memory_gb = 0.0005", "memory_gb = 0.0005"]
    cfg = load_config(write_valid_config(tmp_path, MODEL, 2, node_extra=half))
    rt = Runtime(cfg, ["n0"])
    try:
        await rt.start(settle_s=0)
        assert rt.serving_reason()
        async with serve_api(rt) as url:
            for stream in (False, True):
                body = {"messages": MESSAGES, "max_tokens": 4, "stream": stream}
                status, headers, err = await post_json(f"{url}/v1/messages", body)
                assert status == 529 and headers["Retry-After"]
                assert "cannot serve" in assert_error(err, "overloaded_error")
            client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
            with pytest.raises(anthropic.APIStatusError) as e:
                await client.messages.create(model="m", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
            assert e.value.status_code == 529
            await client.close()
    finally:
        await rt.stop()


async def test_a_full_queue_is_529_overloaded(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 2, api="max_concurrent = 1\nmax_queue = 0")
    async with local_ring(cfg) as rt, serve_api(rt) as url, aiohttp.ClientSession() as s:
        long = {"messages": MESSAGES, "max_tokens": 3000, "stream": True}
        async with s.post(f"{url}/v1/messages", json=long) as held:
            await held.content.readuntil(b"\n\n")  # generating: the one slot is taken
            status, headers, err = await post_json(
                f"{url}/v1/messages", {"messages": MESSAGES, "max_tokens": 2}
            )
            assert status == 529 and headers["Retry-After"]
            assert "capacity" in assert_error(err, "overloaded_error")
        await wait_for(lambda: rt.engine is not None and rt.engine.active == 0, 10)
        status, _, done = await post_json(
            f"{url}/v1/messages", {"messages": MESSAGES, "max_tokens": 2}
        )
        assert status == 200 and done["usage"]["output_tokens"] == 2


async def test_any_node_answers_with_the_key_and_a_lost_node_ends_the_stream(
    tmp_path: Path,
) -> None:
    """n0 (the head) runs here; n1 and n2 are `mlxring node` processes, n1's API forwards. The
    API key is set: Anthropic's client sends it as x-api-key, which the head must get too. The
    model takes tools (Qwen3's template): a tool use streams from either node too."""
    cfg = write_valid_config(tmp_path, TOOL_MODEL, 3, extra_cluster=FAST, api=f'api_key = "{KEY}"')
    text = want(20, TOOL_MODEL)
    n_prompt = len(chat_ids(TOOL_MODEL, CHAT))
    kw: dict[str, Any] = dict(model="m", system=SYSTEM, messages=MESSAGES, max_tokens=20)
    with process_ring(cfg, ["n1", "n2"], tmp_path) as procs:
        async with local_ring(cfg, ["n0"]) as rt, serve_api(rt) as head_url:
            assert rt.members == ("n0", "n1", "n2")
            await asyncio.to_thread(procs["n1"].wait_log, "api_listening")
            n1_url = f"http://127.0.0.1:{rt.config.api_port('n1')}"
            for url in (head_url, n1_url):
                client = anthropic.AsyncAnthropic(base_url=url, api_key=KEY, max_retries=0)
                r = await client.messages.create(**kw)
                assert r.content[0].text == text and prompt_of(r.usage) == n_prompt
                async with client.messages.stream(**kw) as s:
                    assert "".join([t async for t in s.text_stream]) == text
                async with client.messages.stream(**CALL) as s:
                    use = await s.get_final_message()
                assert use.stop_reason == "tool_use" and use.content[0].type == "tool_use"
                jsonschema.validate(use.content[0].input, CITY)
                c = await client.messages.count_tokens(model="m", system=SYSTEM, messages=MESSAGES)  # type: ignore[arg-type]
                assert c.input_tokens == n_prompt
                # Without the key, or with a wrong one: Anthropic's 401.
                for headers in ({}, {"x-api-key": "wrong"}, {"Authorization": "Bearer wrong"}):
                    status, _, err = await post_json(f"{url}/v1/messages", kw, headers=headers)
                    assert status == 401, (url, headers)
                    assert_error(err, "authentication_error")
                bad = anthropic.AsyncAnthropic(base_url=url, api_key="wrong", max_retries=0)
                with pytest.raises(anthropic.AuthenticationError):
                    await bad.messages.create(**kw)
                await bad.close()
                await client.close()
            # Raw SSE relayed by n1: the same sequence; a Bearer key serves as well, and
            # x-api-key on the OpenAI routes.
            events = await sse_events(n1_url, kw, {"Authorization": f"Bearer {KEY}"})
            assert assert_sequence(events, n_prompt)[0] == text
            status, _, models = await post_json(
                f"{n1_url}/v1/chat/completions",
                {"messages": CHAT, "max_tokens": 3},
                headers={"x-api-key": KEY},
            )
            assert status == 200 and models["usage"]["prompt_tokens"] == n_prompt
            # The head's errors come back through n1 as they are; n1's own 404 is Anthropic's.
            status, _, err = await post_json(
                f"{n1_url}/v1/messages", {"messages": MESSAGES}, headers={"x-api-key": KEY}
            )
            assert status == 400 and "max_tokens" in assert_error(err, "invalid_request_error")
            status, _, err = await post_json(
                f"{n1_url}/v1/messages/x", kw, headers={"x-api-key": KEY}
            )
            assert status == 404
            assert_error(err, "not_found_error")
            # n2 is lost mid-stream: the stream through n1 ends with one error event.
            long = {**kw, "max_tokens": 3000, "stream": True}
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{n1_url}/v1/messages", json=long, headers={"x-api-key": KEY}) as r,
            ):
                assert r.status == 200
                for _ in range(4):  # message_start, ping, content_block_start, a delta
                    await r.content.readuntil(b"\n\n")
                procs["n2"].kill()
                t0 = time.monotonic()
                tail = (await aio.wait_for(r.read(), 15)).decode().split("\n\n")
                assert time.monotonic() - t0 < 10
            assert tail[-1] == "" and tail[-2].startswith("event: error\n"), tail[-3:]
            assert not any(ev.startswith("event: message_stop") for ev in tail)
            err = json.loads(tail[-2].split("\n")[1].removeprefix("data: "))
            # The head's own event, relayed (not n1's word that the head went quiet).
            assert "stopped answering" not in assert_error(err, "overloaded_error")


# In the slow set (9 s of the suite): the event stream is checked on the tiny model above.
@pytest.mark.slow
async def test_smollm2_answers_paris_through_the_anthropic_stream(tmp_path: Path) -> None:
    model = packaged_model("smollm2")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    n = 64
    ref = reference(model, chat_ids(model, question), n)
    async with local_ring(write_valid_config(tmp_path, model, 2)) as rt, serve_api(rt) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0)
        async with client.messages.stream(
            model="claude-sonnet-4-5",
            messages=question,  # type: ignore[arg-type]
            max_tokens=n,
        ) as s:
            parts = [t async for t in s.text_stream]
            final = await s.get_final_message()
        await client.close()
    assert "Paris" in "".join(parts) and len([p for p in parts if p]) > 1
    assert "".join(parts) == decode(model, ref)
    # Ended by the model's own end of turn, or by the budget: as mlx-lm's greedy run did.
    assert final.stop_reason == ("end_turn" if len(ref) < n else "max_tokens")
    assert final.usage.output_tokens == min(len(ref) + 1, n)


@pytest.fixture
async def tool_api(tmp_path: Path) -> AsyncIterator[Api]:
    """A ring of the model with Qwen3's template, for tools and thinking."""
    cfg = write_valid_config(tmp_path, TOOL_MODEL, 2)
    async with local_ring(cfg) as rt, serve_api(rt) as url:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0)
        yield Api(rt, url, client)
        await client.close()


def template_tools() -> list[dict[str, Any]]:
    """TOOLS as OpenAI's chat (and so the chat template) takes them."""
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                **({"description": t["description"]} if "description" in t else {}),
                "parameters": t["input_schema"],
            },
        }
        for t in TOOLS
    ]


def template_ids(messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    """mlx-lm's own template applied to an OpenAI-style chat, as the oracle of input_tokens."""
    _, tok = loaded(TOOL_MODEL)
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, **kw))


async def test_a_required_call_is_a_tool_use_block_streamed_and_not(tool_api: Api) -> None:
    r = await tool_api.client.messages.create(**CALL)
    assert r.stop_reason == "tool_use" and r.stop_sequence is None
    assert [b.type for b in r.content] == ["tool_use"], r.content
    use = r.content[0]
    assert use.type == "tool_use" and use.name == "get_weather"
    assert use.id.startswith("toolu_") and len(use.id) > len("toolu_")
    jsonschema.validate(use.input, CITY)
    assert prompt_of(r.usage) == len(template_ids(ASK, tools=template_tools()))
    assert 0 < r.usage.output_tokens <= 60
    # Streamed by the client: Anthropic's events in order, and the same message in the end.
    async with tool_api.client.messages.stream(**CALL) as s:
        names = [e.type async for e in s]
        final = await s.get_final_message()
    raw = {
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
    assert [n for n in names if n in raw] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * names.count("content_block_delta"),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ], names
    assert final.stop_reason == "tool_use"
    got = [b.model_dump() for b in final.content]
    # The same blocks, greedy; the ids are each call's own.
    assert [{**b, "id": None} for b in got] == [{**b.model_dump(), "id": None} for b in r.content]
    assert got[0]["id"].startswith("toolu_") and got[0]["id"] != use.id
    # Raw SSE: the block's start, its whole input in one delta, its end.
    events = await sse_events(tool_api.url, CALL)
    assert [n for n, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    block = events[2][1]["content_block"]
    assert block == {"type": "tool_use", "id": block["id"], "name": "get_weather", "input": {}}
    delta = events[3][1]
    assert delta["index"] == 0 and delta["delta"]["type"] == "input_json_delta"
    assert json.loads(delta["delta"]["partial_json"]) == use.input
    assert events[5][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}


async def test_a_tool_result_and_thinking_go_through_the_template(tool_api: Api) -> None:
    """The call and its result go back to the model as mlx-lm's template renders the same
    chat in OpenAI's shape; thinking on and off reaches the template."""
    messages: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Ask the tool.", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]
    openai_chat: list[dict[str, Any]] = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
            "reasoning_content": "Ask the tool.",
        },
        {"role": "tool", "content": "Sunny, 21 C", "tool_call_id": "toolu_1"},
        {"role": "user", "content": "And tomorrow?"},
    ]
    n_prompt = len(template_ids(openai_chat, tools=template_tools()))
    kw: dict[str, Any] = dict(model="m", messages=messages, tools=TOOLS)
    r = await tool_api.client.messages.create(**kw, max_tokens=8)
    assert r.stop_reason in ("end_turn", "max_tokens") and prompt_of(r.usage) == n_prompt
    assert (await tool_api.client.messages.count_tokens(**kw)).input_tokens == n_prompt
    # The result as text blocks, marked an error: the same prompt (its text says what failed).
    result = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": "Sunny, "}, {"type": "text", "text": "21 C"}],
        "is_error": True,
    }
    kw["messages"] = [
        *messages[:2],
        {"role": "user", "content": [result, messages[2]["content"][1]]},
    ]
    assert (await tool_api.client.messages.count_tokens(**kw)).input_tokens == n_prompt
    # Thinking off: the template writes an empty think block after the generation prompt.
    plain = template_ids(ASK, enable_thinking=True)
    empty = template_ids(ASK, enable_thinking=False)
    assert len(empty) > len(plain)
    off: dict[str, Any] = dict(model="m", messages=ASK, thinking={"type": "disabled"})
    on: dict[str, Any] = {**off, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert (await tool_api.client.messages.count_tokens(**off)).input_tokens == len(empty)
    assert (await tool_api.client.messages.count_tokens(**on)).input_tokens == len(plain)
    r = await tool_api.client.messages.create(**off, max_tokens=2)
    assert prompt_of(r.usage) == len(empty)
    # max_tokens above the budget; a stop sequence (the greedy text's start) ends it early.
    stop = decode(TOOL_MODEL, reference(TOOL_MODEL, plain, 2))
    r = await tool_api.client.messages.create(**on, max_tokens=1025, stop_sequences=[stop])
    assert prompt_of(r.usage) == len(plain) and r.stop_reason == "stop_sequence"


def test_reasoning_text_and_calls_make_blocks_in_order() -> None:
    """Scripted pieces, as the engine side hands them over: each kind opens a block of its
    own, in order; the stream's events rebuild the same content."""
    calls = (
        ToolCall("call_ab12", "get_weather", '{"city": "Paris"}'),
        ToolCall("call_cd34", "get_time", "{}"),
    )
    pieces = [
        Piece("", (), reasoning="Let me "),
        Piece("", (), reasoning="think."),
        Piece("Checking", (), reasoning=" Done."),
        Piece(" now.", (), calls=calls[:1]),
        Piece("", (), "tool_calls", 9, calls=calls[1:]),
    ]
    blocks = Blocks()
    events = [e for p in pieces for e in blocks.feed(p)] + blocks.finish()
    assert blocks.content == [
        {"type": "thinking", "thinking": "Let me think. Done.", "signature": ""},
        {"type": "text", "text": "Checking now."},
        {"type": "tool_use", "id": "toolu_ab12", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_cd34", "name": "get_time", "input": {}},
    ]
    shape = [(e["type"], e.get("index"), e.get("delta", {}).get("type")) for e in events]
    assert shape == [
        ("content_block_start", 0, None),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, None),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, None),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("content_block_start", 3, None),
        ("content_block_delta", 3, "input_json_delta"),
        ("content_block_stop", 3, None),
    ]
    # The starts are empty blocks; the deltas fill them as a client's accumulator does.
    rebuilt: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_start":
            rebuilt.append(dict(e["content_block"]))
        elif e["type"] == "content_block_delta":
            d, b = e["delta"], rebuilt[e["index"]]
            if d["type"] == "input_json_delta":
                partial[e["index"]] = partial.get(e["index"], "") + d["partial_json"]
                b["input"] = json.loads(partial[e["index"]])
            else:
                key = {"thinking_delta": "thinking", "signature_delta": "signature"}
                field = key.get(d["type"], "text")
                b[field] += d[field]
    assert rebuilt == blocks.content
    # No content at all: one empty text block.
    empty = Blocks()
    assert empty.feed(Piece("", (), "stop", 1)) == []
    assert [e["type"] for e in empty.finish()] == ["content_block_start", "content_block_stop"]
    assert empty.content == [{"type": "text", "text": ""}]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)
KEYS = [
    "model",
    "messages",
    "system",
    "max_tokens",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "metadata",
]
TOOL = st.fixed_dictionaries(
    {}, optional={"type": JSON, "name": st.sampled_from(["f", "g h"]) | JSON, "input_schema": JSON}
)
AGENT = st.fixed_dictionaries(
    {},
    optional={
        "tools": st.lists(TOOL, max_size=2) | JSON,
        "tool_choice": st.fixed_dictionaries(
            {"type": st.sampled_from(["auto", "any", "tool", "none", 1])},
            optional={"name": JSON, "disable_parallel_tool_use": JSON},
        )
        | JSON,
        "thinking": st.fixed_dictionaries(
            {"type": st.sampled_from(["enabled", "disabled", "adaptive", 1])},
            optional={"budget_tokens": st.integers(0, 3000) | JSON},
        )
        | JSON,
    },
)
KINDS = ["text", "tool_use", "tool_result", "thinking", "redacted_thinking", "image", 3]
BLOCK = (
    st.fixed_dictionaries(
        {"type": st.sampled_from(KINDS)},
        optional={
            "text": JSON,
            "id": JSON,
            "name": JSON,
            "input": JSON,
            "tool_use_id": JSON,
            "content": st.lists(st.fixed_dictionaries({"type": st.sampled_from(KINDS)})) | JSON,
            "is_error": JSON,
            "thinking": JSON,
        },
    )
    | JSON
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": st.lists(BLOCK) | JSON}
)


@settings(max_examples=400, deadline=None)
@given(
    body=st.dictionaries(st.sampled_from(KEYS), JSON, max_size=6),
    agent=AGENT,
    messages=st.lists(MESSAGE, max_size=3) | JSON,
    count=st.booleans(),
)
def test_no_request_body_breaks_the_parser(
    body: dict[str, Any], agent: dict[str, Any], messages: Any, count: bool
) -> None:
    """Whatever the body, parsing gives a request or a 400 (never another exception: a 500)."""
    try:
        req = parse_request({**body, **agent, "messages": messages}, 1000, count=count)
    except ApiError as e:
        assert e.status == 400 and e.message
    else:
        assert req.kind == "chat" and req.messages and req.messages[-1].role in ("user", "tool")
