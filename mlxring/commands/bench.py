"""`mlxring bench`: the ring against single-process mlx-lm, on the same weights in the same run.

Measures mlx-lm (`stream_generate`, whole model in this process) first, frees it, then starts
(`--nodes N` local node processes) or attaches to (`--config`) a ring and drives it through its
OpenAI API with streaming requests: prefill tok/s, decode tok/s, time to first token, per-hop
latency (network time of decode steps, mlxring/ring/hoptime.py), and aggregate decode tok/s at
several concurrencies, with what bounds each: how much of the time every shard computed, and
how many requests a decode pass carried.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mlxring.commands.local_ring import head_url, spawn_ring, stop, wait_healthy
from mlxring.config import Config, load_config
from mlxring.log import setup_logging
from mlxring.model.checkpoint import ModelError
from mlxring.model.source import cache_dir


@dataclass(frozen=True)
class StreamResult:
    ttft_s: float
    tokens: int  # tokens generated (the usage count: one SSE chunk may carry several)
    decode_s: float  # first chunk to last chunk


def progress(msg: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\x1b[2K{msg}")
        sys.stderr.flush()


def bench_model(args: argparse.Namespace) -> tuple[str, Path]:
    """The model spec the ring is given, and the directory mlx-lm loads for the baseline: any
    spec a nodes.toml accepts (the demo, a packaged model, a directory, a Hugging Face repo),
    else a random model made from --family/--preset."""
    if args.model:
        return args.model, baseline_dir(args.model)
    from mlxring.model.make import make_model

    q = f"-q{args.quantize}" if args.quantize else ""
    x = f"-x{args.scale}" if args.scale is not None else ""
    path = cache_dir() / f"bench-{args.family}-{args.preset}{q}{x}"
    if not (path / "config.json").exists():
        progress(f"making a {args.preset} {args.family} model in {path} ...")
        make_model(
            path, family=args.family, preset=args.preset, quantize=args.quantize, scale=args.scale
        )
    return str(path), path


def baseline_dir(spec: str) -> Path:
    """The mlx-lm directory of a model spec on this machine: the demo and packaged models are
    made or fetched into the cache as a node does, a GGUF file converted whole; a Hugging Face
    repo is downloaded whole."""
    from mlxring.model import source

    if source.is_gguf(spec):  # every layer converted into the directory the nodes use
        meta = source.resolve_metadata(spec)
        config = json.loads((meta / "config.json").read_text())
        return source.fetch_shard(spec, meta, 0, config["num_hidden_layers"], 0)
    if source.is_local(spec):
        return source.resolve_metadata(spec)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(spec))


def make_prompt(model: Path, n: int) -> list[int]:
    """`n` token ids of ordinary text (no special tokens), the same every run."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    text = (Path(__file__).parent.parent / "data" / "corpus.txt").read_text()
    ids = list(tok.encode(text))
    while len(ids) < n:
        ids += ids
    return ids[:n]


def baseline(model: Path, prompt: list[int], gen_tokens: int) -> dict[str, float]:
    """mlx-lm alone: prefill tok/s of the prompt and decode tok/s of `gen_tokens`."""
    import mlx.core as mx
    import mlx_lm

    m, tok = mlx_lm.load(str(model))[:2]
    # Warm-up at the measured shapes: the first pass of a new shape builds its kernels.
    for _ in mlx_lm.stream_generate(m, tok, prompt, max_tokens=4):
        pass
    prefill, decode = [], []
    for _ in range(2):
        last = None
        for r in mlx_lm.stream_generate(m, tok, prompt, max_tokens=gen_tokens):
            last = r
        assert last is not None
        prefill.append(last.prompt_tps)
        decode.append(last.generation_tps)
    del m
    gc.collect()
    mx.clear_cache()
    return {"baseline_prefill_tok_s": max(prefill), "baseline_decode_tok_s": max(decode)}


