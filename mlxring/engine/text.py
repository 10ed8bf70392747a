"""Generated tokens to completion text: incremental detokenizing, stop strings, token bytes.

The engine yields token ids; a client wants text. `IncrementalDecoder` turns ids into text as
they arrive (equal to decoding them all at once), `TextAssembler` cuts the text at the first stop
string and holds back a tail that could begin one, and `pieces` drives both over the engine's
token stream, yielding `Piece`s ready to send. `TokenTexts` gives one token's own text and bytes,
for logprobs, and `token_name` the string that stands for it there. Nothing here knows HTTP.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from mlxring.engine.lifecycle import GeneratedToken


@dataclass(frozen=True)
class TokenInfo:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int  # where this token's text starts in the completion text


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool the model wrote: OpenAI's `id`, the function's name, its arguments as
    JSON text."""

    id: str
    name: str
    arguments: str


def call_id() -> str:
    """A tool call's id, in OpenAI's form."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class Split:
    """What a piece of completion text added to each channel."""

    content: str = ""
    reasoning: str = ""
    calls: tuple[ToolCall, ...] = ()
    cached: int = 0  # prompt tokens the ring's prompt cache gave (engine.prefix)

    def __add__(self, other: Split) -> Split:
        return Split(
            self.content + other.content,
            self.reasoning + other.reasoning,
            self.calls + other.calls,
        )


class Splitter(Protocol):
    """One completion's channels, fed its text in order."""

    def feed(self, text: str) -> Split:
        """The channels' new parts; text that could begin a marker is held back."""
        ...

    def end(self) -> Split:
        """What was held back, at the completion's end (an unfinished call is parsed)."""
        ...


@dataclass(frozen=True)
class Piece:
    """A part of the completion ready to go to the client; the last one has a finish_reason."""

    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None
    completion_tokens: int = 0
    stop: str | None = None  # the stop string that ended the text, when one did
    # A chat's other channels (engine.channels): `text` is then the answer alone.
    reasoning: str = ""
    calls: tuple[ToolCall, ...] = ()
    cached: int = 0  # prompt tokens the ring's prompt cache gave (engine.prefix)


