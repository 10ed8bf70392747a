"""`mlxring status`: ask any reachable node for /cluster/status and print the ring as a table
(or the JSON itself with --json).

Beside each node's memory, its prompt cache: the bytes of kept prompts it holds and how many
(as the head's last probe found them); on the requests line, the head's prompt-cache hits, the
hits a node had lost the entry of, and the prompt tokens the hits reused."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from mlxring.config import Config, load_config_or_exit
from mlxring.ring.plan import GB

MB = 1 << 20
WIDTH = 100  # columns a line of the table (and of `mlxring top`) keeps within


def fetch_status(config: Config, timeout: float = 3.0) -> dict[str, Any]:
    """The first answer of the nodes' APIs, tried in ring order."""
    errors = []
    for node in config.nodes:
        host = node.host or "127.0.0.1"
        url = f"http://{host}:{config.api_port(node.name)}/cluster/status"
        req = urllib.request.Request(url)
        if config.api.api_key:
            req.add_header("Authorization", f"Bearer {config.api.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body: dict[str, Any] = json.loads(resp.read())
                return body
        except (urllib.error.URLError, OSError, ValueError) as e:
            errors.append(f"{node.name} ({url}): {getattr(e, 'reason', e)}")
    raise ConnectionError("no node answered: " + "; ".join(errors))


def _gb(n: Any) -> str:
    return f"{n / GB:.1f}" if isinstance(n, int | float) else "-"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def size(n: float | None) -> str:
    """Bytes as GB from 1 GiB up, else as MB (tiny test models hold well under a GB)."""
    if n is None:
        return "-"
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / MB:.1f} MB"


def prompt_cache(node: dict[str, Any]) -> str:
    """A node's prompt cache: "12.0 MB (3)", its bytes and entries; "-" when unknown."""
    n, entries = _int(node.get("prompt_cache_bytes")), _int(node.get("prompt_cache_entries"))
    if n is None:
        return "-"
    return f"{size(n)} ({entries if entries is not None else '?'})"


def cache_hits(requests: dict[str, Any]) -> str | None:
    """The head's prompt-cache figures ("prompt cache 3 hits, 1 missed, 1234 tokens reused"),
    or None from a head that does not report them."""
    hits, tokens = (
        _int(requests.get("prompt_cache_hits")),
        _int(requests.get("prompt_cache_tokens")),
    )
    if hits is None or tokens is None:
        return None
    misses = _int(requests.get("prompt_cache_misses")) or 0
    missed = f", {misses} missed" if misses else ""
    return f"prompt cache {hits} hit{'' if hits == 1 else 's'}{missed}, {tokens} tokens reused"


def fit(line: str, extra: str | None, sep: str) -> list[str]:
    """`line` with `extra` after it where that stays within WIDTH, else `extra` on a line of its
    own."""
    if extra is None:
        return [line]
    if len(line) + len(sep) + len(extra) <= WIDTH:
        return [line + sep + extra]
    return [line, extra]


def task_lines(status: dict[str, Any]) -> list[str]:
    """One line per failing long-lived task the status names: where it runs, and its state."""
    lines = []
    for t in status.get("tasks") or []:
        if isinstance(t, dict):
            nodes = ",".join(str(n) for n in t.get("nodes") or []) or "?"
            lines.append(f"{nodes}: {t.get('text') or t.get('task')}")
    return lines


def render(status: dict[str, Any]) -> str:
    ring = status.get("ring") or {}
    lines = [
        f"cluster {status.get('cluster')}  model {status.get('model')}  head {status.get('head')}",
        "ring: "
        + ("up" if ring.get("ok") else f"DOWN ({ring.get('reason')})")
        + (f"  hop {ring['hop_ms']:.2f} ms" if ring.get("hop_ms") is not None else "")
        + (
            f" (decoding {ring['decode_hop_ms']:.2f} ms)"
            if ring.get("decode_hop_ms") is not None
            else ""
        ),
    ]
    requests = status.get("requests") or {}
    if requests:
        rate = requests.get("tokens_per_s")
        line = (
            f"requests: {requests.get('generating', 0)} generating, "
            f"{requests.get('waiting', 0)} waiting"
            + (f", {rate:.1f} tok/s" if isinstance(rate, int | float) else "")
        )
        lines += fit(line, cache_hits(requests), ", ")
    if tasks := task_lines(status):
        lines += ["failing tasks:", *(f"  {t}" for t in tasks)]
    header = (
        f"{'node':<12} {'address':<22} {'layers':<10} {'state':<6} {'memory GB':<13} "
        f"{'prompt cache':<15} {'busy':>5}"
    )
    lines += ["", header, "-" * len(header)]
    for n in status.get("nodes", []):
        layers = n.get("layers")
        span = f"[{layers[0]}, {layers[1]})" if layers else "-"
        address = f"{n.get('address') or '?'}:{n.get('ring_port')}"
        memory = f"{_gb(n.get('memory_active_bytes'))} / {_gb(n.get('memory_total_bytes'))}"
        busy = n.get("busy_share")
        name = n["name"] + (" *" if n.get("head") else "")
        lines.append(
            f"{name:<12} {address:<22} {span:<10} {'up' if n.get('up') else 'DOWN':<6} "
            f"{memory:<13} {prompt_cache(n):<15} "
            f"{f'{busy:.0%}' if isinstance(busy, float) else '-':>5}"
        )
    lines.append("(* = head)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    try:
        status = fetch_status(config)
    except ConnectionError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status))
    return 0 if (status.get("ring") or {}).get("ok") else 1
