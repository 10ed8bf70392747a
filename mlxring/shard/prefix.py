"""A shard's prompt cache: the KV caches of finished requests, kept for later requests that
start with the same tokens.

The head decides what to reuse (it has the tokens: `engine.prefix`); a shard holds its own
layers' caches of each kept request under the request's id and answers for them by id. A
request that starts from an entry gets a copy (entries are never written: concurrent requests
with one prefix each copy it), cut to the positions it shares. A cache kind that cannot be cut
to a shorter prefix (a linear-attention state, a sliding window that has wrapped) is reused
only whole. Entries go least recently used first when the store is over its byte bound, when
live requests need the memory, and all of them on a re-plan; an entry the head asks for that
is gone is a `CacheMiss`, which fails only that request's first step: the head then prefills
it in full (still exact).

mlx-lm's own server keeps such a cache on one machine (`LRUPromptCache`: copy, then trim);
this is the same, per shard.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from mlxring.shard.state import cache_bytes


class CacheMiss(Exception):
    """The entry a request starts from is not here (evicted, or this node restarted)."""


@dataclass
class Entry:
    caches: list[Any]
    history: mx.array | None  # the tokens the last shard's logits processors had seen
    positions: int
    nbytes: int


@dataclass(frozen=True)
class Start:
    """What a request that reuses an entry starts with."""

    caches: list[Any]
    history: mx.array | None
    positions: int


def copied(cache: Any) -> Any:
    """A cache of the same kind holding the same positions in arrays of its own, so that
    writing to it (MLX writes a cache's buffers in place) leaves the entry as it was. Made
    from the cache's `state` (mlx-lm's save format): copy.deepcopy would put the arrays on the
    stream of the thread that made them, which the compute thread cannot run."""
    state = tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, cache.state)
    return type(cache).from_state(state)


class PromptCache:
    """One shard's entries, least recently used first, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, eid: str, caches: list[Any], history: mx.array | None, positions: int) -> None:
        """A finished request's caches (its own: no one else holds them) as entry `eid`."""
        if positions <= 0 or self.max_bytes <= 0:
            return
        self.drop((eid,))
        nbytes = cache_bytes(caches)
        if nbytes > self.max_bytes:
            return
        self._entries[eid] = Entry(caches, history, positions, nbytes)
        self.nbytes += nbytes
        self.fit(self.max_bytes)

    def start(self, eid: str, positions: int) -> Start:
        """A copy of entry `eid` cut to its first `positions`; CacheMiss when it is gone or
        cannot be cut there."""
        e = self._entries.get(eid)
        if e is None or positions > e.positions or positions <= 0:
            self.misses += 1
            raise CacheMiss(f"prompt cache entry {eid} ({positions} positions) is not here")
        caches = [copied(c) for c in e.caches]
        if positions < e.positions:
            if not can_trim_prompt_cache(caches):
                self.misses += 1
                raise CacheMiss(f"prompt cache entry {eid} cannot be cut to {positions} positions")
            trim_prompt_cache(caches, e.positions - positions)
        history = None if e.history is None else e.history[:positions]
        self._entries.move_to_end(eid)
        self.hits += 1
        return Start(caches, history, positions)

    def drop(self, eids: tuple[str, ...]) -> None:
        for eid in eids:
            e = self._entries.pop(eid, None)
            if e is not None:
                self.nbytes -= e.nbytes

    def fit(self, max_bytes: int) -> None:
        """Drop entries, least recently used first, until they hold at most `max_bytes`."""
        while self._entries and self.nbytes > max(0, max_bytes):
            _, e = self._entries.popitem(last=False)
            self.nbytes -= e.nbytes
            self.evicted += 1

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
