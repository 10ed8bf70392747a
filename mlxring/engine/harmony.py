"""gpt-oss's harmony format split into the answer, the reasoning and the tool calls.

gpt-oss writes its turn as messages, each a header and a body:
`<|channel|>analysis<|message|>...<|end|>` then `<|start|>assistant<|channel|>final<|message|>...`.
The header names the channel (`analysis`, `commentary`, `final`) and, for a tool call, the
recipient (`to=functions.NAME`, before or after the channel, with `<|constrain|>json` perhaps);
the body runs to `<|end|>`, or to the EOS tokens `<|call|>` / `<|return|>`. Analysis bodies are
reasoning; final bodies and commentary without a recipient (a preamble the user sees) are the
answer; a body addressed to `functions.NAME` is one tool call, given when its body ends; a body
for a built-in tool (`browser.*`, `python`) is shown as answer text. Header text reaches no
channel, except when the completion ends inside a header: then it is answer text, as written,
so that a model writing plain text with no markup loses nothing.

`HarmonySplitter` is a `Splitter` (engine.channels): fed the text in any chunking, it holds back
a tail that could begin a marker and decides it when more text comes or at `end()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxring.engine.text import Split, ToolCall, call_id

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CONSTRAIN, RETURN, CALL = "<|constrain|>", "<|return|>", "<|call|>"
MARKERS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
BODY_ENDS = (END, RETURN, CALL)  # a body's end; a header starts after it
HEADER_STARTS = (START, CHANNEL)  # in a body, a header that follows one not ended
FUNCTIONS = "functions."


def is_harmony(tok: TokenizerWrapper) -> bool:
    """Whether the tokenizer writes harmony (gpt-oss): its vocabulary holds the markers."""
    vocab = tok.get_vocab()
    return all(m in vocab for m in (CHANNEL, MESSAGE, START, END))


@dataclass(frozen=True)
class Route:
    """Where a message's body goes: "reasoning", "content" or "call" (to `name`)."""

    to: str
    name: str = ""


def route(header: str) -> Route:
    """A message's route from its header's text (markers included)."""
    before, _, after = header.partition(CHANNEL)
    # `<|constrain|>json` and `<|start|>` only separate words here.
    words = (before + " " + after).replace(CONSTRAIN, " ").replace(START, " ").split()
    recipient = next((w[3:] for w in words if w.startswith("to=")), "")
    channel = next(iter(after.replace(CONSTRAIN, " ").split()), "")
    if recipient.startswith(FUNCTIONS):
        return Route("call", recipient[len(FUNCTIONS) :])
    if channel == "analysis" and not recipient:
        return Route("reasoning")
    return Route("content")  # final, a preamble, a built-in tool's input


class HarmonySplitter:
    """Channels of a harmony completion (the prompt ends in `<|start|>assistant`)."""

    def __init__(self) -> None:
        self._pending = ""  # text not yet decided: a tail that could begin a marker
        self._header: str | None = ""  # the header being written; None inside a body
        self._route = Route("content")
        self._call = ""  # the body of the call being written

    def feed(self, text: str) -> Split:
        self._pending += text
        out = Split()
        while self._pending:
            at = self._pending.find("<")
            if at < 0:
                out += self._text(self._pending)
                self._pending = ""
                break
            out += self._text(self._pending[:at])
            rest = self._pending[at:]
            marker = next((m for m in MARKERS if rest.startswith(m)), None)
            if marker is not None:
                self._pending = rest[len(marker) :]
                out += self._marker(marker)
            elif any(m.startswith(rest) for m in MARKERS):
                self._pending = rest  # wait for the text that decides it
                break
            else:
                out += self._text("<")
                self._pending = rest[1:]
        return out

    def end(self) -> Split:
        rest, self._pending = self._pending, ""
        out = self._text(rest)
        if self._header is not None:
            out += Split(content=self._header)  # cut inside a header, or no markup at all
            self._header = ""
        elif self._route.to == "call":
            out += self._close()
        return out

    def _text(self, text: str) -> Split:
        if not text:
            return Split()
        if self._header is not None:
            self._header += text
            return Split()
        if self._route.to == "call":
            self._call += text
            return Split()
        if self._route.to == "reasoning":
            return Split(reasoning=text)
        return Split(content=text)

    def _marker(self, marker: str) -> Split:
        if self._header is not None:  # a header's markers are part of its text
            if marker != MESSAGE:
                self._header += marker
                return Split()
            self._route = route(self._header)
            self._header = None
            return Split()
        if marker in BODY_ENDS or marker in HEADER_STARTS:
            out = self._close() if self._route.to == "call" else Split()
            self._header = marker if marker in HEADER_STARTS else ""
            self._route = Route("content")
            return out
        return self._text(marker)  # `<|message|>` or `<|constrain|>` inside a body

    def _close(self) -> Split:
        body, name = self._call.strip(), self._route.name
        self._call, self._route = "", Route("content")
        return Split(calls=(ToolCall(call_id(), name, body or "{}"),))
