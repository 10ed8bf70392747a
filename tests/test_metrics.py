"""`GET /metrics` against a real ring of tiny models: the exposition parses with prometheus_client's
own parsers, request counters match the requests made, token counters match the usage the API
answered, live gauges follow a request in flight, and the key guards it like the other data."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from mlxring.api.metrics import Metrics, QueueDepth, RateWindow, quantile
from mlxring.config import load_config
from mlxring.ring.runtime import Runtime

from .ringutil import local_ring, serve_api, tiny_model, wait_for, write_valid_config

MODEL = tiny_model("qwen3")
MESSAGES = [{"role": "user", "content": "Count the hops around the ring."}]
FIRST = [(7 * i + 3) % 200 + 20 for i in range(40)]  # a prompt of 40 token ids
MORE = [31, 41, 59, 26, 53, 58, 97, 93]  # what the next one adds to it
Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse(text: str) -> Samples:
    """{sample name: {labels: value}}; the parser raises on anything malformed."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def per_node(samples: Samples, name: str) -> dict[str, float]:
    return {dict(k)["node"]: v for k, v in samples.get(name, {}).items()}


async def scrape(s: aiohttp.ClientSession, url: str, **headers: str) -> Samples:
    async with s.get(f"{url}/metrics", headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.content_type == "text/plain"
        return parse(await r.text())


async def post(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post(url, json=body) as r:
        return r.status, await r.json()


async def stream_usage(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, int]:
    usage: dict[str, int] = {}
    async with s.post(
        url, json={**body, "stream": True, "stream_options": {"include_usage": True}}
    ) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                usage = event.get("usage") or usage
    return usage


async def test_metrics_count_requests_tokens_and_read_the_ring(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 3)
    async with (
        local_ring(cfg) as rt,
        serve_api(rt) as url,
        aiohttp.ClientSession() as s,
    ):
        chat, completions = f"{url}/v1/chat/completions", f"{url}/v1/completions"
        usages = []
        status, body = await post(s, chat, {"messages": MESSAGES, "max_tokens": 7})
        assert status == 200
        usages.append(body["usage"])
        usages.append(await stream_usage(s, chat, {"messages": MESSAGES, "max_tokens": 5}))
        status, body = await post(s, completions, {"prompt": "A ring of Macs", "max_tokens": 9})
        assert status == 200
        usages.append(body["usage"])
        status, _ = await post(s, chat, {"messages": MESSAGES, "temperature": 7})
        assert status == 400

        m = await scrape(s, url)
        requests = "mlxring_http_requests_total"
        assert value(m, requests, endpoint="/v1/chat/completions", method="POST", status="200") == 2
        assert value(m, requests, endpoint="/v1/completions", method="POST", status="200") == 1
        assert value(m, requests, endpoint="/v1/chat/completions", method="POST", status="400") == 1
        assert sum(m[requests].values()) == 4  # the scrape itself is counted once it is answered
        completion = sum(u["completion_tokens"] for u in usages)
        assert value(m, "mlxring_generated_tokens_total") == completion
        assert value(m, "mlxring_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
        assert sum(m["mlxring_generations_total"].values()) == 3
        assert value(m, "mlxring_time_to_first_token_seconds_count") == 3
        assert value(m, "mlxring_time_per_output_token_seconds_count") == completion - 3
        assert value(m, "mlxring_time_to_first_token_seconds_bucket", le="+Inf") == 3
        assert value(m, "mlxring_decode_tokens_per_second") > 0
        assert value(m, "mlxring_prefill_tokens_per_second") > 0
        assert value(m, "mlxring_requests_running") == 0
        assert value(m, "mlxring_requests_waiting") == 0
        assert value(m, "mlxring_ring_up") == 1
        assert value(m, "mlxring_ring_members") == 3
        assert value(m, "mlxring_ring_hop_seconds", quantile="0.5") > 0
        assert value(m, "mlxring_decode_trip_seconds", quantile="0.9") > 0
        info = dict(next(iter(m["mlxring_cluster_info"])))
        assert info == {"cluster": "test", "model": rt.model_name, "head": "n0"}

        names = {"n0", "n1", "n2"}
        assert per_node(m, "mlxring_node_up") == dict.fromkeys(names, 1)
        layout = rt.layout
        assert per_node(m, "mlxring_node_layer_start") == {n: r[0] for n, r in layout.items()}
        assert per_node(m, "mlxring_node_layer_end") == {n: r[1] for n, r in layout.items()}
        for name in (
            "mlxring_node_memory_active_bytes",
            "mlxring_node_memory_peak_bytes",
            "mlxring_node_memory_total_bytes",
            "mlxring_shard_busy_seconds_total",
            "mlxring_shard_steps_total",
        ):
            got = per_node(m, name)
            assert set(got) == names and all(v > 0 for v in got.values()), (name, got)
        steps = per_node(m, "mlxring_shard_steps_total")
        assert steps == {n: node.actor.steps for n, node in rt.nodes.items()}
        assert set(per_node(m, "mlxring_shard_batched_steps_total")) == names

        # While a request generates: it runs, holds KV caches on every node, and they are freed
        # once it ends.
        body = {"prompt": "Hold on", "max_tokens": 3000, "stream": True, "ignore_eos": True}
        async with s.post(completions, json=body) as held:
            await held.content.readuntil(b"\n\n")
            live = await scrape(s, url)
            assert value(live, "mlxring_requests_running") == 1
            assert per_node(live, "mlxring_node_kv_requests") == dict.fromkeys(names, 1)
            kv = per_node(live, "mlxring_kv_cache_bytes")
            assert set(kv) == names and all(v > 0 for v in kv.values()), kv
        await wait_for(lambda: not any(n.actor.requests for n in rt.nodes.values()), 10)
        for _ in range(100):  # the hung-up request's slot is freed as its handler unwinds
            after = await scrape(s, url)
            if value(after, "mlxring_requests_running") == 0:
                break
            await asyncio.sleep(0.05)
        assert value(after, "mlxring_requests_running") == 0
        assert per_node(after, "mlxring_kv_cache_bytes") == dict.fromkeys(names, 0)

        # Two prompts starting alike: the second starts from what the first left on the shards.
        greedy = {"max_tokens": 8, "temperature": 0}
        status, body = await post(s, completions, {"prompt": FIRST, **greedy})
        assert status == 200
        status, body = await post(s, completions, {"prompt": FIRST + MORE, **greedy})
        assert status == 200
        reused = body["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert reused == len(FIRST)
        # Each node's prompt cache, once a probe has brought the nodes' reports back.
        monitor = rt.monitor
        assert monitor is not None
        await wait_for(
            lambda: (
                len(monitor.stats) == 3
                and all(st.cache_entries > 0 for st in monitor.stats.values())
            ),
            10,
        )
        cached = await scrape(s, url)
        hits = value(cached, "mlxring_prompt_cache_hits_total")
        assert hits - value(after, "mlxring_prompt_cache_hits_total") == 1
        tokens = value(cached, "mlxring_prompt_cache_tokens_total")
        assert tokens - value(after, "mlxring_prompt_cache_tokens_total") == reused
        assert value(cached, "mlxring_prompt_cache_misses_total") == 0
        cache_bytes = per_node(cached, "mlxring_prompt_cache_bytes")
        assert set(cache_bytes) == names and all(v > 0 for v in cache_bytes.values()), cache_bytes
        entries = per_node(cached, "mlxring_prompt_cache_entries")
        assert set(entries) == names and all(v > 0 for v in entries.values()), entries


async def test_metrics_need_the_key_and_speak_openmetrics(tmp_path: Path) -> None:
    cfg = write_valid_config(tmp_path, MODEL, 2, api='api_key = "sekrit"')
    async with local_ring(cfg) as rt, serve_api(rt) as url, aiohttp.ClientSession() as s:
        async with s.get(f"{url}/metrics") as r:
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sekrit"}
        m = await scrape(s, url, **auth)
        assert value(m, "mlxring_ring_up") == 1
        # The 401 was counted too, under its route.
        assert value(
            m, "mlxring_http_requests_total", endpoint="/metrics", method="GET", status="401"
        )
        accept = "application/openmetrics-text; version=1.0.0"
        async with s.get(f"{url}/metrics", headers={**auth, "Accept": accept}) as r:
            assert r.status == 200 and r.content_type == "application/openmetrics-text"
            families = {f.name for f in openmetrics_families(await r.text())}
        assert {"mlxring_http_requests", "mlxring_node_up", "mlxring_shard_busy_seconds"} <= (
            families
        )
        assert rt.engine is not None


async def test_each_runtime_has_its_own_registry(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    # Not started: a scrape must work before the ring forms, too.
    rt_a = Runtime(load_config(write_valid_config(a_dir, MODEL, 2)), ["n0", "n1"])
    rt_b = Runtime(load_config(write_valid_config(b_dir, MODEL, 2)), ["n0"])
    a = Metrics(rt_a, lambda: QueueDepth(1, 2))
    b = Metrics(rt_b, lambda: QueueDepth(0, 0))
    a.request_done("/v1/completions", "POST", 200, 0.5, "stop")
    a.timer(10, 0.0).token()
    ma, mb = parse(a.render()[0].decode()), parse(b.render()[0].decode())
    assert value(ma, "mlxring_generated_tokens_total") == 1
    assert value(mb, "mlxring_generated_tokens_total") == 0
    assert "mlxring_http_requests_total" not in mb
    assert value(ma, "mlxring_requests_waiting") == 2
    assert value(ma, "mlxring_ring_up") == 0  # not formed yet
    assert per_node(mb, "mlxring_node_up") == {"n0": 0, "n1": 0}  # no shard, no link yet
    assert "mlxring_prompt_cache_hits_total" not in ma  # no head's engine in this process yet


def test_rate_window_and_quantiles() -> None:
    now = [100.0]

    def clock() -> float:
        return now[0]

    w = RateWindow(10.0, clock)
    assert w.rate() == 0
    now[0] += 0.2
    w.add(50)
    assert w.rate() == 50  # under a second old: divided by one second, not 0.2
    now[0] += 4.8
    w.add(50)
    assert w.rate() == 20  # 100 tokens over the 5 s the node has been up
    now[0] += 8
    assert w.rate() == 5  # the first event left the window
    now[0] += 10
    assert w.rate() == 0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0], 0.99) == 1.0
    assert quantile([float(i) for i in range(101)], 0.9) == 90.0
