"""Structured output over HTTP through a real ring whose last shard is another process: every
answer to `response_format` json_schema parses and validates against its schema (random weights
sampled at temperature 1, so the grammar alone keeps them valid), batched with other schemas and
with plain requests (which stay exactly mlx-lm's); json_object gives an object; a schema
llguidance cannot compile is a 400 naming it; the real smollm2 model answers with valid JSON."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import openai
import pytest

from mlxring.api.structured import JSON_LAYOUT
from mlxring.engine.lifecycle import RingUnavailable
from mlxring.protocol.messages import SamplingParams
from mlxring.shard.grammar import MAX_GRAMMAR_CHARS

from .ringutil import (
    chat_ids,
    decode,
    local_ring,
    packaged_model,
    process_ring,
    reference,
    tiny_model,
    write_valid_config,
)

MODEL = tiny_model("qwen3")
ASK = [{"role": "user", "content": "Describe a node of the ring as JSON."}]

# Nested object, enum, array, required, integer bounds; strings and arrays bounded, so that a
# random model finishes the JSON well within its max_tokens.
NODE = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "role": {"enum": ["head", "middle", "tail"]},
        "layers": {"type": "integer", "minimum": 0, "maximum": 63},
        "link": {
            "type": "object",
            "properties": {
                "gbps": {"type": "integer", "minimum": 1, "maximum": 80},
                "kind": {"enum": ["thunderbolt", "ethernet"]},
            },
            "required": ["gbps", "kind"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "role", "layers", "link", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5},
        "ok": {"type": "boolean"},
    },
    "required": ["x", "ok"],
    "additionalProperties": False,
}


def schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 2-node ring, each node its own process: the head (n0) serves the API, n1 holds the last
    shard and with it the grammars."""
    tmp = tmp_path_factory.mktemp("ring")
    cfg = write_valid_config(tmp, MODEL, 2)
    with process_ring(cfg, ["n0", "n1"], tmp):
        from mlxring.config import load_config

        url = f"http://127.0.0.1:{load_config(cfg).api_port('n0')}"
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert time.monotonic() < deadline, "the ring did not come up in 60 s"
            time.sleep(0.2)
        yield url


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


async def test_fifty_schema_answers_all_validate_beside_plain_requests(base_url: str) -> None:
    """50 answers at temperature 1, ten at a time, two schemas mixed in one batch with greedy
    plain requests: every JSON answer validates; the plain ones are mlx-lm's exactly."""
    c = client(base_url)
    gate = asyncio.Semaphore(10)

    async def ask(i: int) -> tuple[dict[str, Any], str, str | None]:
        schema = NODE if i % 2 else POINT
        async with gate:
            r = await c.chat.completions.create(
                model=MODEL.name,
                messages=ASK,
                max_tokens=160,
                temperature=1.0,
                response_format=schema_format(f"s{i % 2}", schema),  # type: ignore[arg-type]
            )
        return schema, r.choices[0].message.content or "", r.choices[0].finish_reason

    async def plain() -> str:
        r = await c.chat.completions.create(
            model=MODEL.name, messages=ASK, max_tokens=24, temperature=0
        )
        return r.choices[0].message.content or ""

    try:
        answers, plains = await asyncio.gather(
            asyncio.gather(*(ask(i) for i in range(50))),
            asyncio.gather(*(plain() for _ in range(4))),
        )
    finally:
        await c.close()
    for schema, text, finish in answers:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert len({text for _, text, _ in answers}) > 10  # sampled, not one answer repeated
    want = decode(MODEL, reference(MODEL, chat_ids(MODEL, ASK), 24))
    assert plains == [want] * 4


