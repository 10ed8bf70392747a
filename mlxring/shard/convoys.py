"""Convoys: requests whose decode steps run together as one pass. Their merged KV caches
(`Convoys`), and the pure choices of which waiting decode steps join a pass (`DecodePick`) and
how many rows one pass may carry (`convoy_rows`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlxring.model.sharded import ShardModel
from mlxring.protocol.messages import End, Failure, Forward, ForwardBatch
from mlxring.shard.state import RequestState


def rows_in(msg: Forward | ForwardBatch) -> int:
    return len(msg.rows) if isinstance(msg, ForwardBatch) else 1


def rids_in(msg: Forward | ForwardBatch | End | Failure) -> set[str]:
    return {r.rid for r in msg.rows} if isinstance(msg, ForwardBatch) else {msg.rid}


def is_prompt_chunk(msg: object) -> bool:
    return isinstance(msg, Forward) and not (msg.is_decode or msg.is_speculative)


def convoy_rows(max_batch: int, requests: int, stages: int) -> int:
    """How many requests one decode pass may carry. With several stages computing at once,
    the requests split into one convoy per stage, so that every stage has a convoy to run
    while the others run theirs (one convoy of all would leave all but one stage idle)."""
    return max(1, min(max_batch, -(-requests // stages)))


def wide_rows(model: ShardModel) -> bool:
    """Whether a batched pass may carry rows of several positions (drafts to verify) and rows
    that first drop their last positions (a trim): where every layer of the whole model (so
    every shard decides alike) has mlx-lm's plain KV cache, whose merged form
    (`BatchKVCache`) drops each row's last positions exactly (`drop_last`)."""
    return model.family.batches and all(type(c) is KVCache for c in model.whole_cache())


def drop_last(caches: Sequence[Any], counts: Sequence[int]) -> None:
    """Drop the last `counts[i]` positions of row `i` of merged caches (BatchKVCache): the
    positions every row drops by `trim` (nothing moves), the rest as mlx-lm's right padding
    (`prepare(right_padding=...)`, `finalize`): each row rolled right by its count, the dropped
    positions wrapped to its left, where its left padding masks them. Then the left padding all
    rows share is cut off, so that the caches do not grow by what the rows dropped."""
    common = min(counts)
    rest = [n - common for n in counts]
    for c in caches:
        assert isinstance(c, BatchKVCache)
        if common:
            c.trim(common)
        if any(rest):
            c.prepare(right_padding=rest)
            c.finalize()
    if any(rest):
        _cut_shared_padding(caches)


def _cut_shared_padding(caches: Sequence[BatchKVCache]) -> None:
    """Cut the left padding that every row of a cache has (as `BatchKVCache.filter` does):
    the caches then hold as many positions as their longest row."""
    least = [mx.min(c.left_padding) for c in caches]
    mx.eval(least)  # one wait for all of them
    for c, m in zip(caches, least, strict=True):
        shared = cast(int, m.item())
        keys, values, offset, left_padding, idx = c.state
        if shared and keys is not None:
            c.state = (
                keys[..., shared:, :], values[..., shared:, :], offset, left_padding - shared,
                idx - shared,
            )  # fmt: skip


class DecodePick:
    """Which waiting messages join a decode pass, asked of each in mailbox order: decode steps,
    up to `limit` rows with the pass's own `rows`. A step may pass other requests' messages but
    never an earlier one of its own request, nor a local control message (a re-plan, a sweep):
    the scan stops there (None)."""

    def __init__(self, rows: int, limit: int, is_decode: Callable[[object], bool]) -> None:
        self.room = limit - rows
        self.is_decode = is_decode
        self.blocked: set[str] = set()
        self.passed_chunk = False  # the scan went past a prompt chunk
        self.took_past_chunk = False  # and took a step from behind it

    def __call__(self, m: object) -> bool | None:
        if self.room <= 0 or not isinstance(m, Forward | ForwardBatch | End | Failure):
            return None
        rids = rids_in(m)
        if self.is_decode(m) and not rids & self.blocked:
            assert isinstance(m, Forward | ForwardBatch)
            if rows_in(m) <= self.room:
                self.room -= rows_in(m)
                self.took_past_chunk = self.took_past_chunk or self.passed_chunk
                return True
        self.passed_chunk = self.passed_chunk or is_prompt_chunk(m)
        self.blocked.update(rids)
        return False


class Convoys:
    """Merged KV caches of requests that run together. The same requests keep arriving together
    (a "convoy"), so their merged caches are kept and reused step after step; merging anew
    copies every cache. Several convoys take turns on a shard (one per stage computing at once,
    or requests that started apart), so each keeps its own. A request is in one at most, and
    while it is, the merged caches hold its KV (its own list is empty)."""

    def __init__(self) -> None:
        self.merged: dict[tuple[str, ...], list[Any]] = {}
        self._of: dict[str, tuple[str, ...]] = {}

    def caches(self, rids: tuple[str, ...], requests: dict[str, RequestState]) -> list[Any]:
        """The merged caches of `rids`, in this row order."""
        merged = self.merged.get(rids)
        if merged is None:
            for rid in rids:
                self.dissolve(rid, requests)
            per_request = [requests[r].caches for r in rids]
            merged = [
                per_request[0][i].merge([c[i] for c in per_request])
                for i in range(len(per_request[0]))
            ]
            self.merged[rids] = merged
            for rid in rids:
                requests[rid].caches = []
                self._of[rid] = rids
        return merged

    def dissolve(self, rid: str, requests: dict[str, RequestState]) -> None:
        """Give each live request of `rid`'s convoy its own caches back."""
        rids = self._of.get(rid)
        if rids is None:
            return
        merged = self.merged.pop(rids)
        for j, r in enumerate(rids):
            del self._of[r]
            st = requests.get(r)
            if st is not None:
                st.caches = [c.extract(j) for c in merged]

    def drop_dead(self, requests: dict[str, RequestState]) -> None:
        """Let go of convoys none of whose requests is live any more. One with some live ones
        stays until they run again: a new batch of them dissolves it then."""
        for rids in [k for k in self.merged if not any(r in requests for r in k)]:
            del self.merged[rids]
            for r in rids:
                del self._of[r]

    def clear(self) -> None:
        self.merged.clear()
        self._of.clear()
