"""Speculative decoding's head side: drafting tokens from the request's own text (prompt
lookup), and backing off when the model does not agree with them.

A ring cannot make one stream faster by splitting layers: each token still passes every layer
and every hop. Speculation changes the count: the head drafts a few tokens, one step carries the
last token and the drafts around the ring, the last shard samples at every position and keeps
the drafts the model agrees with (`shard.sample.verify`), and each kept draft saves a trip.
Prompt lookup drafts the tokens that followed the latest earlier occurrence of the text's last
few tokens, in the prompt or the answer so far: agents that edit code and quote documents
repeat long runs of their input. Output is unchanged: a draft is kept only where it is the
token the request's own sampling draws there (greedy, or the speculative-sampling rule).

`Drafter` is one request's: it drafts only while its drafts are worth it. A step whose drafts
the model all rejects, or that gave fewer tokens a second than plain steps do (where the
machine pays for every position it verifies, as a CPU does), is a miss; after `MISSES` misses
in a row it pauses for a while, longer each time, so a request with nothing to copy, or a
machine where copying does not pay, runs as without speculation.

With a draft model (`[cluster] draft_model`, engine/draft.py) a step's drafts are the model's
greedy continuation, or, with `speculative = true` too, prompt lookup's where it finds a match
and the model's where it does not. The back-off weighs both alike, the model's drafting time
counted in its steps' time: a draft model too slow to pay pauses as rejected drafts do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: Tokens drafted per step (at most; the shards accept up to `shard.checks.MAX_DRAFT`).
DRAFT = 5
#: The longest and shortest runs of last tokens looked up (longer runs first: fewer false hits).
MAX_NGRAM = 4
MIN_NGRAM = 2
#: Steps in a row whose drafts were all rejected before drafting pauses.
MISSES = 3
#: Steps a pause lasts at first; each pause after lasts twice as long (at most 256).
PAUSE = 8
#: A plain step (no drafts) after this many with drafts, to keep its time known.
PLAIN_EVERY = 16
#: Steps with drafts whose tokens a second are weighed against plain steps' (at least half).
WINDOW = 8
#: The last tokens a lookup searches: a lookup costs a scan of what it searches.
RECENT = 4096


def lookup(tokens: Sequence[int], k: int = DRAFT) -> list[int]:
    """`k` tokens copied from what followed the latest earlier occurrence of the last
    MAX_NGRAM..MIN_NGRAM tokens of `tokens` (the longest run that occurs), or none. A copy
    that reaches the end of `tokens` goes on from its own start (text repeating with a
    period shorter than `k`, as "a b a b", drafts whole periods, not one). Only the last
    RECENT tokens are searched."""
    tokens = tokens[-RECENT:]
    n_tokens = len(tokens)
    for n in range(min(MAX_NGRAM, n_tokens - 1), MIN_NGRAM - 1, -1):
        tail = list(tokens[n_tokens - n :])
        # The latest occurrence that ends before the tail itself, searched backwards.
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start : start + n]) == tail:
                source = start + n
                out: list[int] = []
                for j in range(source, source + k):
                    out.append(tokens[j] if j < n_tokens else out[j - n_tokens])
                return out
    return []


class DraftSource(Protocol):
    """Where drafts come from besides the request's own text: a draft model (engine/draft.py)."""

    lookup: bool  # prompt lookup first, this source where it finds nothing
    drafted: int  # tokens it drafted that the ring verified
    accepted: int  # ... and kept

    async def draft(self, rid: str, tokens: Sequence[int], k: int, wait_s: float) -> list[int]:
        """Up to `k` drafts to follow `tokens`, request `rid`'s text, as many as `wait_s`
        gives time for (none: it has none now)."""
        ...

    def took(self, drafted: int, accepted: int) -> None:
        """The ring verified `drafted` of its drafts and kept `accepted`."""

    def pays(self, step_s: float) -> bool:
        """Whether its drafts can pay where a plain step takes `step_s` (as far as known)."""
        ...

    def release(self, rid: str) -> None:
        """Request `rid` ended: what the source keeps of it goes."""


