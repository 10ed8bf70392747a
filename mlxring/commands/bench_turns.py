"""`mlxring bench --turns N`: a conversation through the ring, with the prompt cache and without.

Turn 1's prompt is `--history-tokens` ids of the bundled corpus (the conversation so far, as
an agent resends it); turn k's is turn k-1's prompt, then the token ids the ring answered it
with, then `--turn-tokens` new ids (a few new lines): a chat client's history as a token-id
`/v1/completions` prompt, so the next prompt starts with exactly what the ring computed. Each
turn streams a greedy answer of `--gen-tokens` tokens, and its time to first token is what the
prompt cache (engine/prefix.py, shard/prefix.py) should shorten: a hit prefills only the
tokens after the longest kept prefix.

The conversation runs twice on rings spawned as bench spawns them: first with
`[cluster] prompt_cache = true`, then the same prompts on a ring with it off. Per turn it reports
the prompt and cached tokens, both TTFTs and their ratio, and the shards' prompt compute
seconds (compute of all steps less that of decode steps, summed over the shards): where a
TTFT does not shrink with the prompt work, the rest is the ring's (HTTP, hops, cache copies).
The answers of both runs should match token for token (the cache is exact); `same_answers`
says whether they did.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from mlxring.commands.bench import (
    baseline_dir,
    bench_model,
    completion_chunks,
    make_prompt,
    node_work,
    on_fresh_ring,
    progress,
    refuse_config,
    settled_status,
)
from mlxring.log import setup_logging
from mlxring.model.checkpoint import ModelError
from mlxring.model.source import cache_dir


@dataclass(frozen=True)
class Answer:
    ttft_s: float
    tokens: tuple[int, ...]  # the answer's token ids
    prompt_tokens: int
    cached_tokens: int  # prompt tokens the prompt cache gave (usage.prompt_tokens_details)


@dataclass(frozen=True)
class Turn:
    prompt_tokens: int
    cached_tokens: int  # with the prompt cache on
    cached_tokens_off: int  # with it off: always 0
    ttft_on_s: float
    ttft_off_s: float
    ratio: float  # ttft_off_s / ttft_on_s
    prefill_compute_on_s: float  # the shards' compute of the turn's prompt, summed
    prefill_compute_off_s: float


def context_needed(turns: int, history: int, gen: int, more: int) -> int:
    """The last turn's prompt and answer: the history, then each turn's answer and the next
    turn's new tokens."""
    return history + (turns - 1) * (gen + more) + gen


def model_context(path: Path) -> int:
    from mlxring.model.sharded import context_length

    return context_length(json.loads((path / "config.json").read_text())) or 0


def turns_model(args: argparse.Namespace, need: int) -> tuple[str, Path]:
    """The model spec and directory: --model as given, else a --family/--preset model made
    with a context of at least `need` tokens. A random model's positions are not trained to
    any length (RoPE has no table), so its config's limit is raised where the preset's is
    short (`small` has 8192; turn 4 at 2048 tokens a turn is past it)."""
    if args.model:
        return args.model, baseline_dir(args.model)
    from mlxring.model.make import PRESETS, make_model

    preset = PRESETS.get(args.preset)
    if preset is None or preset.max_position_embeddings >= need:
        return bench_model(args)  # as plain bench: that model, or make-model's error
    ctx = 1 << (need - 1).bit_length()
    q = f"-q{args.quantize}" if args.quantize else ""
    path = cache_dir() / f"bench-{args.family}-{args.preset}{q}-ctx{ctx}"
    if not (path / "config.json").exists():
        progress(f"making a {args.preset} {args.family} model in {path} ...")
        make_model(path, family=args.family, preset=args.preset, quantize=args.quantize)
        for name, key in (
            ("config.json", "max_position_embeddings"),
            ("tokenizer_config.json", "model_max_length"),
        ):
            data = json.loads((path / name).read_text())
            data[key] = ctx
            (path / name).write_text(json.dumps(data, indent=2) + "\n")
    return str(path), path


