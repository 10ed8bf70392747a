"""Per-process API state, shared by the apps of every API port, and the API's view of the ring.

`ApiState` holds what the handlers share (the admission queue, the tokenizer thread, the HTTP
client to the head, metrics, sampled rates) and is the one place the HTTP layer reads the
`Runtime`. The runtime attributes the API depends on are exactly those read in its "view"
section: `config` (the `[api]` table, `cluster.model`, `cluster.request_timeout_s`, node
addresses and API ports), `names`, `head_name`, `model_name`, `model_config`, `tokenizer`,
`engine`, `nodes`, `members`, `monitor.stats` (for busy shares) and whatever
`mlxring.ring.snapshot.take` reads for status and metrics.

Also here: the keys that carry the state on the app and per-request data on the request.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlxring.api import schema
from mlxring.api.admission import Admission
from mlxring.api.metrics import Metrics
from mlxring.config import ApiConfig
from mlxring.engine.lifecycle import Engine
from mlxring.engine.text import TokenTexts
from mlxring.model.sharded import context_length
from mlxring.ring import snapshot as ring_snapshot
from mlxring.ring.runtime import Runtime
from mlxring.tasks import TaskScope

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RATE_EVERY_S = 2.0  # tokens/s and busy shares are measured over RATE_SAMPLES such periods
RATE_SAMPLES = 6

Sample = tuple[float, int, dict[str, float]]  # (time, tokens generated, each node's busy s)


class RateSampler:
    """Tokens per second and each node's busy share over the last few seconds."""

    def __init__(self, sample: Callable[[], Sample]) -> None:
        self._sample = sample
        self._samples: deque[Sample] = deque(maxlen=RATE_SAMPLES)
        self._task: asyncio.Task[None] | None = None

    def start(self, tasks: TaskScope) -> None:
        """Sample in `tasks` (supervised: a sample that fails is logged and sampling goes on)."""
        if self._task is None:
            self._task = tasks.start(self._run, "rate-sampler")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            self._samples.append(self._sample())
            await asyncio.sleep(RATE_EVERY_S)

    def rates(self) -> tuple[float | None, dict[str, float]]:
        if not self._samples:
            return None, {}
        t0, tokens0, busy0 = self._samples[0]
        t1, tokens1, busy1 = self._sample()
        dt = t1 - t0
        if dt < 0.5:
            return None, {}
        # A new engine (after a re-plan) restarts its count: no rate across that.
        tps = (tokens1 - tokens0) / dt if tokens1 >= tokens0 else None
        share = {n: min(1.0, max(0.0, (b - busy0[n]) / dt)) for n, b in busy1.items() if n in busy0}
        return tps, share


@dataclass
class ApiState:
    """What the apps of every API port of one process share, and their one view of the ring."""

    runtime: Runtime
    admission: Admission
    started: float = field(default_factory=time.time)
    # One thread for the tokenizer: long prompts stay off the event loop, and calls into the
    # Rust tokenizer never overlap.
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mlxring-tokenize")
    )
    session: aiohttp.ClientSession | None = None
    users: int = 0
    token_texts: TokenTexts = field(default_factory=TokenTexts)
    sampler: RateSampler = field(init=False)
    metrics: Metrics = field(init=False)

    @classmethod
    def of(cls, runtime: Runtime) -> ApiState:
        api = runtime.config.api
        wait_s = runtime.config.cluster.request_timeout_s
        return cls(runtime, Admission(api.max_concurrent, api.max_queue, wait_s))

    def __post_init__(self) -> None:
        self.sampler = RateSampler(self._sample)
        self.metrics = Metrics(self.runtime, self.admission.depth)

    async def open(self) -> None:
        self.users += 1
        if self.session is None:
            api = self.api
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=api.max_concurrent + api.max_queue + 16),
                auto_decompress=False,
            )
        self.sampler.start(self.runtime.tasks)

    async def close(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self.sampler.stop()
            if self.session is not None:
                await self.session.close()
                self.session = None
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    # --- the runtime, as the API reads it -------------------------------------------------

    @property
    def api(self) -> ApiConfig:
        return self.runtime.config.api

    @property
    def request_timeout_s(self) -> float:
        return self.runtime.config.cluster.request_timeout_s

    @property
    def model_name(self) -> str:
        return self.runtime.model_name

    @property
    def model_names(self) -> tuple[str, str]:
        """The names a request may give the model by: its served name and the config's."""
        return self.runtime.model_name, self.runtime.config.cluster.model

    @property
    def head_name(self) -> str:
        return self.runtime.head_name

    @property
    def names(self) -> list[str]:
        """This process's nodes, in ring order."""
        return self.runtime.names

    @property
    def members(self) -> tuple[str, ...]:
        return self.runtime.members

    @property
    def tokenizer(self) -> TokenizerWrapper | None:
        return self.runtime.tokenizer

    @property
    def engine(self) -> Engine | None:
        return self.runtime.engine

    @property
    def hosts_head(self) -> bool:
        """Whether this process is (or, while re-planning, is about to be again) the head."""
        rt = self.runtime
        return rt.engine is not None or rt.head_name in rt.nodes

    def not_serving(self) -> str:
        """Why the head in this process cannot serve now ("" when it can)."""
        return ring_snapshot.not_serving(self.runtime)

    def vocab_size(self) -> int:
        tok = self.runtime.tokenizer
        return schema.vocab_size(self.runtime.model_config, len(tok) if tok is not None else None)

    def context_length(self) -> int | None:
        return context_length(self.runtime.model_config)

    def api_ports(self) -> list[int]:
        """The distinct API ports of this process's nodes."""
        config = self.runtime.config
        return sorted({config.api_port(n) for n in self.runtime.names})

    def head_address(self) -> tuple[str, int] | None:
        """Where the head's API listens, as a node of this ring sees it."""
        rt = self.runtime
        api = rt.config.api
        head = rt.config.node(rt.head_name)
        # A wildcard API host listens on every address: reach the head at its ring address.
        host = head.host if api.host in ("0.0.0.0", "::", "") else api.host
        if host is None:
            return None
        return host, rt.config.api_port(rt.head_name)

    def snapshot(self) -> ring_snapshot.RingSnapshot:
        """The ring now, with this process's queue and sampled rates."""
        tokens_per_s, busy_share = self.sampler.rates()
        return ring_snapshot.take(self.runtime, self.admission.depth(), tokens_per_s, busy_share)

    def _sample(self) -> Sample:
        rt = self.runtime
        busy = {n: st.busy_s for n, st in rt.monitor.stats.items()} if rt.monitor else {}
        tokens = rt.engine.tokens_generated if rt.engine is not None else 0
        return time.monotonic(), tokens, busy

    # --- text of tokens -------------------------------------------------------------------

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """A token's own text and bytes, for logprobs."""
        tok = self.runtime.tokenizer
        assert tok is not None
        return self.token_texts(tok, token)


STATE = web.AppKey("mlxring_api_state", ApiState)
RID = web.RequestKey("mlxring_rid", str)
ARRIVED = web.RequestKey("mlxring_arrived", float)  # time.monotonic() when the request came in
NOTES = web.RequestKey("mlxring_notes", dict[str, Any])  # fields for the request's log line
# False for a request without the API key (where one is set) to a route open without it.
AUTHORIZED = web.RequestKey("mlxring_authorized", bool)


def note(request: web.Request, **fields: Any) -> None:
    """Add fields to the request's log line."""
    notes: dict[str, Any] = dict(request.get(NOTES, {}))
    notes.update(fields)
    request[NOTES] = notes
