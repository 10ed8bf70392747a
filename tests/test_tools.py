"""Tool calls and reasoning on the OpenAI chat API, through a real ring with the official client.

The model is the tiny random Qwen3 with Qwen3's own chat template and marker tokens (make-model
`--chat qwen3`), so mlx-lm finds thinking and its json_tools parser in it as in a real Qwen3.
Random weights never choose to call a tool, so the calls here are required ones, which the
server enforces while sampling (the output is a grammar of valid calls); the answer after a
tool result, and the reasoning (steered into `<think>...</think>` with logit_bias), are checked
against mlx-lm's own generation of the same prompt, split by the test's own reading of Qwen's
markers."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import mlx.core as mx
import openai
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

from .ringutil import OpenAIRing, decode, loaded, openai_ring, tiny_model

MODEL = tiny_model("qwen3", chat="qwen3")
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[OpenAIRing]:
    async with openai_ring(tmp_path, MODEL, 2) as ring:
        yield ring


def oracle(
    messages: list[dict[str, Any]],
    n: int,
    tools: list[Any] | None = None,
    bias: dict[int, float] | None = None,
    **template: Any,
) -> tuple[list[int], str]:
    """mlx-lm on the whole model: the prompt its tokenizer makes of `messages`, and the greedy
    completion's text (logit bias applied by mlx-lm's own processor)."""
    m, tok = loaded(MODEL)
    ids = list(
        tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, **template)
    )
    procs = make_logits_processors(logit_bias=bias) if bias else None
    out: list[int] = []
    for t, _ in generate_step(mx.array(ids), m, max_tokens=n, logits_processors=procs):
        if int(t) in tok.eos_token_ids:
            break
        out.append(int(t))
    return ids, decode(MODEL, out)


def qwen_split(text: str) -> tuple[str, str]:
    """Answer and reasoning of a Qwen completion, as the test reads them: the text inside
    `<think>...</think>` is reasoning (an unclosed one runs to the end), the rest the answer."""
    answer: list[str] = []
    reasoning: list[str] = []
    for m in re.finditer(r"<think>(.*?)(?:</think>|$)|((?:(?!<think>).)+)", text, re.S):
        (reasoning if m[1] is not None else answer).append(m[1] if m[1] is not None else m[2])
    return "".join(answer), "".join(reasoning)


async def test_a_tool_call_round_trip_with_the_openai_client(api: OpenAIRing) -> None:
    """A required call (named), non-streamed and streamed through the client's own stream
    assembly, then the tool's result in the history and the model's answer to it."""
    kw: Any = dict(model="any", messages=ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=60)
    r = await api.client.chat.completions.create(tool_choice=NAMED, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    _, tok = loaded(MODEL)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(oracle(ASK, 0, TOOLS)[0])

    async with api.client.chat.completions.stream(tool_choice=NAMED, **kw) as s:
        kinds = [e.type async for e in s]
        final = await s.get_final_completion()
    assert "tool_calls.function.arguments.done" in kinds
    (streamed,) = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (
        "get_weather",
        call.function.arguments,
    )

    # "required" with several functions: a call of one of them.
    r = await api.client.chat.completions.create(tool_choice="required", **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    assert r.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")

    result: Any = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        result,
    ]
    r = await api.client.chat.completions.create(
        model="any",
        messages=history,
        tools=TOOLS,
        max_tokens=24,
    )
    # The history as mlx-lm's server gives it to the template: content a string, the call's
    # arguments an object.
    made = {"name": "get_weather", "arguments": json.loads(call.function.arguments)}
    given = [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"function": made}]}]
    ids, text = oracle([*given, result], 24, TOOLS)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    answer, reasoning = qwen_split(text)
    message = r.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None) or "") == (
        answer,
        reasoning,
    )


async def test_reasoning_is_split_from_the_answer_streamed_and_not(api: OpenAIRing) -> None:
    """Logit bias steers the random model into `<think>...</think>` mid-answer: the reasoning
    comes under reasoning_content and reasoning, never in content, in a body and in deltas."""
    _, tok = loaded(MODEL)
    vocab = tok.get_vocab()
    bias = {vocab["<think>"]: 8.0, vocab["</think>"]: 6.0}
    ask: list[Any] = [{"role": "user", "content": "Think first, then answer: what is a ring?"}]
    _, text = oracle(ask, 40, bias=bias)
    answer, reasoning = qwen_split(text)
    assert answer and reasoning, text  # the steering still leads into and out of a think block
    body: Any = dict(
        model="any",
        messages=ask,
        max_tokens=40,
        logit_bias={str(k): v for k, v in bias.items()},
    )
    r = await api.client.chat.completions.create(**body)
    m = r.model_dump()["choices"][0]["message"]
    assert (m["content"], m["reasoning_content"], m["reasoning"]) == (answer, reasoning, reasoning)

    stream = await api.client.chat.completions.create(stream=True, **body)
    got = {"content": "", "reasoning_content": "", "reasoning": ""}
    async for chunk in stream:
        delta = chunk.model_dump()["choices"][0]["delta"]
        for key in got:
            got[key] += delta.get(key) or ""
    assert got == {"content": answer, "reasoning_content": reasoning, "reasoning": reasoning}


async def test_chat_template_kwargs_reach_the_template(api: OpenAIRing) -> None:
    """`enable_thinking: false` makes Qwen3's template close an empty think block in the prompt
    (mlx-lm's server takes the same field); a key the server sets is a 400."""
    ids, text = oracle(ASK, 12, enable_thinking=False)
    r = await api.client.chat.completions.create(
        model="any",
        messages=ASK,
        max_tokens=12,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    assert len(ids) > len(oracle(ASK, 0)[0])
    message = r.model_dump()["choices"][0]["message"]
    assert (message["content"], message.get("reasoning_content") or "") == qwen_split(text)
    with pytest.raises(openai.BadRequestError) as e:
        await api.client.chat.completions.create(
            model="any",
            messages=ASK,
            max_tokens=2,
            extra_body={"chat_template_kwargs": {"messages": []}},
        )
    assert isinstance(e.value.body, dict) and e.value.body["param"] == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError) as e:  # arguments that are not a JSON object
        await api.client.chat.completions.create(
            model="any",
            messages=[
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": "[1]"},
                        }
                    ],
                },
            ],
            max_tokens=2,
        )
    assert isinstance(e.value.body, dict)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"
