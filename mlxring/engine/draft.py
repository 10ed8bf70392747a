"""Speculative decoding's draft model: a small model with the model's tokenizer, loaded whole on
the head, that drafts the next few tokens greedily where prompt lookup finds nothing to copy.

Each request that drafts gets its own KV caches (mlx-lm's `make_prompt_cache`), filled with the
prompt at its first draft. At each later draft the caches keep the longest run of what they hold
that the request's text still starts with: the positions of rejected drafts go
(`trim_prompt_cache`), the tokens accepted since come in, and up to k tokens are drafted one at
a time. Only `slots` requests hold caches at once, so memory stays bounded; the others draft
without the model.

MLX's streams are per thread: the model lives and runs on one thread of its own, never the
shard's compute thread nor the loop's. A draft has a time budget (the Drafter's: drafts that
take longer than the steps they could save never pay): the thread drafts no further token
once it is spent, and the loop waits about that long (at most `timeout_s`). One that takes
longer (a long prompt's first fill) goes on in the background while the request's steps go
without drafts, and a draft that fails leaves the request without drafts from the model
(logged), never failing it. Drafts never change the output: the ring keeps only those
the model agrees with (`shard.sample.verify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_model, load_tokenizer

from mlxring.aio import wait_for
from mlxring.model import source
from mlxring.model.checkpoint import ModelError
from mlxring.model.sharded import config_value, trims_anywhere

log = structlog.get_logger()

T = TypeVar("T")

#: Requests that hold draft caches at once (each holds its text's KV cache in the draft model).
SLOTS = 8
#: How long a step waits for its drafts before it goes without them.
TIMEOUT_S = 1.0
#: Tokens fed to the draft model per pass when it catches up with a prompt.
PREFILL = 512
#: How long a draft pass's measured time stands for the model's speed before it is measured again.
FRESH_S = 30.0
#: Text whose token ids the draft's tokenizer must give as the model's does.
SAMPLE = (
    "def greet(name: str) -> str:\n    return f'Hello, {name}!'  # 42 ≠ 41\n"
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 日本語, emoji 🙂, tabs\tand  spaces."
)


class DraftError(ModelError):
    """A draft model that cannot draft for this model (not found, another tokenizer, caches
    that cannot drop positions); says which and why."""


def tokenizer_mismatch(draft: TokenizerWrapper, model: TokenizerWrapper) -> str | None:
    """How the draft model's tokenizer differs from the model's, or None: a draft in other
    ids than the model's would be verified against tokens it never meant."""
    dv, mv = draft.get_vocab(), model.get_vocab()
    if len(dv) != len(mv):
        return f"its vocabulary has {len(dv)} tokens, the model's {len(mv)}"
    if dv != mv:
        return "its vocabulary gives tokens other ids than the model's"
    d_ids, m_ids = list(draft.encode(SAMPLE)), list(model.encode(SAMPLE))
    if d_ids != m_ids:
        return "it encodes a sample text into other ids than the model's tokenizer"
    if set(draft.eos_token_ids) != set(model.eos_token_ids):
        return (
            f"its end-of-sequence ids {sorted(draft.eos_token_ids)} are not the model's "
            f"{sorted(model.eos_token_ids)}"
        )
    return None


@dataclass
class _Slot:
    """One request's caches in the draft model, and the tokens whose positions they hold."""

    cache: list[Any]
    tokens: list[int] = field(default_factory=list)


