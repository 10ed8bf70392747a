"""Constrained decoding on the last shard: llguidance matchers that keep a request's sampled
tokens inside its grammar (a JSON schema from `response_format`, compiled by `api.structured`).

The process holds one `Grammars`: llguidance's view of the model's tokenizer, built once, on the
first request with a grammar (a large vocabulary takes about a second), and shared by its shards.
Each such request gets its own `Matcher`: before sampling it masks the logits (tokens the grammar
does not allow next to -inf), after sampling it advances by the token; once the grammar is
complete the only token it allows is EOS, so the head's engine stops the request as usual."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

#: The largest grammar a request may carry (the API refuses more; a frame from the wire is
#: checked against it in `checks.Limits.sampling`).
MAX_GRAMMAR_CHARS = 1 << 20


class GrammarError(Exception):
    """A grammar the matcher cannot run, or a token it cannot take: fails its request only."""


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._m = matcher
        self._vocab = vocab  # the tokenizer's ids: the bitmask's length

    def error(self) -> str | None:
        """Why the matcher cannot go on, or None."""
        return self._m.get_error() if self._m.is_error() else None

    def allowed(self, width: int) -> mx.array:
        """Which of `width` logits the grammar allows next (bool); ids past the tokenizer's
        (a model head wider than its tokenizer) never are."""
        bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: min(self._vocab, width)]
        if allowed.size < width:
            allowed = np.pad(allowed, (0, width - allowed.size))
        return mx.array(allowed.astype(np.bool_))

    def __call__(self, history: mx.array | None, logits: mx.array) -> mx.array:
        """A logits processor in mlx-lm's style: `logits` with what the grammar does not allow
        next at -inf (the matcher holds its own place, so `history` is not read)."""
        return mx.where(self.allowed(logits.shape[-1]), logits, -mx.inf)

    def advance(self, token: int) -> None:
        """Take the sampled `token`; an EOS after the grammar completed leaves it stopped (a
        head that ignores EOS gets EOS-only masks from then on)."""
        if self._m.is_stopped():
            return
        if not self._m.consume_token(token):
            raise GrammarError(f"token {token} does not fit the grammar: {self._m.get_error()}")


class Grammars:
    """llguidance's tokenizer for this process's model, built on first use (from any thread:
    steps run on the compute thread and on the loop's)."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._ll: llguidance.LLTokenizer | None = None

    def _built(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                # Every id the head's engine stops on ends a completed grammar.
                eos: Iterable[int] = self._tokenizer.eos_token_ids
                self._ll = llguidance.hf.from_tokenizer(
                    self._tokenizer._tokenizer, eos_token=sorted(eos)
                )
            return self._ll

    def matcher(self, grammar: str) -> Matcher:
        """A matcher at the start of `grammar` (llguidance's grammar JSON)."""
        ll = self._built()
        m = llguidance.LLMatcher(ll, grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"the grammar cannot be used: {m.get_error()}")
        return Matcher(m, ll.vocab_size)
