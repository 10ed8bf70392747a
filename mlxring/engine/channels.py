"""A chat completion's text split into its channels: the answer, the reasoning, the tool calls.

A thinking model writes `<think>...</think>` before its answer and a tool-calling model writes
its calls in its family's markup (`<tool_call>{...}</tool_call>` for Qwen and Hermes, XML for
Qwen3-Coder, ...). Clients want these apart: reasoning under `reasoning_content`, calls as
`tool_calls` with ids, and only the answer as `content`. A `Splitter` takes the completion's
text as it arrives and hands out each channel's new part (`Split`); `split_pieces` runs one over
a request's Pieces.

`TaggedSplitter` is mlx-lm's own machinery: the tokenizer's think and tool-call markers
(`TokenizerWrapper.has_thinking`, `tool_call_start`, ...) drive mlx-lm's `TextStateMachine`,
which strips the markers and holds back a tail that could begin one, and mlx-lm's tool parser
for the family turns each call's text into a name and arguments. gpt-oss's harmony format has
a splitter of its own (`engine.harmony`). A call whose text the parser cannot read is given to
the client as content, not dropped.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import replace
from typing import Any

import structlog
from mlx_lm.generate import TextStateMachine, make_text_state_machine
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxring.engine.harmony import HarmonySplitter, is_harmony
from mlxring.engine.text import Piece, Split, Splitter, ToolCall, call_id

log = structlog.get_logger()


ParseCall = Callable[[str, Any], Any]


def parsed_calls(
    parse: ParseCall, text: str, tools: Sequence[dict[str, Any]] | None
) -> tuple[ToolCall, ...] | None:
    """A call's text as ToolCalls by mlx-lm's `parse` for the family, or None when it cannot
    be read (a call cut by max_tokens, or a model that wrote nonsense between the markers)."""
    try:
        out = parse(text, tools)
    except Exception as e:  # noqa: BLE001 - each family's parser raises its own errors
        log.info("tool_call_unreadable", error=f"{type(e).__name__}: {e}", text=text[:200])
        return None
    calls = []
    for c in out if isinstance(out, list) else [out]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            log.info("tool_call_unreadable", error="no name", text=text[:200])
            return None
        args = c.get("arguments", {})
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        calls.append(ToolCall(str(c.get("id") or call_id()), c["name"], args))
    return tuple(calls)


class TaggedSplitter:
    """Channels marked by the tokenizer's think and tool-call strings (mlx-lm's state machine
    and tool parser for the family)."""

    def __init__(
        self,
        tok: TokenizerWrapper,
        tools: Sequence[dict[str, Any]] | None,
        reasoning: bool,
    ) -> None:
        """`tools`: the functions offered (None: none, and a call the model writes anyway is
        content); `reasoning`: the completion starts inside a think block."""
        self._machine = make_text_state_machine(tok)
        self._state = self._machine.make_state("reasoning" if reasoning else "normal")
        self._parse: ParseCall | None = tok.tool_parser
        self._start = tok.tool_call_start or ""
        self._finish = tok.tool_call_end or ""
        self._tools = list(tools) if tools else None
        self._call = ""  # the text of the call being written
        self._in_call = False
        # Answer text that is only whitespace waits: between and around calls it is dropped
        # (a message of calls has no content), before more answer it is the answer's.
        self._space = ""
        self._called = False

    def feed(self, text: str) -> Split:
        self._state, segments = TextStateMachine.split(self._state, text)
        return self._take(segments)

    def end(self) -> Split:
        self._state, rest, where = TextStateMachine.flush(self._state)
        out = self._take([(where, rest)])
        if self._in_call:  # a call with no end marker (or one cut short)
            out += self._close(ended=False)
        if self._space and not self._called:
            out += Split(content=self._space)
        self._space = ""
        return out

    def _take(self, segments: list[tuple[str | None, str]]) -> Split:
        out = Split()
        for where, text in segments:
            if where == "tool":
                self._in_call = True
                self._call += text
                continue
            if self._in_call:
                out += self._close()
            if where == "reasoning":
                out += Split(reasoning=text)
            elif text.isspace():
                self._space += text
            elif text:
                out += Split(content=self._space + text)
                self._space = ""
        # The last segment is the current state: a call still being written stays open.
        return out

    def _close(self, ended: bool = True) -> Split:
        """The call written so far, as calls; `ended`: its end marker was seen."""
        text, self._call, self._in_call = self._call, "", False
        calls = None
        if self._parse is not None and self._tools is not None:
            calls = parsed_calls(self._parse, text, self._tools)
        if calls is None:  # shown as written, markers included, rather than lost
            shown = self._space + self._start + text + (self._finish if ended else "")
            self._space = ""
            return Split(content=shown)
        self._space, self._called = "", True
        return Split(calls=calls)


def splitter(
    tok: TokenizerWrapper, tools: Sequence[dict[str, Any]] | None, prompt: Sequence[int]
) -> Splitter | None:
    """The splitter for a chat completion of `prompt` (None: the text is all answer)."""
    if is_harmony(tok):
        return HarmonySplitter()
    if tok.has_thinking or tok.has_tool_calling:
        return TaggedSplitter(tok, tools, prompt_thinks(tok, prompt))
    return None


def tools_refused(tok: TokenizerWrapper) -> str | None:
    """Why this model cannot be offered tools, or None when it can: its template must show
    them to the model and mlx-lm must know how to read the calls it writes (or it writes
    harmony, read by `engine.harmony`)."""
    if not tok.has_tool_calling and not is_harmony(tok):
        return "mlx-lm knows no tool-call format for this model's tokenizer"
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and "tools" not in template:
        return "the model's chat template does not show tools to the model"
    return None


def writes_json_calls(tok: TokenizerWrapper) -> bool:
    """Whether the family writes calls as JSON between `<tool_call>` markers (mlx-lm's
    json_tools format), the one a required call is enforced in (`api.tools.Tools.grammar`)."""
    parse = tok.tool_parser
    return (
        parse is not None
        and getattr(parse, "__module__", "") == "mlx_lm.tool_parsers.json_tools"
        and tok.tool_call_start == "<tool_call>"
        and tok.tool_call_end == "</tool_call>"
    )


def marker(tok: TokenizerWrapper, text: str) -> str:
    """`text` as llguidance's lark grammars match it: a token of its own is named `<...>` (a
    quoted string would not match it), other text is quoted."""
    if len(tok.encode(text, add_special_tokens=False)) == 1 and text[0] + text[-1] == "<>":
        return text
    return json.dumps(text)


def prompt_thinks(tok: TokenizerWrapper, prompt: Sequence[int]) -> bool:
    """Whether the prompt leaves the model inside a think block (templates that open it)."""
    if not tok.has_thinking:
        return False
    ids = list(prompt)
    return bool(tok.rfind_think_start(ids) > tok.rfind_think_end(ids))


async def split_pieces(
    pieces: AsyncGenerator[Piece, None], splitter: Splitter
) -> AsyncGenerator[Piece, None]:
    """`pieces` with their text split into channels; a completion that ended at its EOS after
    calling a tool finishes with "tool_calls", as OpenAI's do."""
    called = False
    async with contextlib.aclosing(pieces):
        async for p in pieces:
            s = splitter.feed(p.text)
            if p.finish_reason is not None:
                s += splitter.end()
            called = called or bool(s.calls)
            finish = p.finish_reason
            if finish == "stop" and called and p.stop is None:
                finish = "tool_calls"
            yield replace(
                p, text=s.content, reasoning=s.reasoning, calls=s.calls, finish_reason=finish
            )
