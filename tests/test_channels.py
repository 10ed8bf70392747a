"""The channel splitter for `<think>` / `<tool_call>` families, fed scripted completions: the
tiny Qwen3-format tokenizer (make-model --chat qwen3) decodes them token by token, as the
engine's tokens arrive, and in every other chunking; the answer, the reasoning and the calls
come out the same, markers never reach a channel, and nothing the model wrote is lost."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncGenerator

import pytest

from mlxring.engine.channels import TaggedSplitter, prompt_thinks, split_pieces, splitter
from mlxring.engine.lifecycle import GeneratedToken
from mlxring.engine.text import Split, assembler, pieces

from .ringutil import loaded, tiny_model

MODEL = tiny_model("qwen3", chat="qwen3")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARIS = ("get_weather", '{"city": "Paris"}')
BAD = "<tool_call>\nnot json\n</tool_call> ok"

# (completion text, starts thinking, tools offered) -> (answer, reasoning, calls as (name, args))
CASES = [
    (("<think>\nplan it\n</think>\n\nHi", False, True), ("\n\nHi", "\nplan it\n", [])),
    (("plan first</think>The answer", True, True), ("The answer", "plan first", [])),
    (("Let me check." + CALL, False, True), ("Let me check.", "", [PARIS])),
    # Two calls: the whitespace between and after them is no answer.
    ((CALL + "\n" + CALL + "\n", False, True), ("", "", [PARIS] * 2)),
    # A call the parser cannot read is shown as written, markers and all.
    ((BAD, False, True), (BAD, "", [])),
    # A call cut short by max_tokens: as written, without the end marker it never wrote.
    (('<tool_call>\n{"name": "get_wea', False, True), ('<tool_call>\n{"name": "get_wea', "", [])),
    # Tools not offered: a call the model writes anyway is answer text.
    ((CALL, False, False), (CALL, "", [])),
    (("just text, no markers", False, True), ("just text, no markers", "", [])),
]  # fmt: skip


def run(text: str, thinking: bool, tools: bool, cuts: list[int]) -> Split:
    _, tok = loaded(MODEL)
    s = TaggedSplitter(tok, TOOLS if tools else None, thinking)
    out = Split()
    for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
        out += s.feed(text[a:b])
    return out + s.end()


def as_tuple(s: Split) -> tuple[str, str, list[tuple[str, str]]]:
    return s.content, s.reasoning, [(c.name, c.arguments) for c in s.calls]


@pytest.mark.parametrize(("given", "want"), CASES)
def test_every_chunking_gives_the_same_channels(
    given: tuple[str, bool, bool], want: tuple[str, str, list[tuple[str, str]]]
) -> None:
    text, thinking, tools = given
    rng = random.Random(7)
    chunkings = [[], list(range(1, len(text)))]
    chunkings += [sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1))) for _ in range(8)]
    for cuts in chunkings:
        assert as_tuple(run(text, thinking, tools, cuts)) == want, cuts


async def test_the_engines_tokens_through_the_splitter_finish_with_tool_calls() -> None:
    """The engine's token stream (scripted: the ids of a reasoning, a preamble and a call, then
    EOS) through the same text path as a request: pieces, then channels."""
    _, tok = loaded(MODEL)
    prompt = list(tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=TOOLS))
    assert not prompt_thinks(tok, prompt)
    script = list(tok.encode("<think>\nweather?\n</think>\n\nChecking." + CALL))
    eos = next(iter(tok.eos_token_ids))

    async def engine() -> AsyncGenerator[GeneratedToken, None]:
        for t in script:
            yield GeneratedToken(t, 0.0, (), None)
        yield GeneratedToken(eos, 0.0, (), "stop")

    channels = splitter(tok, TOOLS, prompt)
    assert channels is not None
    got = [
        p
        async for p in split_pieces(
            pieces(engine(), assembler(tok, prompt, ()), lambda: None), channels
        )
    ]
    assert "".join(p.reasoning for p in got) == "\nweather?\n"
    assert "".join(p.text for p in got) == "\n\nChecking."
    calls = [c for p in got for c in p.calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert got[-1].finish_reason == "tool_calls"
    assert sum(len(p.tokens) for p in got) == len(script)  # every token's logprob still travels
    # A template that opens the think block leaves the completion in reasoning.
    assert prompt_thinks(tok, [*prompt, *tok.encode("<think>\n")])
