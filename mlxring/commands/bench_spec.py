"""`mlxring bench --speculative ngram|draft`: one stream's decode with speculative decoding,
against the ring without it and against single-process mlx-lm.

`ngram`: the prompt asks the model to repeat a passage of the bundled corpus (through its chat
template, where it has one), so that the answer quotes its prompt, as an agent editing code
does: the case prompt lookup drafts for; the speculating ring has `[cluster] speculative =
true`. `draft`: the prompt asks for new text (nothing to copy), and the speculating ring has
`[cluster] draft_model` (`--draft-model`; by default the model itself, which drafts what the
model says and so shows the most a draft model can give, and what drafting costs).

The same greedy request goes to two freshly spawned rings, one speculating, one not; decode
tok/s is the streamed answer's tokens after the first over the time they took. The acceptance
rate (drafted tokens the model agreed with) comes from the speculating ring's /metrics, of the
kind measured; the answers of both rings should be the same token for token (`same_text`). A
random-weight model copies nothing: its acceptance says so. The ring drafts with a draft model
only where a draft pass costs well under a step (`DraftModel.pays`), so `draft` also reports
`agreement`: the share of the model's greedy answer (mlx-lm alone) that the draft model gives
as its own greedy token at each position (teacher-forced), what acceptance would be wherever
drafting pays.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import aiohttp

from mlxring.commands.bench import (
    bench_model,
    completion_chunks,
    on_fresh_ring,
    progress,
    refuse_config,
)
from mlxring.log import setup_logging
from mlxring.model.checkpoint import ModelError

PASSAGE_CHARS = 1200  # the passage to repeat: a few hundred tokens


OPEN_ASK = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def copy_prompt(model: Path) -> list[int]:
    """A request to repeat a passage of the corpus, through the model's chat template."""
    corpus = (Path(__file__).parent.parent / "data" / "corpus.txt").read_text()
    passage = corpus[:PASSAGE_CHARS]
    return chat_prompt(model, f"Repeat the following text exactly, word for word:\n\n{passage}")


def chat_prompt(model: Path, ask: str) -> list[int]:
    """`ask` as a user's message through the model's chat template (else as plain text)."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model)
    if tok.has_chat_template:
        messages = [{"role": "user", "content": ask}]
        return list(tok.apply_chat_template(messages, add_generation_prompt=True))
    return list(tok.encode(ask + "\n\n"))


def agreement(model: Path, draft: Path, prompt: list[int], gen: int) -> float:
    """The share of the model's `gen` greedy tokens after `prompt` that the draft model's
    greedy token at the same position (given the text before it) equals, by mlx-lm."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step

    m = mlx_lm.load(str(model))[0]
    answer = [int(t) for t, _ in generate_step(mx.array(prompt), m, max_tokens=gen)]
    d = m if draft == model else mlx_lm.load(str(draft))[0]
    logits = d(mx.array(prompt + answer[:-1])[None])[0, len(prompt) - 1 :]
    guesses = cast(list[int], mx.argmax(logits, axis=-1).tolist())
    return sum(g == t for g, t in zip(guesses, answer, strict=True)) / len(answer)


