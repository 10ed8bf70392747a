"""Prometheus metrics of one node process, served at `GET /metrics`.

Two kinds. Request metrics are recorded by the API as requests pass: counts by endpoint and
status, prompt and generated tokens, time-to-first-token and per-token latency histograms, and
prefill/decode throughput over a recent window. Ring metrics are read at scrape time from one
`mlxring.ring.snapshot` of the objects that already count (shard actors, links, the head's engine
and ring monitor), so the ring's hot paths carry no metrics code at all.

Each process's API state owns its own registry (never prometheus_client's global one): several
runtimes may live in one process, as in the tests.

Names (all prefixed `mlxring_`; `{node}` is a ring node, `{peer}` the far end of a link):

    http_requests_total{endpoint,method,status}   http_request_duration_seconds{endpoint}
    generations_total{finish_reason}              prompt_tokens_total  generated_tokens_total
    time_to_first_token_seconds                   time_per_output_token_seconds
    prefill_tokens_per_second  decode_tokens_per_second  (gauges over RATE_WINDOW_S)
    requests_running  requests_waiting            decode_trip_seconds{quantile}
    decode_hop_seconds{quantile}
    cluster_info{cluster,model,head}  ring_up  ring_members  ring_hop_seconds{quantile}
    node_up{node}  node_member{node}  node_layer_start{node}  node_layer_end{node}
    node_memory_{active,peak,total}_bytes{node}   node_kv_requests{node}  kv_cache_bytes{node}
    shard_busy_seconds_total{node}  shard_steps_total{node}  shard_mailbox{node}
    shard_batched_steps_total{node}  shard_batched_rows_total{node}
    link_up{peer}  link_reconnects_total{peer}  link_rtt_seconds{peer}
    link_rejected_total{node}
    prompt_cache_hits_total  prompt_cache_misses_total  prompt_cache_tokens_total  (head only)
    prompt_cache_bytes{node}  prompt_cache_entries{node}
    speculative_drafted_tokens_total{kind}  speculative_accepted_tokens_total{kind}
                                                  (head, when on; kind: ngram | draft)

The prompt cache's counters are the head's engine's: hits (requests that started from a kept
prompt), misses (a hit whose entry a shard no longer held, so the prompt was prefilled in full)
and the prompt tokens the hits reused. Its bytes and entries per node are what each node
reported as the head's last probe passed it.

Speculation's counters are by where the drafts came from: `ngram`, prompt lookup of the
request's own text; `draft`, the draft model (`[cluster] draft_model`), shown only where the
head has one. Accepted over drafted of one kind is that kind's acceptance rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from mlxring.ring.snapshot import LinkRow, NodeRow, QueueDepth, RingSnapshot, take

if TYPE_CHECKING:
    from mlxring.engine.lifecycle import Engine
    from mlxring.ring.runtime import Runtime

RATE_WINDOW_S = 10.0  # prefill/decode tokens per second are averaged over this many seconds
QUANTILES = (0.5, 0.9, 0.99)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class PromptCacheCounts:
    """The head's prompt-cache counters since it started."""

    hits: int  # requests that started from a kept prompt
    misses: int  # ... whose entry a shard no longer held (prefilled in full instead)
    tokens: int  # prompt tokens the hits reused


def prompt_cache_counts(engine: Engine | None) -> PromptCacheCounts | None:
    """The counters of the head's engine, when this process hosts it (None elsewhere)."""
    if engine is None:
        return None
    return PromptCacheCounts(engine.cache_hits, engine.cache_misses, engine.cache_tokens)


