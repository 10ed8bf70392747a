"""OpenAI's Responses API: text, function tools and reasoning, read as chat and answered as items.

Through a real ring with the official client, on the tiny random Qwen3 with Qwen3's own chat
template and marker tokens (make-model `--chat qwen3`): random weights never choose to call a
tool, so the calls here are required ones (a named function), which the server enforces while
sampling. The answers are checked against mlx-lm's own greedy generation of the equivalent chat
prompt (`tests.test_tools.oracle`). Reasoning cannot be steered here (Responses has no
logit_bias), so its items and events are checked by feeding Pieces to `Items` and reading what it
writes with the official client's own types and stream state.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from mlxring.api.errors import ApiError
from mlxring.api.responses import Items, Shapes
from mlxring.api.responses_request import parse_responses
from mlxring.engine.text import Piece, ToolCall

from .ringutil import OpenAIRing, openai_ring, tiny_model
from .test_tools import CITY, oracle, qwen_split

MODEL = tiny_model("qwen3", chat="qwen3")
ASK = "What is the weather in Paris?"
# Responses' function tools are flat; the chat form the template gets is CHAT_TOOLS.
TOOLS: list[Any] = [
    {"type": "function", "name": "get_weather", "description": "Weather now", "parameters": CITY},
    {"type": "function", "name": "get_time", "parameters": {"type": "object"}},
]
CHAT_TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
NAMED: Any = {"type": "function", "name": "get_weather"}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[OpenAIRing]:
    async with openai_ring(tmp_path, MODEL, 2) as ring:
        yield ring


def without_ids(output: list[Any]) -> list[dict[str, Any]]:
    """Output items as JSON, less what differs between two requests (ids, call ids) and what
    the client's stream helper adds (`parsed_arguments`)."""
    drop = ("id", "call_id", "parsed_arguments")
    return [{k: v for k, v in i.model_dump().items() if k not in drop} for i in output]


async def test_text_streamed_and_not(api: OpenAIRing) -> None:
    """Text only: a message item, streamed as the client's helper assembles it, cut by the
    budget (status incomplete); instructions are the system message."""
    ask: list[Any] = [{"role": "user", "content": ASK}]
    ids, text = oracle(ask, 8)
    r = await api.client.responses.create(model="any", input=ASK, max_output_tokens=8)
    assert r.output_text == qwen_split(text)[0] and r.model == api.model
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.usage is not None and r.usage.input_tokens == len(ids)
    assert r.usage.output_tokens == 8
    assert [(i.type, i.model_dump()["status"]) for i in r.output] == [("message", "incomplete")]

    system: list[Any] = [{"role": "system", "content": "Be brief."}, *ask]
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": ASK}]}]
    async with api.client.responses.stream(
        model="any", instructions="Be brief.", input=items, max_output_tokens=8
    ) as stream:
        kinds, deltas = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == qwen_split(oracle(system, 8)[1])[0]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert final.status == "incomplete"


async def test_a_function_call_streamed_and_not_and_its_result(api: OpenAIRing) -> None:
    """A required call: a function_call item alone (no empty message), the same streamed
    through the client's helper and as raw events; then the call and its output as input
    items, read as the chat history mlx-lm's template makes of them."""
    kw: Any = dict(
        model="any",
        input=ASK,
        tools=TOOLS,
        tool_choice=NAMED,
        parallel_tool_calls=False,
        max_output_tokens=60,
    )
    r = await api.client.responses.create(**kw)
    assert r.status == "completed", r
    (call,) = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.call_id.startswith("call_") and (call.id or "").startswith("fc_")
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), CITY)
    assert r.tool_choice.model_dump() == NAMED
    assert [t.model_dump()["name"] for t in r.tools] == ["get_weather", "get_time"]
    assert r.usage is not None
    assert r.usage.input_tokens == len(oracle([{"role": "user", "content": ASK}], 0, CHAT_TOOLS)[0])

    async with api.client.responses.stream(**kw) as s:
        kinds = [e.type async for e in s]
        final = await s.get_final_response()
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert without_ids(final.output) == without_ids(r.output)

    events = [e async for e in await api.client.responses.create(stream=True, **kw)]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2]
    assert added.type == "response.output_item.added" and added.output_index == 0
    assert added.item.type == "function_call" and added.item.arguments == ""
    done = events[4]
    assert done.type == "response.function_call_arguments.done"
    assert done.item_id == added.item.id

    # The round trip: the call and its output given back as input items.
    history: Any = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": "{}"},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
    ]
    history[1]["arguments"] = call.arguments
    r = await api.client.responses.create(
        model="any", input=history, tools=TOOLS, max_output_tokens=24
    )
    made = {"name": "get_weather", "arguments": json.loads(call.arguments)}
    chat: list[dict[str, Any]] = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": "", "tool_calls": [{"function": made}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"},
    ]
    ids, text = oracle(chat, 24, CHAT_TOOLS)
    assert r.usage is not None and r.usage.input_tokens == len(ids)
    answer, reasoning = qwen_split(text)
    assert r.output[-1].type == "message" and r.output_text == answer
    thought = [i for i in r.output if i.type == "reasoning"]
    assert "".join(c.text for i in thought for c in i.content or []) == reasoning