class IncrementalDecoder:
    """Token ids to text as they arrive, equal to decoding them all at once.

    Each step decodes a short window and emits what the new token added to it (the method of
    vLLM and TGI). The window starts on the prompt's tail, so a first token's leading space is
    kept (mlx-lm's streaming detokenizer drops it); text ending in a partial UTF-8 character
    waits for the next token.
    """

    CONTEXT = 6

    def __init__(self, decode: Callable[[list[int]], str], prompt: Sequence[int]) -> None:
        self._decode = decode
        self.ids = list(prompt[-self.CONTEXT :])
        self.prefix = 0
        self.read = len(self.ids)
        self._before = decode(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._step(final=False)

    def own_text(self, token: int) -> str:
        """The token decoded alone."""
        return self._decode([token])

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(self._before) or (after.endswith("\ufffd") and not final):
            return ""
        new = after[len(self._before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self._before = self._decode(self.ids[self.prefix : self.read])
        if self.prefix > 4096:  # keep the id list short on very long generations
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return new


class TextAssembler:
    """The completion text so far; hands out what is safe to send, cut at the first stop."""

    def __init__(self, decoder: IncrementalDecoder, stops: Sequence[str]) -> None:
        self.decoder = decoder
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.pending: list[TokenInfo] = []
        self.held = 0  # tokens added since the text last grew (parts of one character)

    def add(self, token: int, logprob: float, top: tuple[tuple[int, float], ...]) -> None:
        offset = len(self.text)
        new = self.decoder.add(token)
        if new and self.held:
            # Held bytes ended: either they and this token's first bytes make one character
            # (which starts at `offset`), or they were not a character at all and became
            # U+FFFD, and this token's own whole text follows them.
            own = self.decoder.own_text(token)
            if own and "\ufffd" not in own and new.endswith(own) and len(new) > len(own):
                offset += len(new) - len(own)
        self.held = 0 if new else self.held + 1
        self.pending.append(TokenInfo(token, logprob, top, offset))
        self.text += new

    def finalize(self) -> None:
        self.text += self.decoder.flush()

    def take(self, final: bool) -> tuple[str, tuple[TokenInfo, ...], bool]:
        """Text safe to send now, the tokens it carries, and whether a stop string ended it."""
        cut = self._first_stop()
        if cut is not None:
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._holdback()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        if cut is not None or final:
            tokens = [t for t in self.pending if t.offset < end or (final and cut is None)]
            self.pending = []
        else:
            tokens = [t for t in self.pending if t.offset < end]
            self.pending = self.pending[len(tokens) :]
        return out, tuple(tokens), cut is not None

    def stop_at(self, cut: int) -> str | None:
        """The stop string found at `cut` of the text (the longest, when several are)."""
        return max((s for s in self.stops if self.text.startswith(s, cut)), key=len, default=None)

    def _first_stop(self) -> int | None:
        # Text before `sent` never holds the start of a stop string (it was held back).
        found = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        return min(found) if found else None

    def _holdback(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def assembler(tok: TokenizerWrapper, prompt: Sequence[int], stops: Sequence[str]) -> TextAssembler:
    """A TextAssembler for one request's completion of `prompt`."""
    return TextAssembler(IncrementalDecoder(lambda ids: str(tok.decode(ids)), prompt), stops)


async def pieces(
    tokens: AsyncGenerator[GeneratedToken, None],
    text: TextAssembler,
    on_token: Callable[[], None],
) -> AsyncGenerator[Piece, None]:
    """The engine's tokens as Pieces of text; `on_token` is called as each token arrives."""
    n = cached = 0
    # Leaving this block early (stop string, client gone, error) closes the engine's generator,
    # which sends End(rid) and frees the request's caches on every shard.
    async with contextlib.aclosing(tokens):
        async for g in tokens:
            n += 1
            cached = cached or g.cached
            on_token()
            if g.finish_reason != "stop":  # the EOS token ends the text; it is not part of it
                text.add(g.token, g.logprob, g.top_logprobs)
            final = g.finish_reason is not None
            if final:
                text.finalize()
            out, infos, stopped = text.take(final)
            if stopped:
                yield Piece(out, infos, "stop", n, stop=text.stop_at(text.sent), cached=cached)
                return
            if final:
                yield Piece(out, infos, g.finish_reason, n, cached=cached)
                return
            if out or infos:
                yield Piece(out, infos, cached=cached)
    # The engine ended without a finish reason (max_tokens).
    yield Piece("", (), "length", n, cached=cached)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    out = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in out.values()]
    out.update({chr(256 + i): b for i, b in enumerate(others)})
    return out


BYTE_LEVEL = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_string(tok: TokenizerWrapper, token: int) -> str:
    """The token's own string in the vocabulary ("" where the tokenizer cannot say)."""
    try:
        piece = tok.convert_ids_to_tokens(token)
    except Exception:  # noqa: BLE001 - a tokenizer without the method, or a bad id
        return ""
    return piece if isinstance(piece, str) else ""


class TokenTexts:
    """A token's own text and bytes, for logprobs (cached: the same ids come up again)."""

    LIMIT = 65536  # cached tokens before the cache starts over

    def __init__(self) -> None:
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_tokens: list[str] | None = None  # byte-level BPE token strings, [] if not

    def __call__(self, tok: TokenizerWrapper, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            text = str(tok.decode([token]))
            raw = text.encode()
            if self._byte_tokens is None:
                detok = tok.detokenizer
                self._byte_tokens = (
                    list(detok.tokenmap) if isinstance(detok, BPEStreamingDetokenizer) else []
                )
            if token < len(self._byte_tokens):
                # Byte-level BPE: a token may hold part of a UTF-8 character; give its real bytes.
                piece = self._byte_tokens[token]
                raw = b"".join(
                    bytes([BYTE_LEVEL[c]]) if c in BYTE_LEVEL else c.encode() for c in piece
                )
            elif text == "\ufffd" and (m := _BYTE_FALLBACK.fullmatch(_token_string(tok, token))):
                raw = bytes([int(m[1], 16)])  # SentencePiece's byte fallback: `<0xE2>`
            hit = self._cache[token] = (text, list(raw))
            if len(self._cache) > self.LIMIT:
                self._cache.clear()
        return hit


def token_name(text: str, raw: Sequence[int]) -> str:
    """The string standing for a token in logprobs: its text, or, for a token whose bytes are
    not whole UTF-8 characters (a byte-level BPE token holding part of one), `bytes:\\xNN...`
    as OpenAI writes them. Every such token would otherwise be U+FFFD, and tokens keyed by
    their text (legacy `top_logprobs`) would overwrite each other."""
    try:
        bytes(raw).decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text
