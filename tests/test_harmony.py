"""engine.harmony: gpt-oss's harmony text split into answer, reasoning and tool calls, the same
in every chunking, and the tokenizers that write it told apart."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import AsyncGenerator, Iterator

import pytest
from mlx_lm.tokenizer_utils import TokenizerWrapper
from tokenizers import AddedToken, Tokenizer
from transformers import PreTrainedTokenizerFast

from mlxring.engine.channels import split_pieces
from mlxring.engine.harmony import MARKERS, HarmonySplitter, is_harmony
from mlxring.engine.text import IncrementalDecoder, Piece, Split
from mlxring.model.make import tokenizer_json

HARMONY_TOKENS = [*MARKERS, "<|endoftext|>"]


@functools.cache
def tokenizer(harmony: bool) -> TokenizerWrapper:
    """The bundled byte-level BPE, with gpt-oss's special tokens when `harmony`."""
    raw = Tokenizer.from_str(tokenizer_json(512))
    if harmony:
        raw.add_special_tokens([AddedToken(t, special=True) for t in HARMONY_TOKENS])
    return TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_is_harmony() -> None:
    assert is_harmony(tokenizer(harmony=True))
    assert not is_harmony(tokenizer(harmony=False))


Outcome = tuple[str, str, tuple[tuple[str, str], ...]]  # content, reasoning, (name, args)

WEATHER = '{"location": "Tokyo"}'
CASES: dict[str, tuple[str, Outcome]] = {
    "reasoning_then_final": (
        "<|channel|>analysis<|message|>I should add 2 and 2.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>The answer is 4.<|return|>",
        ("The answer is 4.", "I should add 2 and 2.", ()),
    ),
    "call_constrained": (
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        f" {WEATHER}\n<|call|>",
        ("", "Need the weather.", (("get_weather", WEATHER),)),
    ),
    "recipient_before_channel": (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        + WEATHER,
        ("", "", (("get_weather", WEATHER),)),
    ),
    "recipient_first_in_first_header": (
        f" to=functions.get_weather<|channel|>commentary json<|message|>{WEATHER}<|call|>",
        ("", "", (("get_weather", WEATHER),)),
    ),
    "two_calls": (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        f"{WEATHER}<|end|><|start|>assistant to=functions.get_time<|channel|>commentary"
        ' <|constrain|>json<|message|>{"zone": "JST"}<|call|>',
        ("", "", (("get_weather", WEATHER), ("get_time", '{"zone": "JST"}'))),
    ),
    "preamble_then_call": (
        "<|channel|>analysis<|message|>Tell them first.<|end|><|start|>assistant"
        "<|channel|>commentary<|message|>Let me check <the> weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather"
        f" <|constrain|>json<|message|>{WEATHER}<|call|>",
        ("Let me check <the> weather.", "Tell them first.", (("get_weather", WEATHER),)),
    ),
    "builtin_tool_as_content": (
        '<|channel|>analysis to=browser.search code<|message|>{"query": "tokyo"}<|call|>',
        ('{"query": "tokyo"}', "", ()),
    ),
    "plain_text": (
        "Hello <| world |> a<b || 4 <|end",
        ("Hello <| world |> a<b || 4 <|end", "", ()),
    ),
    "ends_mid_header": (
        "<|channel|>analysis<|message|>Thinking <|here|>.<|end|><|start|>assistant<|chan",
        ("<|start|>assistant<|chan", "Thinking <|here|>.", ()),
    ),
    "ends_mid_call": (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location": "Tok',
        ("", "", (("get_weather", '{"location": "Tok'),)),
    ),
    "empty_call": (
        "<|channel|>commentary to=functions.now <|constrain|>json<|message|><|call|>",
        ("", "", (("now", "{}"),)),
    ),
}


def split(chunks: list[str]) -> tuple[Outcome, list[Split]]:
    splitter = HarmonySplitter()
    parts = [splitter.feed(c) for c in chunks] + [splitter.end()]
    total = sum(parts, Split())
    calls = tuple((c.name, c.arguments) for c in total.calls)
    return (total.content, total.reasoning, calls), parts


def chunkings(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    rng = random.Random(1234)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    yield by_tokens(text)


def by_tokens(text: str) -> list[str]:
    """The text as the server hands it out: decoded token by token."""
    tok = tokenizer(harmony=True)
    decoder = IncrementalDecoder(lambda ids: str(tok.decode(ids)), [])
    chunks = [decoder.add(t) for t in tok.encode(text, add_special_tokens=False)]
    chunks.append(decoder.flush())
    assert "".join(chunks) == text
    return chunks


@pytest.mark.parametrize("name", CASES)
def test_every_chunking_splits_alike(name: str) -> None:
    text, expected = CASES[name]
    for chunks in chunkings(text):
        got, parts = split(chunks)
        assert got == expected, chunks
        assert all(len(p.calls) == len({c.id for c in p.calls}) for p in parts)


def test_streams_and_holds_back_only_marker_prefixes() -> None:
    splitter = HarmonySplitter()
    assert splitter.feed("<|channel|>analysis<|message|>Let me") == Split(reasoning="Let me")
    assert splitter.feed(" think<|e") == Split(reasoning=" think")
    assert splitter.feed("xtra") == Split(reasoning="<|extra")
    assert splitter.feed("<|end|><|start|>assistant<|channel|>final<|message|>4") == Split("4")
    assert splitter.feed(" <|ret") == Split(" ")
    assert splitter.end() == Split("<|ret")


def test_a_call_is_given_when_its_body_ends() -> None:
    splitter = HarmonySplitter()
    head = "<|channel|>commentary to=functions.f <|constrain|>json<|message|>"
    assert splitter.feed(head + '{"a": 1}') == Split()
    s = splitter.feed("<|end|><|start|>assistant<|channel|>final<|message|>done")
    assert [(c.name, json.loads(c.arguments)) for c in s.calls] == [("f", {"a": 1})]
    assert s.calls[0].id.startswith("call_")
    assert (s.content, s.reasoning) == ("done", "")
    assert splitter.end() == Split()


async def pieces(texts: list[str]) -> AsyncGenerator[Piece, None]:
    for i, t in enumerate(texts):
        yield Piece(t, (), "stop" if i == len(texts) - 1 else None)


async def run(texts: list[str]) -> list[Piece]:
    return [p async for p in split_pieces(pieces(texts), HarmonySplitter())]


async def test_split_pieces_finishes_with_tool_calls_after_a_call() -> None:
    text, _ = CASES["call_constrained"]
    out = await run([text[:40], text[40:90], text[90:]])
    assert "".join(p.reasoning for p in out) == "Need the weather."
    assert [(c.name, c.arguments) for p in out for c in p.calls] == [("get_weather", WEATHER)]
    assert "".join(p.text for p in out) == ""
    assert [p.finish_reason for p in out] == [None, None, "tool_calls"]


async def test_split_pieces_keeps_stop_without_a_call() -> None:
    text, _ = CASES["reasoning_then_final"]
    out = await run(list(text))
    assert "".join(p.text for p in out) == "The answer is 4."
    assert out[-1].finish_reason == "stop"
    assert not any(p.calls for p in out)
