"""`mlxring node | status | bench | make-model | top | secret`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import threading
from collections.abc import Sequence

import mlx.core as mx

from mlxring.config import Config, ConfigError, load_config_or_exit
from mlxring.log import setup_logging
from mlxring.model import make as makemodel


def local_addresses() -> set[str]:
    """This machine's IPv4 addresses (loopback range always counts as local)."""
    import ifaddr

    out = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                out.add(ip.ip)
    return out


def local_node_names(config: Config, wanted: Sequence[str] | None) -> list[str]:
    if wanted:
        for name in wanted:
            config.node(name)  # raises a one-line ConfigError for unknown names
        return [n for n in config.names if n in wanted]
    mine = local_addresses()
    return [
        n.name
        for n in config.nodes
        if n.host is not None and (ipaddress.ip_address(n.host).is_loopback or n.host in mine)
    ]


def cmd_node(args: argparse.Namespace) -> int:
    config = load_config_or_exit(args.config)
    try:
        names = local_node_names(config, args.name)
    except ConfigError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        return 2
    if not names:
        print(
            f"mlxring: no node of {args.config} has a host address of this machine; "
            "pick one with --name NAME",
            file=sys.stderr,
        )
        return 2
    setup_logging(args.log_json, args.log_level, node=names[0] if len(names) == 1 else None)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # uvloop has no Windows build; asyncio's loop works the same, slower
        pass
    return asyncio.run(_serve(config, names))


async def _serve(config: Config, names: list[str]) -> int:
    import structlog

    from mlxring.api.app import start_api
    from mlxring.model.checkpoint import ModelError
    from mlxring.ring.runtime import Runtime

    log = structlog.get_logger()
    runtime = Runtime(config, names)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await runtime.start()
        servers = await start_api(runtime)
    except ModelError as e:  # a model this ring cannot run: one line, as for a config mistake
        print(f"mlxring: {e}", file=sys.stderr)
        await runtime.stop()
        return 2
    except Exception as e:  # noqa: BLE001 - start-up failures end the process with one line
        log.error("start_failed", error=f"{type(e).__name__}: {e}")
        print(f"mlxring: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        await runtime.stop()
        return 2
    log.info(
        "node_started",
        nodes=names,
        plan=[list(r) for r in runtime.plan],
        busy_poll=runtime.busy_poll,
        gates=runtime.backend.launches,
    )
    await stop.wait()
    log.info("node_stopping")
    _exit_after(STOP_DEADLINE_S)
    for s in servers:
        await s.cleanup()
    await runtime.stop()
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    import secrets

    print(secrets.token_urlsafe(32))  # 256 random bits: nothing to guess offline
    return 0


STOP_DEADLINE_S = 30.0  # a stopping node exits by then, whatever is still running


def _exit_after(seconds: float) -> None:
    """Backstop for "no hangs": each stop step has its own timeout, but a task that ignores
    cancellation (a library's, or ours on a bad day) would keep asyncio.run from returning."""

    def force() -> None:
        sys.stderr.write(f"mlxring: node still stopping after {seconds:.0f} s; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxring",
        description="Run one LLM across several Macs as one OpenAI-compatible endpoint.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    node = sub.add_parser("node", help="start this machine's node(s) of the ring")
    node.add_argument("--config", default="nodes.toml", help="cluster file (default nodes.toml)")
    node.add_argument(
        "--name",
        action="append",
        help="run this node (repeatable; default: every node whose "
        "host is an address of this machine)",
    )
    node.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: JSON unless stderr is a terminal)",
    )
    node.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    node.set_defaults(func=cmd_node)

    status = sub.add_parser("status", help="show the ring: nodes, layers, up/down, memory, tok/s")
    status.add_argument("--config", default="nodes.toml")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(func=_lazy("mlxring.commands.status", "run"))

    top = sub.add_parser("top", help="live view of the ring: layers, memory, busy share, tok/s")
    top.add_argument("--config", default="nodes.toml")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    top.set_defaults(func=_lazy("mlxring.commands.top", "run"))

    bench = sub.add_parser("bench", help="tokens/sec of the ring against single-process mlx-lm")
    add_bench_arguments(bench)
    bench.set_defaults(func=_lazy("mlxring.commands.bench", "run"))

    secret = sub.add_parser("secret", help="print a fresh secret for [cluster] secret")
    secret.set_defaults(func=cmd_secret)

    mm = sub.add_parser("make-model", help="write a random-weight model in mlx-lm's format")
    makemodel.add_arguments(mm)
    mm.set_defaults(func=makemodel.run)
    return p


def _lazy(module: str, attr: str) -> object:
    """Import a subcommand's module only when it runs (keeps `--help` fast)."""

    def call(args: argparse.Namespace) -> int:
        import importlib

        result: int = getattr(importlib.import_module(module), attr)(args)
        return result

    return call


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="attach to the ring of this nodes.toml (its head's API)")
    p.add_argument(
        "--model",
        help='any model spec of nodes.toml: "smollm2", "demo", a directory or an HF repo id '
        "(default: made from --preset)",
    )
    p.add_argument("--preset", default="small", help="make-model preset when no --model is given")
    p.add_argument("--family", default="qwen3", help="make-model family when no --model is given")
    p.add_argument("--quantize", type=int, choices=[4, 8], help="make-model quantization")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="make-model weight scale (a small one makes text that repeats: drafts to accept)",
    )
    p.add_argument("--nodes", type=int, default=3, help="spawn this many local node processes")
    p.add_argument(
        "--one-process", action="store_true", help="host all --nodes in one process instead"
    )
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument(
        "--gpus",
        default="",
        help="comma-separated CUDA device ids: spawned node i sees only the i-th "
        "(a multi-GPU Linux box standing in for one accelerator per Mac)",
    )
    p.add_argument(
        "--busy-poll",
        choices=["auto", "on", "off"],
        default="auto",
        help="the spawned nodes' busy_poll (auto: on with 8 cores or more)",
    )
    p.add_argument(
        "--gates",
        choices=["on", "off"],
        default="on",
        help="the spawned nodes' gates (on: where MLX runs on CUDA; see backends/cuda/gate.py)",
    )
    p.add_argument(
        "--convoys",
        type=_convoys,
        default="auto",
        help="the spawned nodes' convoys (auto: one per process; 1 where they share one GPU)",
    )
    p.add_argument(
        "--turns",
        type=int,
        default=0,
        help="instead: a conversation of this many turns, TTFT with the prompt cache and without",
    )
    p.add_argument(
        "--history-tokens", type=int, default=2048, help="turn 1's prompt: the history (--turns)"
    )
    p.add_argument(
        "--turn-tokens", type=int, default=64, help="new tokens each later turn adds (--turns)"
    )
    p.add_argument(
        "--speculative",
        choices=["ngram", "draft"],
        default=None,
        help="instead: one stream's decode with speculative decoding and without: ngram "
        "(prompt lookup, on a copy-heavy prompt) or draft (a draft model, --draft-model)",
    )
    p.add_argument(
        "--draft-model",
        default=None,
        help="the draft model of --speculative draft, any spec [cluster] model takes "
        "(default: the model itself)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _convoys(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(
            f'expected "auto" or a whole number of at least 1, got {value!r}'
        )
    return value


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = args.func(args)
    mx.clear_streams()  # this thread's MLX streams, before the interpreter ends (see `compute`)
    raise SystemExit(code)