async def decode(url: str, prompt: list[int], gen: int) -> tuple[float, str]:
    """One greedy streamed answer of at most `gen` tokens, ended where the model ends it (as
    mlx-lm's baseline does: past its end, a model's text copies nothing): its decode tok/s
    and its text."""
    body = {
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": False,
        "cache_prompt": False,
    }
    first = last = 0.0
    text: list[str] = []
    tokens = 0
    timeout = aiohttp.ClientTimeout(total=3600, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async for chunk in completion_chunks(s, url, body):
            if not chunk.get("choices"):
                tokens = int((chunk.get("usage") or {}).get("completion_tokens", 0))
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            text.append(chunk["choices"][0]["text"])
    return (tokens - 1) / (last - first) if last > first else 0.0, "".join(text)


async def counters(url: str, kind: str) -> dict[str, float]:
    """The drafted and accepted tokens of drafts of `kind` (ngram, draft) on /metrics."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        page = await r.text()
    out = {}
    for name in ("drafted", "accepted"):
        series = f'mlxring_speculative_{name}_tokens_total{{kind="{kind}"}}'
        m = re.search(rf"^{re.escape(series)} (\S+)$", page, re.M)
        out[name] = float(m[1]) if m else 0.0
    return out


def ring_decode(
    spec: str, args: argparse.Namespace, work: Path, prompt: list[int], **cluster: Any
) -> tuple[float, str, dict[str, float]]:
    """Decode tok/s (the better of two runs, after a warm-up) on a freshly spawned ring with
    `cluster`'s settings (none: without speculation)."""

    async def run(url: str) -> tuple[float, str, dict[str, float]]:
        await decode(url, prompt, 8)  # warm-up: kernels of the shapes measured
        runs = [await decode(url, prompt, args.gen_tokens) for _ in range(2)]
        return max(r[0] for r in runs), runs[0][1], await counters(url, args.speculative)

    work.mkdir()
    what = "with speculation" if cluster else "without speculation"
    result: tuple[float, str, dict[str, float]] = on_fresh_ring(
        spec, args, work, what, run, **cluster
    )
    return result


def run_speculative(args: argparse.Namespace) -> int:
    setup_logging()
    if refuse_config(args, "--speculative", "with and without speculation"):
        return 2
    try:
        spec, model = bench_model(args)
    except ModelError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        return 2
    if args.speculative == "draft":
        # The model itself where no draft is named: one that surely shares its tokenizer.
        draft = args.draft_model or spec
        prompt = chat_prompt(model, OPEN_ASK)
        cluster: dict[str, Any] = {"draft_model": draft}
    else:
        draft = None
        prompt = copy_prompt(model)
        cluster = {"speculative": True}
    progress("baseline: single-process mlx-lm ...")
    from mlxring.commands.bench import baseline, baseline_dir

    base = baseline(model, prompt, args.gen_tokens)["baseline_decode_tok_s"]
    agrees = None
    if draft is not None:
        progress("the draft model's agreement with the model (mlx-lm) ...")
        agrees = agreement(model, baseline_dir(draft), prompt, args.gen_tokens)
    work = Path(tempfile.mkdtemp(prefix="mlxring-bench-spec-"))
    on, text_on, count = ring_decode(spec, args, work / "on", prompt, **cluster)
    off, text_off, _ = ring_decode(spec, args, work / "off", prompt)
    out: dict[str, Any] = {
        "model": str(model),
        "nodes": args.nodes,
        "speculative": args.speculative,
        "draft_model": draft,
        "draft_is_model": draft == spec,
        "prompt_tokens": len(prompt),
        "gen_tokens": args.gen_tokens,
        "baseline_decode_tok_s": base,
        "ring_decode_tok_s": off,
        "speculative_decode_tok_s": on,
        "ratio_vs_ring": on / off if off else None,
        "ratio_vs_baseline": on / base if base else None,
        "drafted": count["drafted"],
        "accepted": count["accepted"],
        "acceptance": count["accepted"] / count["drafted"] if count["drafted"] else 0.0,
        "agreement": agrees,
        "same_text": text_on == text_off,
        "logs": str(work),
    }
    progress("")
    if args.json:
        print(json.dumps(out))
    else:
        what = "copy" if draft is None else "open"
        print(
            f"{out['model']}, {args.nodes} nodes, {len(prompt)}-token {what} prompt, "
            f"{args.gen_tokens} tokens"
        )
        if draft is not None:
            itself = " (the model itself: an upper bound on acceptance)" if draft == spec else ""
            print(f"draft model: {draft}{itself}, agreement {agrees:.0%}")
        print(f"mlx-lm alone      {base:8.2f} tok/s")
        print(f"ring              {off:8.2f} tok/s")
        print(
            f"ring, speculative {on:8.2f} tok/s  ({out['ratio_vs_ring']:.2f}x the ring, "
            f"acceptance {out['acceptance']:.0%} of {count['drafted']:.0f} drafted)"
        )
    return 0