async def completion_chunks(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """A streamed `/v1/completions` request's chunks as they come; an error says so."""
    async with session.post(f"{url}/v1/completions", json=body, headers=headers or {}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"completion failed: {resp.status} {await resp.text()}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            yield chunk


def spawn_for(
    spec: str, args: argparse.Namespace, work: Path, **cluster: Any
) -> tuple[Config, list[subprocess.Popen[bytes]]]:
    """spawn_ring with the command line's node settings; `cluster`: prompt_cache, speculative,
    draft_model."""
    return spawn_ring(
        spec,
        args.nodes,
        args.prefill_chunk,
        work,
        args.one_process,
        [g.strip() for g in args.gpus.split(",") if g.strip()],
        args.busy_poll,
        args.gates == "on",
        args.convoys,
        **cluster,
    )


def on_fresh_ring(
    spec: str, args: argparse.Namespace, work: Path, what: str, run: Any, **cluster: Any
) -> Any:
    """`run(url)` (a coroutine function) against a ring spawned for it with `cluster`'s
    settings (`spawn_for`), stopped after; `what` names the ring in the progress line."""
    config, procs = spawn_for(spec, args, work, **cluster)
    try:
        url = head_url(config)
        progress(f"waiting for the ring at {url} ({what}) ...")
        asyncio.run(wait_healthy(url, 600, procs, work))
        return asyncio.run(run(url))
    finally:
        stop(procs)


def refuse_config(args: argparse.Namespace, option: str, rings: str) -> bool:
    """Whether `option` was given with --config, said in one line: it spawns its own rings."""
    if args.config:
        print(
            f"mlxring: {option} spawns its own rings ({rings}); leave out --config",
            file=sys.stderr,
        )
    return bool(args.config)


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    prompt: list[int],
    max_tokens: int,
    api_key: str = "",
    times: list[float] | None = None,
) -> StreamResult:
    """One streamed completion; `times` gets every chunk's arrival time as it comes."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        # Every run prefills the whole prompt: the same prompt again would start from the
        # ring's prompt cache (bench --turns measures that).
        "cache_prompt": False,
    }
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for chunk in completion_chunks(session, url, body, headers):
        if not chunk.get("choices"):
            # Count tokens from usage, not chunks: text held back (a partial UTF-8
            # character, a possible stop string) rides on a later chunk.
            tokens = int((chunk.get("usage") or {}).get("completion_tokens", 0))
            continue
        now = time.perf_counter()
        if not first:
            first = now
        last = now
        if times is not None:
            times.append(now)
    if not tokens:
        raise RuntimeError("the stream ended without a usage chunk")
    return StreamResult(first - t0, tokens, last - first)


async def prompt_during_decode(
    s: aiohttp.ClientSession, url: str, prompt: list[int], ttft: float, decode: float, api_key: str
) -> dict[str, float | None]:
    """A long prompt arriving while another stream decodes: the running stream's usual gap
    between chunks, its longest gap while the prompt prefills, and the prompt's TTFT."""
    times: list[float] = []
    budget = min(2048, int(3 * ttft * decode) + 64)  # enough tokens to outlast the prefill
    running = asyncio.create_task(stream_completion(s, url, prompt[:16], budget, api_key, times))
    while len(times) < 4 and not running.done():
        await asyncio.sleep(0.005)
    t0 = time.perf_counter()
    long = await stream_completion(s, url, prompt, 1, api_key)
    t1 = time.perf_counter()
    # The running stream's first chunk after the prompt's closes the gap it may be stuck in.
    while times and times[-1] < t1 and not running.done() and time.perf_counter() - t1 < 600:
        await asyncio.sleep(0.005)
    running.cancel()
    (outcome,) = await asyncio.gather(running, return_exceptions=True)
    if isinstance(outcome, Exception):  # the stream failed (a cancel is not an Exception)
        raise outcome
    gaps = list(zip(times, times[1:], strict=False))
    usual = [b - a for a, b in gaps if b <= t0]
    during = [b - a for a, b in gaps if b > t0 and a < t1]
    return {
        "decode_gap_ms": 1000 * statistics.median(usual) if usual else None,
        "decode_gap_ms_during_prefill": 1000 * max(during) if during else None,
        "ttft_s_during_decode": long.ttft_s,
    }


async def ring_status(s: aiohttp.ClientSession, url: str, api_key: str) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with s.get(f"{url}/cluster/status", headers=headers) as resp:
        return dict(await resp.json())


async def settled_status(s: aiohttp.ClientSession, url: str, api_key: str) -> dict[str, Any]:
    """/cluster/status once the nodes' counters have caught up (they ride on the probe)."""
    await asyncio.sleep(1.2)
    return await ring_status(s, url, api_key)


def node_work(status: dict[str, Any]) -> dict[str, tuple[float, int, float]]:
    """Each node's shard compute seconds and steps of decode so far, and its compute seconds
    of all steps."""
    return {
        n["name"]: (
            float(n["decode_busy_s"]),
            int(n["decode_steps"]),
            float(n["busy_s"]),
        )
        for n in status.get("nodes", [])
        if all(n.get(k) is not None for k in ("decode_busy_s", "decode_steps", "busy_s"))
    }


def pct(xs: Sequence[float], p: float) -> float | None:
    """The p-th percentile; None without samples (say, no network hops in one process)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))] if s else None


async def ring_bench(
    url: str, prompt: list[int], gen_tokens: int, levels: list[int], api_key: str
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        # Warm-up at the measured shapes: the first pass of a new shape builds its kernels.
        await stream_completion(s, url, prompt, 4, api_key)
        progress("ring: prefill and time to first token ...")
        warm = node_work(await settled_status(s, url, api_key))
        prefill = [await stream_completion(s, url, prompt, 1, api_key) for _ in range(2)]
        ttft = min(r.ttft_s for r in prefill)
        prefilled = node_work(await settled_status(s, url, api_key))
        # Mean compute time of the prompt on each shard (its chunks and its last token's step,
        # as in mlx-lm's prompt time). The rest of a TTFT is HTTP, hops, copies and hand-offs;
        # it reads negative where shards overlapped (one's last-token step, the next's chunk).
        prompt_ms = {
            n: 1000 * (prefilled[n][2] - warm[n][2]) / len(prefill)
            for n in set(warm) & set(prefilled)
        }
        progress("ring: single-stream decode ...")
        single = [await stream_completion(s, url, prompt, gen_tokens, api_key) for _ in range(2)]
        decode = max((r.tokens - 1) / r.decode_s for r in single if r.decode_s > 0)
        status = await settled_status(s, url, api_key)
        after = node_work(status)
        # The network time of each hop of those decode steps, as the head measured it.
        ring = status.get("ring") or {}
        hops = [h * 1e6 for h in ring.get("decode_hop_samples_s", [])[-2 * (gen_tokens - 1) :]]
        progress("ring: a long prompt while a stream decodes ...")
        interleave = await prompt_during_decode(s, url, prompt, ttft, decode, api_key)
        # Mean compute time of one decode step on each shard during the single streams (a
        # step built ahead counts from its input's arrival). What the ring spends per token
        # beyond the sum is hops, sync, Python around the compute, and any building ahead that
        # did not find a spare core.
        step_ms = {
            n: 1000 * (after[n][0] - prefilled[n][0]) / max(1, after[n][1] - prefilled[n][1])
            for n in set(prefilled) & set(after)
        }
        aggregate, busy, batch = {}, {}, {}
        short = prompt[: max(16, len(prompt) // 4)]
        await stream_completion(s, url, short, 4, api_key)  # its shape's kernels, built once
        before = node_work(await settled_status(s, url, api_key))
        for c in levels:
            progress(f"ring: {c} concurrent streams ...")
            t0 = time.perf_counter()
            rs = await asyncio.gather(
                *(stream_completion(s, url, short, gen_tokens, api_key) for _ in range(c))
            )
            wall = time.perf_counter() - t0
            aggregate[str(c)] = sum(r.tokens for r in rs) / wall
            after = node_work(await settled_status(s, url, api_key))
            # How much of the wall time each shard computed, and how many requests a decode
            # step carried: what bounds the aggregate (compute, or the ring between steps).
            busy[str(c)] = {
                n: (after[n][2] - before[n][2]) / wall for n in set(before) & set(after)
            }
            batch[str(c)] = {
                n: sum(r.tokens for r in rs) / max(1, after[n][1] - before[n][1])
                for n in set(before) & set(after)
            }
            before = after
        await asyncio.sleep(2.0)  # let idle probes measure the hops
        probes = [
            h * 1e6
            for h in ((await ring_status(s, url, api_key)).get("ring") or {}).get(
                "hop_samples_s", []
            )
        ]
    return {
        "shard_step_ms": step_ms,
        "ring_overhead_ms_per_token": 1000 / decode - sum(step_ms.values()),
        "shard_prefill_ms": prompt_ms,
        "ring_prefill_overhead_ms": 1000 * statistics.mean(r.ttft_s for r in prefill)
        - sum(prompt_ms.values()),
        "ring_prefill_tok_s": len(prompt) / ttft,
        "ring_decode_tok_s": decode,
        "ttft_s": ttft,
        "hop_us_p50": pct(hops, 50),
        "hop_us_p99": pct(hops, 99),
        # Probes pass an idle ring, where a process must first wake up: slower than a hop of
        # a running generation.
        "probe_hop_us_p50": pct(probes, 50),
        "aggregate_tok_s": aggregate,
        "aggregate_shard_busy": busy,
        "aggregate_requests_per_step": batch,
        **interleave,
    }


def run(args: argparse.Namespace) -> int:
    if args.turns:  # a conversation, with the prompt cache and without
        from mlxring.commands.bench_turns import run_turns

        return run_turns(args)
    if args.speculative:  # one stream with speculative decoding and without
        from mlxring.commands.bench_spec import run_speculative

        return run_speculative(args)
    # Log lines (say, a packaged model's first fetch) go to stderr: stdout is --json's alone.
    setup_logging()
    levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        spec: str | None = None
        if args.config:
            config = load_config(args.config)
            model = baseline_dir(args.model) if args.model else None
            api_key = config.api.api_key
        else:
            spec, model = bench_model(args)
            api_key = ""
        out: dict[str, Any] = {
            "one_process": bool(args.one_process),
            "nodes": args.nodes if not args.config else len(config.nodes),
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
        }
        if model is not None:
            out["model"] = str(model)
            prompt = make_prompt(model, args.prompt_tokens)
            progress("baseline: single-process mlx-lm ...")
            out.update(baseline(model, prompt, args.gen_tokens))
        else:
            prompt = list(range(100, 100 + args.prompt_tokens))
        if not args.config:
            assert spec is not None
            work = Path(tempfile.mkdtemp(prefix="mlxring-bench-"))
            gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
            config, procs = spawn_for(spec, args, work)
            out["gpus"] = gpus
            out["busy_poll"] = args.busy_poll
            out["gates"] = args.gates
            out["convoys"] = args.convoys
            out["logs"] = str(work)
        url = head_url(config)
        progress(f"waiting for the ring at {url} ...")
        asyncio.run(wait_healthy(url, 600, procs, Path(out["logs"]) if procs else None))
        out.update(asyncio.run(ring_bench(url, prompt, args.gen_tokens, levels, api_key)))
        if procs and model is not None:
            # Again once the ring is gone: a machine's slow spell during one baseline would
            # flatter the ring. The ratios use the better of the two.
            stop(procs)
            progress("baseline again: single-process mlx-lm ...")
            again = baseline(model, prompt, args.gen_tokens)
            for k, v in again.items():
                out[f"{k}_runs"] = [out[k], v]
                out[k] = max(out[k], v)
    except ModelError as e:  # a model that cannot be had here: one line, as `mlxring node` says it
        print(f"mlxring: {e}", file=sys.stderr)
        return 2
    finally:
        stop(procs)
    if "baseline_decode_tok_s" in out:
        out["decode_ratio"] = out["ring_decode_tok_s"] / out["baseline_decode_tok_s"]
        out["prefill_ratio"] = out["ring_prefill_tok_s"] / out["baseline_prefill_tok_s"]
    progress("")
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


def print_table(out: dict[str, Any]) -> None:
    def row(k: str, v: Any) -> None:
        print(f"{k:>24}  {v:.2f}" if isinstance(v, float) else f"{k:>24}  {v}")

    for k, v in out.items():
        if isinstance(v, dict):
            for sub, t in v.items():
                row(f"{k}@{sub}", t)
        elif isinstance(v, list) and all(isinstance(x, float) for x in v):
            row(k, " / ".join(f"{x:.2f}" for x in v))
        else:
            row(k, v)