@dataclass
class Drafter:
    """One request's drafting: what it drafted and had accepted, and whether it drafts now."""

    k: int = DRAFT
    drafted: int = 0
    accepted: int = 0
    steps: int = 0
    plain_s: float = 0.0  # a plain step's time around the ring (recent average; 0: none yet)
    _misses: int = 0  # steps in a row whose drafts did not pay
    _paused: int = 0  # steps left before drafting again
    _pause: int = PAUSE
    _since_plain: int = 0  # steps with drafts since the last plain one
    # (tokens given, seconds taken) of the recent steps with drafts
    _recent: list[tuple[int, float]] = field(default_factory=list)
    rid: str = ""  # the request's id, for `source`
    source: DraftSource | None = None  # a draft model's drafts besides prompt lookup's
    _sourced: bool = False  # the last drafts came from `source`
    _source_s: float = 0.0  # how long the last step waited for `source`, drafts or none

    def draft(self, tokens: Sequence[int]) -> list[int]:
        """Drafts to follow `tokens` (the prompt and the answer so far) from prompt lookup:
        none while paused, and none now and then, so that a plain step's time stays known."""
        if not self._drafts_now():
            return []
        return lookup(tokens, self.k)

    async def next(self, tokens: Sequence[int], limit: int) -> list[int]:
        """At most `limit` drafts to follow `tokens`, as `draft`, from the draft source where
        there is one: after prompt lookup finds nothing (where the source looks up first)."""
        self._sourced, self._source_s = False, 0.0
        if self.source is None:
            return self.draft(tokens)[: max(0, limit)]
        if limit < 1 or not self._drafts_now():
            return []
        if self.source.lookup and (found := lookup(tokens, min(self.k, limit))):
            return found
        k = min(self.k, limit)
        if not self.source.pays(self.plain_s):  # too slow to draft with: a miss, no wait
            self._miss()
            return []
        # Drafting a token must cost well under the plain step it may save, as verifying it
        # costs something too: the source drafts what it can in half the steps' time.
        t0 = time.perf_counter()
        drafts = await self.source.draft(self.rid, tokens, k, k * self.plain_s / 2)
        self._sourced, self._source_s = bool(drafts), time.perf_counter() - t0
        return drafts

    def _drafts_now(self) -> bool:
        if self._paused:
            self._paused -= 1
            return False
        return bool(self.plain_s) and self._since_plain < PLAIN_EVERY

    def took(self, drafted: int, accepted: int, step_s: float = 0.0) -> None:
        """A step with `drafted` drafts (0: a plain step) kept `accepted` of them, in `step_s`
        around the ring. Drafting pauses after MISSES steps in a row whose drafts were all
        rejected, and at once when the recent steps with drafts gave fewer tokens a second
        than plain steps do: where verifying each position costs about a step of its own (a
        CPU), drafts pay only when nearly all are kept. The time the step waited for the
        source counts as the step's too, and a step whose drafts the source did not give in
        time is a miss."""
        if drafted and self._sourced and self.source is not None:
            self.source.took(drafted, accepted)
        waited, self._source_s = self._source_s, 0.0
        if step_s:
            step_s += waited
        if not drafted and waited:  # asked for drafts and got none: a step without gain
            self.steps += 1
            self._since_plain += 1
            if step_s:
                self._recent = [*self._recent[-(WINDOW - 1) :], (1, step_s)]
            self._miss()
            return
        if not drafted:
            if step_s:
                self.plain_s = step_s if not self.plain_s else 0.7 * self.plain_s + 0.3 * step_s
            self._since_plain = 0
            return
        self.steps += 1
        self._since_plain += 1
        self.drafted += drafted
        self.accepted += accepted
        if step_s:
            self._recent = [*self._recent[-(WINDOW - 1) :], (accepted + 1, step_s)]
        weighed = bool(self.plain_s) and len(self._recent) >= WINDOW // 2
        slow = False
        if weighed:
            tokens = sum(t for t, _ in self._recent)
            seconds = sum(s for _, s in self._recent)
            slow = tokens / seconds < 1 / self.plain_s
        if slow:
            self._misses = MISSES  # pause now
        elif accepted:
            self._misses = 0
            if weighed:  # drafts that pay: the next pause is short again
                self._pause = PAUSE
            return
        else:
            self._misses += 1
        self._miss(0)

    def _miss(self, count: int = 1) -> None:
        """`count` more misses in a row; after MISSES, drafting pauses, longer each time."""
        self._misses += count
        if self._misses >= MISSES:
            self._misses = 0
            self._recent = []
            self._paused = self._pause
            self._pause = min(256, self._pause * 2)
