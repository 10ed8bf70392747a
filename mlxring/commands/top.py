"""`mlxring top`: a live terminal view of the ring, redrawn in place from /cluster/status.

Nodes in ring order with their layers, up/down, a memory bar (MLX active memory over the
machine's memory), their share of compute time and steps per second, the requests holding
KV caches there and the prompt cache they keep (bytes and entries); above them the ring's tokens
per second, requests in flight, the head's prompt-cache hits, and any long-lived task of a node
that is failing. Shares and rates are deltas over the last few seconds of
refreshes; the first frame (and `--once`) shows what the status itself reports (the head's
shares over its last few seconds).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from mlxring.commands.status import cache_hits, fetch_status, fit, prompt_cache, size, task_lines
from mlxring.config import Config, load_config_or_exit

# Rates are taken against the oldest refresh this many seconds back: remote nodes' busy time
# and steps arrive with the head's probe once a heartbeat, so a shorter span would jitter.
RATE_SPAN_S = 5.0
HOME, CLEAR_LINE, CLEAR_DOWN, CLEAR_SCREEN = "\x1b[H", "\x1b[K", "\x1b[J", "\x1b[2J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
GREEN, RED, DIM, BOLD, RESET = "\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


@dataclass(frozen=True)
class Sample:
    """One /cluster/status answer and when it came (time.monotonic())."""

    at: float
    status: dict[str, Any]


@dataclass(frozen=True)
class Style:
    color: bool
    bar_width: int

    def paint(self, text: str, code: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _nodes(s: Sample) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in s.status.get("nodes") or [] if isinstance(n, dict)}


def _rate(
    prev: Sample | None, cur: Sample, value: Callable[[Sample], float | None]
) -> float | None:
    """The per-second rate of a counter between two samples; None without both, or across a
    reset (a node restarted, the head re-planned)."""
    if prev is None or cur.at - prev.at < 0.2:
        return None
    a, b = value(prev), value(cur)
    if a is None or b is None or b < a:
        return None
    return (b - a) / (cur.at - prev.at)


def node_value(name: str, key: str) -> Callable[[Sample], float | None]:
    return lambda s: _num(_nodes(s).get(name, {}).get(key))


def busy_share(prev: Sample | None, cur: Sample, name: str) -> float | None:
    """A node's share of compute time: busy_s delta over wall time between the two samples,
    else the share the status reports."""
    rate = _rate(prev, cur, node_value(name, "busy_s"))
    return min(1.0, rate) if rate is not None else node_value(name, "busy_share")(cur)


def tokens_per_s(prev: Sample | None, cur: Sample) -> float | None:
    rate = _rate(
        prev, cur, lambda s: _num((s.status.get("requests") or {}).get("tokens_generated"))
    )
    if rate is not None:
        return rate
    return _num((cur.status.get("requests") or {}).get("tokens_per_s"))


def bar(used: float | None, total: float | None, width: int) -> str:
    if used is None or not total:
        return "[" + "?" * width + "]"
    filled = max(0, min(width, round(width * used / total)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _pct(x: float | None) -> str:
    return f"{x:.0%}" if x is not None else "-"


def render(cur: Sample, prev: Sample | None, style: Style) -> list[str]:
    """One frame, as lines."""
    st = cur.status
    ring = st.get("ring") or {}
    nodes = st.get("nodes") or []
    up = sum(1 for n in nodes if n.get("up"))
    state = (
        style.paint("up", GREEN)
        if ring.get("ok")
        else style.paint(f"DOWN ({ring.get('reason')})", RED)
    )
    hop = _num(ring.get("hop_ms"))
    decode_hop = _num(ring.get("decode_hop_ms"))
    lines = [
        style.paint(
            f"mlxring top  cluster {st.get('cluster')}  model {st.get('model')}  "
            f"head {st.get('head')}  (answered by {st.get('answered_by')})",
            BOLD,
        ),
        f"ring {state}"
        + (f"  hop {hop:.2f} ms" if hop is not None else "")
        + (f" (decoding {decode_hop:.2f} ms)" if decode_hop is not None else "")
        + f"  {up} of {len(nodes)} nodes up",
    ]
    req = st.get("requests")
    if isinstance(req, dict):
        tps = tokens_per_s(prev, cur)
        trip = _num(req.get("decode_trip_ms"))
        line = (
            f"requests {req.get('generating', 0)} generating, {req.get('waiting', 0)} waiting"
            + (f"  {tps:.1f} tok/s" if tps is not None else "")
            + (f"  decode step {trip:.1f} ms" if trip is not None else "")
            + f"  {req.get('tokens_generated', 0)} tokens"
        )
        lines += fit(line, cache_hits(req), "  ")
    else:
        lines.append("requests: the head did not answer")
    lines += [style.paint(f"failing: {t}", RED) for t in task_lines(st)]
    w = style.bar_width
    header = (
        f"  {'NODE':<12} {'LAYERS':<10} {'STATE':<6} {'MEMORY (active / total)':<{w + 22}} "
        f"{'BUSY':>5} {'STEPS/S':>8} {'KV REQS':>7} {'PROMPT CACHE':>14}"
    )
    lines += ["", style.paint(header, DIM)]
    for n in nodes:
        name = str(n.get("name"))
        layers = n.get("layers")
        span = f"[{layers[0]}, {layers[1]})" if isinstance(layers, list) else "-"
        active, total = _num(n.get("memory_active_bytes")), _num(n.get("memory_total_bytes"))
        memory = f"{bar(active, total, w)} {size(active):>8} / {size(total):<8}"
        steps = _rate(prev, cur, node_value(name, "steps"))
        kv = n.get("kv_requests")
        node_up = bool(n.get("up"))
        lines.append(
            f"{'*' if n.get('head') else ' '} {name:<12} {span:<10} "
            + style.paint(f"{'up' if node_up else 'DOWN':<6}", GREEN if node_up else RED)
            + f" {memory:<{w + 22}} {_pct(busy_share(prev, cur, name)):>5} "
            f"{f'{steps:.1f}' if steps is not None else '-':>8} "
            f"{kv if kv is not None else '-':>7} {prompt_cache(n):>14}"
        )
    lines += ["", style.paint("* head   busy = share of wall time the shard computed", DIM)]
    return lines


def _style(out: TextIO) -> Style:
    cols = shutil.get_terminal_size((100, 24)).columns
    # The other columns take 93 characters; the memory bar gets the rest, within reason (at
    # 100 columns and below, 6: a line is then 99 long).
    return Style(color=out.isatty(), bar_width=max(6, min(40, cols - 97)))


def once(config: Config, out: TextIO) -> int:
    try:
        status = fetch_status(config)
    except ConnectionError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        return 1
    out.write("\n".join(render(Sample(time.monotonic(), status), None, _style(out))) + "\n")
    return 0 if (status.get("ring") or {}).get("ok") else 1


def live(config: Config, interval: float, out: TextIO) -> int:
    history: deque[Sample] = deque()
    span = max(RATE_SPAN_S, 3 * interval)
    out.write(HIDE_CURSOR + CLEAR_SCREEN)
    try:
        while True:
            started = time.monotonic()
            try:
                cur = Sample(started, fetch_status(config, timeout=max(0.5, min(3.0, interval))))
                while len(history) > 1 and cur.at - history[1].at >= span:
                    history.popleft()
                lines = render(cur, history[0] if history else None, _style(out))
                history.append(cur)
            except ConnectionError as e:
                lines = [f"mlxring top: waiting for the ring ({e})"]
            # Home, then each line cleared to its end and everything below: no flicker.
            out.write(HOME + "".join(f"{line}{CLEAR_LINE}\n" for line in lines) + CLEAR_DOWN)
            out.flush()
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(SHOW_CURSOR)
        out.flush()


def run(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    if args.interval <= 0:
        print("mlxring: --interval must be above 0", file=sys.stderr)
        return 2
    if args.once:
        return once(config, sys.stdout)
    return live(config, args.interval, sys.stdout)