class RateWindow:
    """Token counts of the last `span_s` seconds, as a rate per second."""

    def __init__(self, span_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.span_s = span_s
        self._clock = clock
        self._started = clock()
        self._events: deque[tuple[float, int]] = deque()
        self._sum = 0

    def add(self, n: int) -> None:
        now = self._clock()
        self._events.append((now, n))
        self._sum += n
        self._prune(now)  # here too, so a node nobody scrapes stays bounded

    def rate(self) -> float:
        now = self._clock()
        self._prune(now)
        # A node up for less than the window divides by its uptime (at least a second),
        # so the first seconds after start do not read low.
        elapsed = min(self.span_s, max(1.0, now - self._started))
        return self._sum / elapsed

    def _prune(self, now: float) -> None:
        cutoff = now - self.span_s
        while self._events and self._events[0][0] < cutoff:
            self._sum -= self._events.popleft()[1]


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile of samples, nearest rank (samples must not be empty)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class TokenTimer:
    """Times one request's tokens as they come back: time to first token from the request's
    arrival, then the gap before each later one."""

    def __init__(self, metrics: Metrics, n_prompt: int, arrived: float) -> None:
        self._m = metrics
        self._n_prompt = n_prompt
        self._last = arrived
        self._first = True

    def token(self) -> None:
        now = time.monotonic()
        m = self._m
        if self._first:
            self._first = False
            m.ttft.observe(now - self._last)
            m.prompt_tokens.inc(self._n_prompt)
            m.prefill.add(self._n_prompt)
        else:
            m.per_token.observe(now - self._last)
            m.decode.add(1)
        m.generated_tokens.inc()
        self._last = now


class Metrics:
    """The registry of one process's API, with the request metrics the handlers record."""

    def __init__(self, runtime: Runtime, queue: Callable[[], QueueDepth]) -> None:
        # No `_created` series: they double the exposition and Prometheus has no use for them
        # in the text format (a process-wide switch, and this process exposes only these).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mlxring_http_requests",
            "HTTP requests answered by this node, by route, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "mlxring_http_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (whole stream included)",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "mlxring_generations",
            "Generation requests served by this node's head, by how they ended",
            ["finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlxring_prompt_tokens", "Prompt tokens prefilled by the ring", registry=r
        )
        self.generated_tokens = Counter(
            "mlxring_generated_tokens",
            "Tokens the ring sampled (EOS included, as usage.completion_tokens counts them)",
            registry=r,
        )
        self.ttft = Histogram(
            "mlxring_time_to_first_token_seconds",
            "Time from a generation request's arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.per_token = Histogram(
            "mlxring_time_per_output_token_seconds",
            "Time between consecutive tokens of one request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.prefill = RateWindow(RATE_WINDOW_S)
        self.decode = RateWindow(RATE_WINDOW_S)
        r.register(RingCollector(runtime, queue, self.prefill, self.decode))
        ProcessCollector(registry=r)  # CPU, RSS, open fds (Linux only; absent on macOS)

    def request_done(
        self, endpoint: str, method: str, status: int, seconds: float, finish_reason: str | None
    ) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)
        if finish_reason is not None:
            self.generations.labels(finish_reason).inc()

    def timer(self, n_prompt: int, arrived: float) -> TokenTimer:
        return TokenTimer(self, n_prompt, arrived)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if the scraper asks) and its type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class RingCollector(Collector):
    """Ring metrics, read at scrape time from one snapshot of the runtime (the same snapshot
    /cluster/status renders)."""

    def __init__(
        self,
        runtime: Runtime,
        queue: Callable[[], QueueDepth],
        prefill: RateWindow,
        decode: RateWindow,
    ) -> None:
        self.rt = runtime
        self.queue = queue
        self.prefill = prefill
        self.decode = decode

    def collect(self) -> Iterator[Metric]:
        snap = take(self.rt, self.queue())
        yield from self._requests(snap)
        yield from self._prompt_cache(prompt_cache_counts(self.rt.engine))
        yield from self._speculation(self.rt.engine)
        yield from self._ring(snap)
        yield from self._nodes(snap.nodes)
        yield from self._links(snap.links)

    def _requests(self, snap: RingSnapshot) -> Iterator[Metric]:
        yield _gauge("mlxring_requests_running", "Requests generating now", snap.queue.running)
        yield _gauge(
            "mlxring_requests_waiting", "Requests waiting for a generation slot", snap.queue.waiting
        )
        yield _gauge(
            "mlxring_prefill_tokens_per_second",
            f"Prompt tokens prefilled per second over the last {RATE_WINDOW_S:g} s",
            self.prefill.rate(),
        )
        yield _gauge(
            "mlxring_decode_tokens_per_second",
            f"Tokens decoded per second over the last {RATE_WINDOW_S:g} s",
            self.decode.rate(),
        )
        if snap.decode_trip_samples_s:
            yield _quantiles(
                "mlxring_decode_trip_seconds",
                "Head-to-head time of one decode step around the ring (recent steps)",
                snap.decode_trip_samples_s,
            )
        if snap.decode_hop_samples_s:
            yield _quantiles(
                "mlxring_decode_hop_seconds",
                "Network time of one hop of a decode step: its trip less the time it spent "
                "inside processes, per hop (recent steps)",
                snap.decode_hop_samples_s,
            )

    def _prompt_cache(self, counts: PromptCacheCounts | None) -> Iterator[Metric]:
        if counts is None:  # the head's engine runs in another process
            return
        yield CounterMetricFamily(
            "mlxring_prompt_cache_hits",
            "Requests whose prompt started from a kept earlier prompt",
            value=counts.hits,
        )
        yield CounterMetricFamily(
            "mlxring_prompt_cache_misses",
            "Requests that matched a kept prompt a shard no longer held (prefilled in full)",
            value=counts.misses,
        )
        yield CounterMetricFamily(
            "mlxring_prompt_cache_tokens",
            "Prompt tokens reused from kept prompts instead of prefilled",
            value=counts.tokens,
        )

    def _speculation(self, engine: Engine | None) -> Iterator[Metric]:
        if engine is None or not engine.speculative:
            return
        drafted = CounterMetricFamily(
            "mlxring_speculative_drafted_tokens",
            "Tokens drafted (from requests' own text: ngram; by the draft model: draft) and "
            "sent to be verified",
            labels=["kind"],
        )
        accepted = CounterMetricFamily(
            "mlxring_speculative_accepted_tokens",
            "Drafted tokens the model agreed with (each saved a trip around the ring)",
            labels=["kind"],
        )
        # The engine counts every draft; its draft source, those it drafted itself.
        source = engine.drafts
        by_source = (source.drafted, source.accepted) if source is not None else (0, 0)
        drafted.add_metric(["ngram"], engine.drafted - by_source[0])
        accepted.add_metric(["ngram"], engine.accepted - by_source[1])
        if source is not None:
            drafted.add_metric(["draft"], by_source[0])
            accepted.add_metric(["draft"], by_source[1])
        yield drafted
        yield accepted

    def _ring(self, snap: RingSnapshot) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "mlxring_cluster_info",
            "The cluster, its model and its head as this node sees them",
            labels=["cluster", "model", "head"],
        )
        info.add_metric([snap.cluster, snap.model, snap.head], 1)
        yield info
        yield _gauge(
            "mlxring_ring_up",
            "1 while this node's part of the ring can serve (on the head: the last probe came "
            "back around the whole ring)",
            0 if snap.ring_down else 1,
        )
        yield _gauge("mlxring_ring_members", "Live nodes in the ring", len(snap.members))
        if snap.hop_samples_s:
            yield _quantiles(
                "mlxring_ring_hop_seconds",
                "Latency of one hop of the head's probe around the ring (recent probes)",
                snap.hop_samples_s,
            )

    def _nodes(self, nodes: Sequence[NodeRow]) -> Iterator[Metric]:
        labels = ["node"]
        up = GaugeMetricFamily("mlxring_node_up", "1 while the node is reachable", labels=labels)
        member = GaugeMetricFamily(
            "mlxring_node_member", "1 while the node is in the live ring", labels=labels
        )
        start = GaugeMetricFamily(
            "mlxring_node_layer_start", "First layer the node holds", labels=labels
        )
        end = GaugeMetricFamily(
            "mlxring_node_layer_end", "One past the last layer the node holds", labels=labels
        )
        for row in nodes:
            up.add_metric([row.name], 1 if row.reachable else 0)
            member.add_metric([row.name], 1 if row.member else 0)
            if row.planned is not None:
                start.add_metric([row.name], row.planned[0])
                end.add_metric([row.name], row.planned[1])
        yield from (up, member, start, end)

        active = GaugeMetricFamily(
            "mlxring_node_memory_active_bytes",
            "MLX memory in use by the process hosting the node (weights, KV caches, buffers); "
            "other processes' nodes as the head's last probe found them",
            labels=labels,
        )
        peak = GaugeMetricFamily(
            "mlxring_node_memory_peak_bytes",
            "Peak MLX memory of the process hosting the node",
            labels=labels,
        )
        total = GaugeMetricFamily(
            "mlxring_node_memory_total_bytes", "The node's machine memory", labels=labels
        )
        kv_requests = GaugeMetricFamily(
            "mlxring_node_kv_requests", "Requests holding KV caches on the node", labels=labels
        )
        busy = CounterMetricFamily(
            "mlxring_shard_busy_seconds", "Compute time of the node's shard", labels=labels
        )
        steps = CounterMetricFamily(
            "mlxring_shard_steps", "Forward passes run by the node's shard", labels=labels
        )
        cache_bytes = GaugeMetricFamily(
            "mlxring_prompt_cache_bytes",
            "Bytes of kept prompts (the prompt cache) on the node, as the head's last probe "
            "found them",
            labels=labels,
        )
        cache_entries = GaugeMetricFamily(
            "mlxring_prompt_cache_entries",
            "Kept prompts (prompt-cache entries) on the node, as the head's last probe found them",
            labels=labels,
        )
        # Local nodes only: NodeStats carries none of these.
        kv_bytes = GaugeMetricFamily(
            "mlxring_kv_cache_bytes", "Bytes held by the node's KV caches", labels=labels
        )
        mailbox = GaugeMetricFamily(
            "mlxring_shard_mailbox", "Messages waiting for the node's shard", labels=labels
        )
        batched = CounterMetricFamily(
            "mlxring_shard_batched_steps",
            "Forward passes that ran the decode steps of several requests at once",
            labels=labels,
        )
        rows = CounterMetricFamily(
            "mlxring_shard_batched_rows",
            "Request steps run inside batched forward passes",
            labels=labels,
        )
        rejected = CounterMetricFamily(
            "mlxring_link_rejected",
            "Connections or frames the node's listener refused",
            labels=labels,
        )
        for row in nodes:
            n = [row.name]
            # This process's shards are read here; the others' from their last probe report.
            if (report := row.report) is not None:
                cache_bytes.add_metric(n, report.cache_bytes)
                cache_entries.add_metric(n, report.cache_entries)
            st = row.local if row.local is not None else row.report
            if st is None:
                continue
            active.add_metric(n, st.active_bytes)
            peak.add_metric(n, st.peak_bytes)
            total.add_metric(n, st.total_bytes)
            kv_requests.add_metric(n, st.requests)
            busy.add_metric(n, st.busy_s)
            steps.add_metric(n, st.steps)
            if (here := row.local) is not None:
                kv_bytes.add_metric(n, here.kv_bytes)
                mailbox.add_metric(n, here.mailbox)
                batched.add_metric(n, here.batched_steps)
                rows.add_metric(n, here.batched_rows)
                rejected.add_metric(n, here.rejected)
        yield from (active, peak, total, kv_requests, busy, steps, cache_bytes, cache_entries)
        yield from (kv_bytes, mailbox, batched, rows, rejected)

    def _links(self, links: Sequence[LinkRow]) -> Iterator[Metric]:
        labels = ["peer"]
        up = GaugeMetricFamily(
            "mlxring_link_up", "1 while the link to the peer is connected", labels=labels
        )
        reconnects = CounterMetricFamily(
            "mlxring_link_reconnects", "Times the link to the peer was lost", labels=labels
        )
        rtt = GaugeMetricFamily(
            "mlxring_link_rtt_seconds", "Last heartbeat round trip to the peer", labels=labels
        )
        for link in links:
            up.add_metric([link.peer], 1 if link.up else 0)
            reconnects.add_metric([link.peer], link.reconnects)
            rtt.add_metric([link.peer], link.rtt_s)
        yield from (up, reconnects, rtt)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _quantiles(name: str, doc: str, samples: Sequence[float]) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=["quantile"])
    for q in QUANTILES:
        g.add_metric([f"{q:g}"], quantile(samples, q))
    return g