class TokenIds:
    """Token ids from the names legacy logprobs give (engine/text.token_name): the API answers
    a completion in text, and a token-id prompt needs the ids the ring sampled."""

    def __init__(self, model: Path) -> None:
        from mlx_lm.utils import load_tokenizer

        from mlxring.engine.text import TokenTexts, token_name

        tok = load_tokenizer(model)
        texts = TokenTexts()
        self._ids: dict[str, int | None] = {}
        for i in range(max(tok.get_vocab().values()) + 1):
            name = token_name(*texts(tok, i))
            self._ids[name] = None if name in self._ids else i  # None: two ids, one name

    def __call__(self, names: Sequence[str]) -> tuple[int, ...]:
        ids = [self._ids.get(n) for n in names]
        bad = [n for n, i in zip(names, ids, strict=True) if i is None]
        if bad:
            raise RuntimeError(f"cannot tell which token ids the ring answered: {bad[:4]}")
        return tuple(i for i in ids if i is not None)


async def answer(
    s: aiohttp.ClientSession, url: str, prompt: list[int], gen: int, ids: TokenIds
) -> Answer:
    """One streamed greedy completion of exactly `gen` tokens, with its tokens' names."""
    body = {
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "logprobs": 0,
    }
    t0 = time.perf_counter()
    first = 0.0
    names: list[str] = []
    usage: dict[str, Any] = {}
    async for chunk in completion_chunks(s, url, body):
        if not chunk.get("choices"):
            usage = chunk.get("usage") or {}
            continue
        first = first or time.perf_counter()
        names += (chunk["choices"][0].get("logprobs") or {}).get("tokens", [])
    tokens = ids(names)
    if len(tokens) != gen or usage.get("completion_tokens") != gen:
        raise RuntimeError(f"asked for {gen} tokens, got {len(tokens)} ({usage})")
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
    return Answer(first - t0, tokens, int(usage["prompt_tokens"]), cached)


def prefill_compute(
    before: dict[str, tuple[float, int, float]], after: dict[str, tuple[float, int, float]]
) -> float:
    """The shards' compute seconds of prompt chunks between two statuses (all steps' less
    the decode steps')."""
    return sum(
        (after[n][2] - before[n][2]) - (after[n][0] - before[n][0])
        for n in set(before) & set(after)
    )


async def conversation(
    url: str,
    history: list[list[int]],
    gen: int,
    ids: TokenIds,
    warm: list[int],
    prompts: list[list[int]] | None = None,
) -> tuple[list[list[int]], list[Answer], list[float]]:
    """The turns' prompts, answers and prompt compute seconds. With `prompts`, those prompts
    as they are (the run without the cache replays the run with it)."""
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=900)
    sent: list[list[int]] = []
    answers: list[Answer] = []
    compute: list[float] = []
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await answer(s, url, warm, 4, ids)  # the first pass of a shape builds its kernels
        before = node_work(await settled_status(s, url, ""))
        for k, new in enumerate(history):
            if prompts is not None:
                prompt = prompts[k]
            else:
                prompt = sent[-1] + list(answers[-1].tokens) + new if sent else list(new)
            progress(f"turn {k + 1}/{len(history)}: {len(prompt)} prompt tokens ...")
            answers.append(await answer(s, url, prompt, gen, ids))
            sent.append(prompt)
            after = node_work(await settled_status(s, url, ""))
            compute.append(prefill_compute(before, after))
            before = after
    return sent, answers, compute


def ring_run(spec: str, args: argparse.Namespace, cache: bool, work: Path, run: Any) -> Any:
    """`run(url)` against a freshly spawned ring with the prompt cache on or off."""
    what = f"prompt cache {'on' if cache else 'off'}"
    return on_fresh_ring(spec, args, work, what, run, prompt_cache=cache)