async def test_json_object_and_streaming(base_url: str) -> None:
    """json_object answers an object; a streamed json_schema answer assembles to valid JSON."""
    c = client(base_url)
    try:
        r = await c.chat.completions.create(
            model=MODEL.name,
            messages=ASK,
            max_tokens=200,
            temperature=0,
            response_format={"type": "json_object"},
        )
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
        stream = await c.chat.completions.create(
            model=MODEL.name,
            messages=ASK,
            max_tokens=160,
            temperature=1.0,
            stream=True,
            response_format=schema_format("node", NODE),  # type: ignore[arg-type]
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        jsonschema.validate(json.loads(text), NODE)
        # Legacy completions take response_format too.
        done = await c.completions.create(
            model=MODEL.name,
            prompt="A point:",
            max_tokens=60,
            temperature=1.0,
            extra_body={"response_format": schema_format("point", POINT)},
        )
        jsonschema.validate(json.loads(done.choices[0].text), POINT)
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        (schema_format("bad", {"type": "foo"}), "response_format.json_schema.schema", "foo"),
        (
            schema_format("bad", {"type": "integer", "minimum": "zero"}),
            "response_format.json_schema.schema",
            "minimum",
        ),
        (
            schema_format("bad", {"type": "string", "pattern": "(("}),
            "response_format.json_schema.schema",
            "unclosed group",
        ),
        (schema_format("bad", {"$ref": "#/nowhere"}), "response_format.json_schema.schema", "/"),
        ({"type": "json_schema"}, "response_format.json_schema", "Missing"),
        ({"type": "xml"}, "response_format.type", "xml"),
        (schema_format("no spaces", POINT), "response_format.json_schema.name", "letters"),
    ],
)
async def test_invalid_schema_is_400_naming_it(
    base_url: str, response_format: dict[str, Any], param: str, words: str
) -> None:
    c = client(base_url)
    try:
        with pytest.raises(openai.BadRequestError) as e:
            await c.chat.completions.create(
                model=MODEL.name,
                messages=ASK,
                max_tokens=8,
                response_format=response_format,  # type: ignore[arg-type]
            )
    finally:
        await c.close()
    err = e.value.body
    assert isinstance(err, dict)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert words in err["message"]


async def test_a_grammar_that_cannot_run_fails_its_request_only(tmp_path: Path) -> None:
    """Straight to the engine, past the API's checks: a grammar llguidance refuses, or one past
    the shard's bound, fails its own request; a valid one and a plain one beside it finish."""
    prompt = chat_ids(MODEL, ASK)
    good = llguidance.LLMatcher.grammar_from_json_schema(POINT, defaults=JSON_LAYOUT)

    async with local_ring(write_valid_config(tmp_path, MODEL, 2)) as rt:
        engine = rt.engine
        assert engine is not None

        async def text(params: SamplingParams | None) -> str:
            assert engine is not None
            out = [g.token async for g in engine.generate(prompt, params, max_tokens=60)]
            return decode(MODEL, [t for t in out if t not in rt.tokenizer.eos_token_ids])  # type: ignore[union-attr]

        bad, huge, point, plain = await asyncio.gather(
            text(SamplingParams(grammar='{"grammars": 5}')),
            text(SamplingParams(grammar=" " * (MAX_GRAMMAR_CHARS + 1))),
            text(SamplingParams(temperature=1.0, grammar=good)),
            text(None),
            return_exceptions=True,
        )
    assert isinstance(bad, RingUnavailable) and "GrammarError" in str(bad)
    assert isinstance(huge, RingUnavailable) and "grammar" in str(huge)
    assert isinstance(point, str)
    jsonschema.validate(json.loads(point), POINT)
    assert plain == decode(MODEL, reference(MODEL, prompt, 60))


# In the slow set (10 s of the suite): the 50-request schema test runs the grammar path.
@pytest.mark.slow
def test_smollm2_answers_with_schema_valid_json(tmp_path: Path) -> None:
    """The real model, asked a question with a schema, answers valid JSON that ends by itself."""
    model = packaged_model("smollm2")
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "country": {"type": "string", "maxLength": 40},
            "population_millions": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }
    cfg = write_valid_config(tmp_path, model, 2)
    with process_ring(cfg, ["n0", "n1"], tmp_path):
        from mlxring.config import load_config

        url = f"http://127.0.0.1:{load_config(cfg).api_port('n0')}"
        deadline = time.monotonic() + 90
        while not _ready(url):
            assert time.monotonic() < deadline, "the ring did not come up in 90 s"
            time.sleep(0.2)
        sync = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=90)
        r = sync.chat.completions.create(
            model=sync.models.list().data[0].id,
            messages=[
                {"role": "user", "content": "What is the capital of France? Answer as JSON."}
            ],
            max_tokens=80,
            temperature=0,
            response_format=schema_format("capital", schema),  # type: ignore[arg-type]
        )
    text = r.choices[0].message.content or ""
    assert r.choices[0].finish_reason == "stop", text
    answer = json.loads(text)
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["city"]