async def test_what_is_not_served_is_a_400_naming_the_field(api: OpenAIRing) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": ASK, "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": ASK, "tools": [{"type": "function"}]}, "tools[0].name"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
        ({"input": ASK, "max_output_tokens": 0}, "max_output_tokens"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            await api.client.responses.create(model="any", **body)
        assert isinstance(e.value.body, dict) and e.value.body["param"] == param, body


def test_input_items_are_the_chat_history() -> None:
    """Consecutive function_call items join the assistant message before them; a reasoning
    item's text is the next assistant turn's reasoning; reasoning.effort reaches the template."""
    req = parse_responses(
        {
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": ASK},
                {
                    "type": "reasoning",
                    "id": "rs_1",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "Two cities."}],
                },
                {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                {"type": "function_call", "call_id": "a", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call", "call_id": "b", "name": "get_time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "a", "output": "Sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "b",
                    "output": [{"type": "input_text", "text": "Noon"}],
                },
            ],
            "tools": TOOLS,
            "tool_choice": "auto",
            "reasoning": {"effort": "low"},
        },
        1000,
    )
    got = [m.template_dict() for m in req.messages]
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "tool"]
    assistant = got[2]
    assert (assistant["content"], assistant["reasoning_content"]) == ("Checking.", "Two cities.")
    assert [(c["id"], c["function"]["name"]) for c in assistant["tool_calls"]] == [
        ("a", "get_weather"),
        ("b", "get_time"),
    ]
    assert (got[3]["tool_call_id"], got[3]["content"]) == ("a", "Sunny")
    assert (got[4]["tool_call_id"], got[4]["content"]) == ("b", "Noon")
    assert req.tools.template() == CHAT_TOOLS and req.tools.mode == "auto"
    assert req.template_kwargs == {"reasoning_effort": "low"}
    with pytest.raises(ApiError) as e:
        parse_responses({"input": ASK, "tool_choice": {"type": "function", "name": "x"}}, 1000)
    assert e.value.param == "tool_choice"


def unparsed(value: Any) -> Any:
    """JSON less the `parsed` and `parsed_arguments` keys the client's parse helpers add."""
    if isinstance(value, dict):
        return {k: unparsed(v) for k, v in value.items() if k not in ("parsed", "parsed_arguments")}
    if isinstance(value, list):
        return [unparsed(v) for v in value]
    return value


def feed(pieces: list[Piece], stream: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The body `Items` makes of `pieces`, and the events it streams, as JSON."""
    req = parse_responses({"input": ASK, "tools": TOOLS, "stream": stream}, 1000)
    shapes = Shapes("m", req, "r")
    items = Items(shapes)
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": shapes.response(None, None, None)}
    ]
    for p in pieces:
        events += [{"type": k, **f} for k, f in items.piece(p)]
    events += [{"type": k, **f} for k, f in items.end(pieces[-1].finish_reason)]
    body = shapes.response(items.output, pieces[-1].finish_reason, None)
    events.append({"type": "response.completed", "response": body})
    for i, e in enumerate(events):
        e["sequence_number"] = i
    return body, events


def test_reasoning_text_and_calls_are_items_in_order() -> None:
    """Reasoning, then text, then two calls: four items, as the official client's types read
    them, and a stream its helper assembles into the same response."""
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    pieces = [
        Piece("", (), reasoning="Paris, "),
        Piece("", (), reasoning="so weather."),
        Piece("Let me check.", ()),
        Piece("", (), calls=(call, ToolCall("call_2", "get_time", "{}"))),
        Piece("", (), "tool_calls", 9),
    ]
    body, events = feed(pieces, True)
    r = Response.model_validate(body)
    assert [i.type for i in r.output] == ["reasoning", "message", "function_call", "function_call"]
    reasoning, message, first, _ = r.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [c.model_dump() for c in reasoning.content or []] == [
        {"type": "reasoning_text", "text": "Paris, so weather."}
    ]
    assert r.output_text == "Let me check." and message.id != reasoning.id
    assert first.type == "function_call"
    assert (first.call_id, first.name, first.arguments) == ("call_1", "get_weather", call.arguments)

    state: ResponseStreamState[Any] = ResponseStreamState(
        input_tools=TOOLS, text_format=openai.omit
    )
    kinds = []
    for e in events:
        event = EVENTS.validate_python(e)
        kinds.append(event.type)
        state.handle_event(event)
    assert kinds[:8] == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    indexes = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert indexes == [0, 1, 2, 3]
    # The helper's final response (what `get_final_response` gives), less its parsed extras.
    final = state._completed_response
    assert final is not None and unparsed(final.model_dump()) == unparsed(r.model_dump())
    # The same body without streaming, but for when it was made (a second may have turned).
    assert {**feed(pieces, False)[0], "created_at": body["created_at"]} == body


def test_only_reasoning_gets_an_empty_message_and_a_cut_one_is_incomplete() -> None:
    body, _ = feed([Piece("", (), "length", 5, reasoning="Hmm")], False)
    r = Response.model_validate(body)
    assert [(i.type, i.model_dump()["status"]) for i in r.output] == [
        ("reasoning", "incomplete"),
        ("message", "incomplete"),
    ]
    assert r.status == "incomplete" and r.output_text == ""
    body, _ = feed([Piece("Hi", ()), Piece("", (), "stop", 2)], False)
    r = Response.model_validate(body)
    assert [(i.type, i.model_dump()["status"]) for i in r.output] == [("message", "completed")]