def run_turns(args: argparse.Namespace) -> int:
    setup_logging()
    if refuse_config(args, "--turns", "with and without the prompt cache"):
        return 2
    n, h, gen, more = args.turns, args.history_tokens, args.gen_tokens, args.turn_tokens
    need = context_needed(n, h, gen, more)
    try:
        spec, model = turns_model(args, need)
    except ModelError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        return 2
    if model_context(model) and model_context(model) < need:
        print(
            f"mlxring: {model}'s context of {model_context(model)} tokens is shorter than "
            f"the last turn's {need}",
            file=sys.stderr,
        )
        return 2
    corpus = make_prompt(model, h + (n - 1) * more + 64)
    # Turn 1 brings the history; each later turn a few new lines (`--turn-tokens`).
    history = [corpus[:h]] + [corpus[h + k * more : h + (k + 1) * more] for k in range(n - 1)]
    warm = corpus[-64:][::-1]  # shares no start with the conversation: no cache hit
    ids = TokenIds(model)
    work = Path(tempfile.mkdtemp(prefix="mlxring-bench-turns-"))
    (work / "on").mkdir()
    (work / "off").mkdir()

    async def on(url: str) -> tuple[list[list[int]], list[Answer], list[float]]:
        return await conversation(url, history, gen, ids, warm)

    prompts, with_cache, compute_on = ring_run(spec, args, True, work / "on", on)

    async def off(url: str) -> tuple[list[list[int]], list[Answer], list[float]]:
        return await conversation(url, history, gen, ids, warm, prompts)

    _, without, compute_off = ring_run(spec, args, False, work / "off", off)
    turns = [
        Turn(
            prompt_tokens=a.prompt_tokens,
            cached_tokens=a.cached_tokens,
            cached_tokens_off=b.cached_tokens,
            ttft_on_s=a.ttft_s,
            ttft_off_s=b.ttft_s,
            ratio=b.ttft_s / a.ttft_s,
            prefill_compute_on_s=c_on,
            prefill_compute_off_s=c_off,
        )
        for a, b, c_on, c_off in zip(with_cache, without, compute_on, compute_off, strict=True)
    ]
    out: dict[str, Any] = {
        "model": str(model),
        "nodes": args.nodes,
        "turns": [asdict(t) for t in turns],
        "history_tokens": h,
        "turn_tokens": more,
        "gen_tokens": gen,
        "prefill_chunk": args.prefill_chunk,
        "last_turn_ttft_ratio": turns[-1].ratio,
        "same_answers": [a.tokens for a in with_cache] == [b.tokens for b in without],
        "logs": str(work),
    }
    progress("")
    if args.json:
        print(json.dumps(out))
    else:
        print_turns(out)
    return 0


def print_turns(out: dict[str, Any]) -> None:
    print(
        f"{out['model']}, {out['nodes']} nodes, {out['history_tokens']} tokens of history, "
        f"{out['turn_tokens']} new tokens a turn, "
        f"{out['gen_tokens']}-token answers"
    )
    print(
        f"{'turn':>4} {'prompt':>7} {'cached':>7} {'TTFT on':>9} {'TTFT off':>9} {'ratio':>6}"
        f" {'compute on':>11} {'compute off':>11}"
    )
    for k, t in enumerate(out["turns"], 1):
        print(
            f"{k:>4} {t['prompt_tokens']:>7} {t['cached_tokens']:>7} "
            f"{t['ttft_on_s']:>8.2f}s {t['ttft_off_s']:>8.2f}s {t['ratio']:>6.2f} "
            f"{t['prefill_compute_on_s']:>10.2f}s {t['prefill_compute_off_s']:>10.2f}s"
        )
    print(
        f"last turn's TTFT ratio (off / on): {out['last_turn_ttft_ratio']:.2f}; "
        f"same answers: {out['same_answers']}; logs: {out['logs']}"
    )