class DraftModel:
    """The head's draft model and its requests' caches. Everything but the counters and the
    bookkeeping of jobs in flight is the draft thread's."""

    def __init__(
        self,
        spec: str,
        vocab: int | None,
        lookup: bool = False,
        slots: int = SLOTS,
        timeout_s: float = TIMEOUT_S,
        frugal: bool = True,
    ) -> None:
        self.spec = spec
        self.vocab = vocab  # the model's token ids: a draft past them is cut there
        self.lookup = lookup  # prompt lookup first, the model where it finds nothing
        self.slots = slots
        self.timeout_s = timeout_s
        # Drafts only where they can pay, within the time they can save (`pays`, `draft`'s
        # `wait_s`); off, every draft asked for is drafted in full (within `timeout_s`), to
        # measure what the model agrees with whatever drafting costs on this machine.
        self.frugal = frugal
        self.drafted = 0  # tokens the model drafted and the ring verified
        self.accepted = 0  # ... that the ring's model agreed with
        # A one-token pass of the draft model (recent average; 0: not measured), and when
        # it was last measured (the draft thread writes both).
        self.pass_s = 0.0
        self._measured = -FRESH_S  # (time.monotonic) never
        self._probing = False  # a pass that measures is on its way
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mlx-draft")
        self._model: nn.Module | None = None
        self._slots: dict[str, _Slot] = {}  # the draft thread's
        self._busy: set[str] = set()  # requests whose draft job is not done (the loop's)
        self._failed: set[str] = set()  # requests whose draft job failed: no more drafts
        self._closed = False

    async def load(self, model_tokenizer: TokenizerWrapper) -> None:
        """Resolve, fetch and load the draft model whole on its thread; DraftError where it
        cannot draft for a model with `model_tokenizer`."""
        loop = asyncio.get_running_loop()
        try:
            meta = await loop.run_in_executor(None, source.resolve_metadata, self.spec)
            config = load_config(meta)
            tok = load_tokenizer(meta, eos_token_ids=config.get("eos_token_id"))
            if (why := tokenizer_mismatch(tok, model_tokenizer)) is not None:
                raise DraftError(f"its tokenizer is not the model's: {why}")
            n = config_value(config, "num_hidden_layers") or config_value(config, "n_layer")
            if not isinstance(n, int):
                raise DraftError("its config names no layer count (num_hidden_layers)")
            path = await loop.run_in_executor(None, source.fetch_shard, self.spec, meta, 0, n, n)
            self._model = await self._run(self._load_whole, path)
        except Exception as e:  # noqa: BLE001 - every cause is reported the same way
            cause = str(e) if isinstance(e, ModelError) else f"{type(e).__name__}: {e}"
            raise DraftError(f"cannot use draft_model {self.spec}: {cause}") from e

    @staticmethod
    def _load_whole(path: Path) -> nn.Module:
        model, _ = load_model(path)
        if not trims_anywhere(make_prompt_cache(model)):
            raise DraftError(
                "its caches cannot drop rejected drafts (a sliding window or a linear-attention "
                "state)"
            )
        return model

    async def draft(
        self, rid: str, tokens: Sequence[int], k: int, wait_s: float | None = None
    ) -> list[int]:
        """Up to `k` greedy drafts to follow `tokens` (request `rid`'s prompt and answer so
        far), as many as `wait_s` gives time for (None: `timeout_s`), or none: no slot free,
        its last draft still running, a failure, or none in time."""
        if k < 1 or self._closed or rid in self._busy or rid in self._failed:
            return []
        frugal = self.frugal and wait_s is not None
        budget = min(wait_s or 0.0, self.timeout_s) if frugal else self.timeout_s
        deadline = time.perf_counter() + budget
        self._busy.add(rid)
        job = asyncio.wrap_future(self._thread.submit(self._draft, rid, list(tokens), k, deadline))
        job.add_done_callback(functools.partial(self._done, rid))
        try:
            # The budget, and a draft pass begun just before it ran out. Shielded: a draft
            # that times out runs on, and its request asks for no other until it ends.
            return await wait_for(asyncio.shield(job), min(2 * budget, self.timeout_s))
        except TimeoutError:
            log.debug("draft_late", rid=rid, budget_s=budget)
            return []
        except Exception:  # noqa: BLE001 - `_done` logged it; the request goes on without
            return []

    def pays(self, step_s: float) -> bool:
        """Whether drafting can pay where a plain step takes `step_s`: only where a draft
        pass, measured lately, takes less than half a step (verifying drafts costs something
        too). Where the measure is old or missing, a pass on its own measures it again (a
        draft of a request's text might first have to catch up with all of it) and drafts
        wait for it."""
        if not self.frugal:
            return True
        if time.monotonic() - self._measured >= FRESH_S:
            if not self._probing and not self._closed:
                self._probing = True
                self._thread.submit(self._probe)
            return False
        return self.pass_s < step_s / 2

    def _done(self, rid: str, job: asyncio.Future[list[int]]) -> None:
        self._busy.discard(rid)
        if not job.cancelled() and (e := job.exception()) is not None:
            self._failed.add(rid)
            log.warning("draft_failed", rid=rid, error=f"{type(e).__name__}: {e}")

    def took(self, drafted: int, accepted: int) -> None:
        """The ring verified `drafted` of the model's drafts and kept `accepted`."""
        self.drafted += drafted
        self.accepted += accepted

    def release(self, rid: str) -> None:
        """Request `rid` ended: its caches go (after any job of it still running)."""
        self._failed.discard(rid)
        if not self._closed:
            self._thread.submit(self._slots.pop, rid, None)

    async def close(self, timeout: float) -> None:
        """Drop the model and every cache, free the thread's MLX streams, join it."""
        if self._closed:
            return
        self._closed = True
        self._thread.submit(self._forget)
        self._thread.submit(mx.clear_streams)
        self._thread.shutdown(wait=False)
        join = asyncio.get_running_loop().run_in_executor(None, self._thread.shutdown, True)
        with contextlib.suppress(TimeoutError):
            await wait_for(join, timeout)

    def _forget(self) -> None:
        self._slots.clear()
        self._model = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._thread.submit(fn, *args))

    # --- the draft thread's ---------------------------------------------------------------

    def _probe(self) -> None:
        """Time one-token passes on a cache of their own (the second: the first may pay for
        warming up)."""
        try:
            model = self._model
            if model is None:
                return
            cache = make_prompt_cache(model)
            for _ in range(2):
                t0 = time.perf_counter()
                mx.eval(model(mx.array([[0]]), cache=cache))
                took = time.perf_counter() - t0
            self._measure(took)
        finally:
            self._probing = False

    def _measure(self, took: float) -> None:
        self.pass_s = took if not self.pass_s else 0.7 * self.pass_s + 0.3 * took
        self._measured = time.monotonic()

    def _draft(self, rid: str, tokens: list[int], k: int, deadline: float) -> list[int]:
        model = self._model
        if model is None:
            return []
        slot = self._slots.get(rid)
        if slot is None:
            if len(self._slots) >= self.slots:
                return []
            slot = self._slots[rid] = _Slot(make_prompt_cache(model))
        try:
            return self._extend(model, slot, tokens, k, deadline)
        except BaseException:
            # Caches fed halfway hold what their tokens do not say: they go.
            self._slots.pop(rid, None)
            raise

    def _extend(
        self, model: nn.Module, slot: _Slot, tokens: list[int], k: int, deadline: float
    ) -> list[int]:
        # What the caches hold that `tokens` still starts with stays (the last token is fed
        # again when they hold it all: its logits give the first draft).
        keep = 0
        for a, b in zip(slot.tokens, tokens[:-1], strict=False):
            if a != b:
                break
            keep += 1
        if len(slot.tokens) > keep:
            trim_prompt_cache(slot.cache, len(slot.tokens) - keep)
            del slot.tokens[keep:]
        feed = tokens[keep:]
        while len(feed) > PREFILL:
            model(mx.array(feed[:PREFILL])[None], cache=slot.cache)
            mx.eval([c.state for c in slot.cache])
            slot.tokens += feed[:PREFILL]
            feed = feed[PREFILL:]
        drafts: list[int] = []
        while len(drafts) < k and (not drafts or time.perf_counter() < deadline):
            t0 = time.perf_counter()
            logits = model(mx.array(feed)[None], cache=slot.cache)[0, -1]
            token = cast(int, mx.argmax(logits).item())
            if len(feed) == 1:
                self._measure(time.perf_counter() - t0)
            slot.tokens += feed
            if self.vocab is not None and token >= self.vocab:
                break  # not a token of the model's: nothing it could agree with
            drafts.append(token)
            feed = [token]
        return drafts
