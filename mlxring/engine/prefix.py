"""The head's view of the ring's prompt cache: which kept requests' tokens the shards hold
caches for, and which of them a new prompt can start from.

Pure bookkeeping, no I/O: the engine asks `match` before a request's first step and tells
`add` what each finished request left on the shards (the tokens it sent, so exactly what every
shard computed). The shards hold the caches (`shard.prefix`); when one has lost an entry its
miss fails only the request's first step, the engine `discard`s the entry and prefills in full.
An entry whose tokens are a prefix of a newer one's is superseded: the newer one serves every
prompt the older could, so the older is handed back to be dropped on the shards too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Fewer shared tokens than this are prefilled anew: a reuse copies the entry's caches on every
#: shard, which costs more than prefilling a few tokens.
MIN_REUSE = 16


@dataclass(frozen=True)
class Hit:
    """Start from entry `eid`'s first `positions` tokens."""

    eid: str
    positions: int


def shared(a: np.ndarray, b: np.ndarray) -> int:
    """How many tokens `a` and `b` start with in common (compared in numpy: an agent's
    prompts run to tens of thousands of tokens, against every entry)."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _ids(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int64)


class PrefixIndex:
    """Entries by id, least recently used first; at most `max_entries` (the shards bound them
    in bytes as well, and may drop one before this index does)."""

    def __init__(self, max_entries: int = 256, min_reuse: int = MIN_REUSE) -> None:
        self.max_entries = max_entries
        self.min_reuse = min_reuse
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, prompt: Sequence[int]) -> Hit | None:
        """The entry sharing the longest start with `prompt`, and how much of it to take: at
        most all but the prompt's last token, which the ring must compute to sample from."""
        best: Hit | None = None
        ids = _ids(prompt)
        for eid, tokens in self._entries.items():
            n = min(shared(tokens, ids), len(ids) - 1)
            if n >= self.min_reuse and (best is None or n > best.positions):
                best = Hit(eid, n)
        if best is not None:
            self._entries.move_to_end(best.eid)
        return best

    def add(self, eid: str, tokens: Sequence[int]) -> tuple[str, ...]:
        """Entry `eid` now holds `tokens`; the entries it supersedes and those past the bound,
        which the shards should drop."""
        new = _ids(tokens)
        gone = [e for e, t in self._entries.items() if shared(t, new) == len(t)]
        for e in gone:
            del self._entries[e]
        self._entries[eid] = new
        while len(self._entries) > self.max_entries:
            gone.append(self._entries.popitem(last=False)[0])
        return tuple(gone)

    def discard(self, eid: str) -> None:
        self._entries.pop(eid, None)

    def clear(self) -> None:
        self._entries.clear()
