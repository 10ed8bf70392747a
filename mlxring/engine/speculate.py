"""Speculative decoding's head side: drafting tokens from the request's own text (prompt
lookup), and backing off when the model does not agree with them.

A ring cannot make one stream faster by splitting layers: each token still passes every layer
and every hop. Speculation changes the count: the head drafts a few tokens, one step carries the
last token and the drafts around the ring, the last shard samples at every position and keeps
the drafts the model agrees with (`shard.sample.verify`), and each kept draft saves a trip.
Prompt lookup drafts the tokens that followed the latest earlier occurrence of the text's last
few tokens, in the prompt or the answer so far: agents that edit code and quote documents
repeat long runs of their input. Greedy output is unchanged: a draft is kept only where it is
the token the model gives there.

`Drafter` is one request's: it drafts only while its drafts are worth it. A step whose drafts
the model all rejects costs about a plain step (one pass over k + 1 positions); after
`MISSES` such steps in a row it pauses for a while, longer each time, so a request with nothing
to copy runs as without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: Tokens drafted per step (at most; the shards accept up to `shard.checks.MAX_DRAFT`).
DRAFT = 5
#: The longest and shortest runs of last tokens looked up (longer runs first: fewer false hits).
MAX_NGRAM = 4
MIN_NGRAM = 2
#: Steps in a row whose drafts were all rejected before drafting pauses.
MISSES = 3
#: Steps a pause lasts at first; each pause after lasts twice as long (at most 256).
PAUSE = 8


def lookup(tokens: Sequence[int], k: int = DRAFT) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the last MAX_NGRAM..
    MIN_NGRAM tokens of `tokens` (the longest run that occurs), or none."""
    n_tokens = len(tokens)
    for n in range(min(MAX_NGRAM, n_tokens - 1), MIN_NGRAM - 1, -1):
        tail = list(tokens[n_tokens - n :])
        # The latest occurrence that ends before the tail itself, searched backwards.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start : start + n]) == tail:
                follow = list(tokens[start + n : start + n + k])
                if follow:
                    return follow
    return []


@dataclass
class Drafter:
    """One request's drafting: what it drafted and had accepted, and whether it drafts now."""

    k: int = DRAFT
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    _misses: int = 0  # steps in a row with every draft rejected
    _paused: int = 0  # steps left before drafting again
    _pause: int = PAUSE

    def draft(self, tokens: Sequence[int]) -> list[int]:
        """Drafts to follow `tokens` (the prompt and the answer so far), none while paused."""
        if self._paused:
            self._paused -= 1
            return []
        # Only the recent text is looked up: a lookup costs a scan of what it searches.
        return lookup(tokens[-4096:], self.k)

    def took(self, drafted: int, accepted: int) -> None:
        """A step with `drafted` drafts kept `accepted` of them."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        if accepted:
            self._misses = 0
            self._pause = PAUSE
            return
        self._misses += 1
        if self._misses >= MISSES:
            self._misses = 0
            self._paused = self._pause
            self._pause = min(256, self._pause * 2)
