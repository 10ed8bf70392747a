"""Parse and validate ``nodes.toml`` into frozen dataclasses.

Every mistake raises :class:`ConfigError` with a one-line message naming the file and the key
(``nodes.toml: nodes[1].name: duplicate node name 'mini1'``), because the same file is copied to
every Mac and a typo must stop the node at start-up, not surface later as a hung ring.
"""

from __future__ import annotations

import ipaddress
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mlxring.fields import FieldErrors, Fields, show
from mlxring.ring.plan import STRATEGIES

# busy_poll = "auto" polls on machines with this many cores or more: the polling loops of a
# machine's node processes then leave cores to MLX and the OS (on 2 cores polling halves the
# tiny preset's decode ratio: benchmarks/RESULTS.md, CPU).
BUSY_POLL_MIN_CORES = 8
GIB = 1 << 30
MIB = 1 << 20
# Upper bounds of numeric keys: past them a value is a typo or an attack on the process's memory
# (a 10**18-token prefill chunk), never a setting that works.
MAX_PREFILL_CHUNK = 65536
MAX_GB = 65536.0  # memory_gb, cache_limit_gb, kv_cache_gb: far above any one machine
DAY_S = 86400.0

_TOML_POS_RE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


class ConfigError(ValueError):
    """A mistake in nodes.toml. ``str(err)`` is one line: ``<file>: <key>: <what is wrong>``."""

    def __init__(self, message: str) -> None:
        # Values are quoted when shown, so this only guards against a future careless message.
        super().__init__(" ".join(message.splitlines()))


class _ConfigErrors(FieldErrors):
    """The fields reader's mistakes as ConfigErrors: `<file>: <key>: <what is wrong>`."""

    def __init__(self, source: str) -> None:
        self.source = source

    def invalid(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")


@dataclass(frozen=True)
class ClusterConfig:
    model: str
    name: str = "mlxring"
    secret: str = ""
    strategy: str = "memory"
    prefill_chunk: int = 512
    heartbeat_s: float = 1.0
    down_after_s: float = 5.0
    request_timeout_s: float = 600.0
    max_frame_mb: float = 256.0
    interfaces: tuple[str, ...] = ()
    # Run a model whose type is not verified exactly through the ring (mlxring/model/families), with
    # the llama-style forward pass, at the user's risk: its output may silently differ.
    allow_unverified: bool = False
    # Keep finished requests' KV caches on the shards, so that a prompt that starts the same
    # way (a conversation's next turn) prefills only its new tokens (shard/prefix.py).
    prompt_cache: bool = True
    # Draft tokens from the request's own text and verify them in one pass around the ring
    # (engine/speculate.py): output unchanged, greedy or sampled; off by itself where the
    # model's caches cannot drop rejected drafts. Off by default until measured to cost
    # nothing where nothing is copied (benchmarks/RESULTS.md).
    speculative: bool = False
    # A small model with the model's tokenizer, loaded whole on the head only, that drafts
    # what prompt lookup cannot (engine/draft.py); "" for none. Set, it turns speculation on
    # with its drafts; `speculative = true` besides tries prompt lookup first at each step.
    draft_model: str = ""

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * MIB)


@dataclass(frozen=True)
class TuningConfig:
    """How one process uses its machine. Nodes of a ring may set these differently, and none
    changes a token of the output: `[tuning]`, apart from the ring facts of `[cluster]`."""

    max_batch: int = 32  # decode steps of concurrent requests run as one forward pass; 1 = off
    # MLX's buffer cache per process (None: MLX's default, about all memory). Lower it when
    # several node processes share one GPU, or they starve each other of memory.
    cache_limit_gb: float | None = None
    # KV-cache bytes a shard's live requests may hold; a new request or prompt chunk beyond
    # fails. None: half of this machine's memory that the shard's weights leave
    # (`shard.checks.kv_bound`).
    kv_cache_gb: float | None = None
    # Bytes of kept prompts (`[cluster] prompt_cache`) a shard may hold; they yield to live
    # requests. None: as much as `kv_cache_gb`'s bound; 0: keep none here.
    prompt_cache_gb: float | None = None
    # Keep a process's event loop polling its sockets while it has requests in flight, instead
    # of sleeping until a frame comes: waking costs 50-400 µs a hop, polling costs a core.
    # None: on where the machine has BUSY_POLL_MIN_CORES cores or more.
    busy_poll: bool | None = None
    # Where MLX runs on CUDA, a process hosting one shard launches a lone request's next decode
    # step before its input comes, held on the GPU by a gate (`backends/cuda/gate.py`). Turn it
    # off for several node processes on one GPU without CUDA MPS: their waiting gates then take
    # turns with the working one.
    gates: bool = True
    # How many convoys a shard's concurrent decodes split into, so that every stage has one to
    # run while the others run theirs. None: one per process. Set 1 where the processes share
    # one accelerator: they cannot compute at once, and one wide pass costs about what a
    # narrow one does on a GPU (benchmarks/RESULTS.md).
    convoys: int | None = None


@dataclass(frozen=True)
class ApiConfig:
    host: str = "0.0.0.0"
    port: int = 8100
    api_key: str = ""
    max_body_bytes: int = MIB
    max_concurrent: int = 64
    max_queue: int = 256
    # A connection must send its request head within header_timeout_s of opening, and is closed
    # after idle_timeout_s without a request: a slow or silent client holds no socket for long.
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    # A request's whole body must arrive within body_timeout_s of the handler asking for it: a
    # client that drips it holds neither the connection nor a handler for longer.
    body_timeout_s: float = 30.0
    # Open connections per process and per client address; past them a connection is answered
    # 503 and closed at once, so one client cannot use up the process's file descriptors.
    max_connections: int = 1024
    max_connections_per_client: int = 256
    # Origins whose web pages may read the API's answers (CORS), lower-case; "*": every origin.
    allowed_origins: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    port: int
    host: str | None = None  # None: resolved by zeroconf at run time
    api_port: int | None = None
    layers: tuple[int, int] | None = None  # [start, end), manual strategy only
    memory_gb: float | None = None
    compute: float | None = None

    @property
    def memory_bytes(self) -> int | None:
        # GB here means GiB: a "16 GB" Mac has 16 GiB, which is what people will write.
        return None if self.memory_gb is None else int(self.memory_gb * GIB)

    def api_port_or(self, default: int) -> int:
        return self.api_port if self.api_port is not None else default


@dataclass(frozen=True)
class Config:
    cluster: ClusterConfig
    api: ApiConfig
    nodes: tuple[NodeConfig, ...]
    source: str = "nodes.toml"
    tuning: TuningConfig = field(default_factory=TuningConfig)
    # One line each: what the file does that still works but should change (a tuning key in
    # [cluster]). `load_config_or_exit` prints them.
    warnings: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def position(self, name: str) -> int:
        """Ring position of a node: its index in the file."""
        for i, node in enumerate(self.nodes):
            if node.name == name:
                return i
        known = ", ".join(self.names)
        raise ConfigError(f"{self.source}: nodes: no node named {name!r} (known: {known})")

    def node(self, name: str) -> NodeConfig:
        return self.nodes[self.position(name)]

    def api_port(self, name: str) -> int:
        """The port node ``name`` serves the HTTP API on (its api_port, else api.port)."""
        return self.node(name).api_port_or(self.api.port)


def load_config(path: str | Path) -> Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror or e}") from None
    return parse_config(text, source)


def load_config_or_exit(path: str | Path) -> Config:
    """For commands: a bad config is one line on stderr and exit status 2."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"mlxring: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for warning in config.warnings:
        print(f"mlxring: warning: {warning}", file=sys.stderr)
    return config


def parse_config(text: str, source: str = "nodes.toml") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: {_toml_error(str(e), text)}") from None

    top = Fields(data, _ConfigErrors(source)).only(("cluster", "api", "tuning", "nodes"))
    cluster_table = top.table("cluster", {}).only(_CLUSTER_KEYS + _TUNING_KEYS)
    cluster = _parse_cluster(cluster_table)
    warnings: list[str] = []
    tuning_table = top.table("tuning", {}).only(_TUNING_KEYS)
    tuning = _parse_tuning(source, cluster_table, tuning_table, warnings)
    api = _parse_api(top.table("api", {}).only(_API_KEYS))
    nodes = _parse_nodes(top, cluster.strategy)
    _check_unique(source, nodes, api)
    if cluster.strategy == "manual":
        _check_manual_layers(source, nodes)
    return Config(cluster, api, nodes, source, tuning, tuple(warnings))


_CLUSTER_KEYS = (
    "name", "model", "secret", "strategy", "prefill_chunk", "heartbeat_s", "down_after_s",
    "request_timeout_s", "max_frame_mb", "interfaces", "allow_unverified", "prompt_cache",
    "speculative", "draft_model",
)  # fmt: skip
_TUNING_KEYS = (
    "max_batch", "cache_limit_gb", "kv_cache_gb", "prompt_cache_gb", "busy_poll", "gates",
    "convoys",
)  # fmt: skip
_API_KEYS = (
    "host", "port", "api_key", "max_body_bytes", "max_concurrent", "max_queue",
    "header_timeout_s", "idle_timeout_s", "body_timeout_s", "max_connections",
    "max_connections_per_client", "allowed_origins",
)  # fmt: skip
_NODE_KEYS = ("name", "host", "port", "api_port", "layers", "memory_gb", "compute")


def _parse_cluster(t: Fields) -> ClusterConfig:
    strategy = t.string("strategy", "memory")
    if strategy not in STRATEGIES:
        raise t.error(
            "strategy", f"unknown strategy {strategy!r} (expected {', '.join(STRATEGIES)})"
        )
    heartbeat_s = t.number("heartbeat_s", 1.0, gt=0, hi=60.0)
    down_after_s = t.number("down_after_s", 5.0, gt=0, hi=3600.0)
    if down_after_s <= heartbeat_s:
        raise t.error(
            "down_after_s",
            f"must be greater than {t.path('heartbeat_s')} ({heartbeat_s:g}), got {down_after_s:g}",
        )
    return ClusterConfig(
        name=t.name("name", "mlxring"),
        model=t.string("model", nonempty=True),
        secret=t.string("secret", ""),
        strategy=strategy,
        prefill_chunk=t.integer("prefill_chunk", 512, lo=1, hi=MAX_PREFILL_CHUNK),
        heartbeat_s=heartbeat_s,
        down_after_s=down_after_s,
        request_timeout_s=t.number("request_timeout_s", 600.0, gt=0, hi=DAY_S),
        max_frame_mb=t.number("max_frame_mb", 256.0, gt=0, hi=4096.0),
        interfaces=_parse_interfaces(t),
        allow_unverified=t.boolean("allow_unverified", False),
        prompt_cache=t.boolean("prompt_cache", True),
        speculative=t.boolean("speculative", False),
        draft_model=_parse_draft_model(t),
    )


def _parse_draft_model(t: Fields) -> str:
    """A model spec as `model` takes (a directory, a packaged name, a hub id, a GGUF file);
    whether it exists and fits the model is known only when the head loads it."""
    value = t.string("draft_model", "")
    if "draft_model" in t.data and (not value.strip() or value != value.strip()):
        raise t.error(
            "draft_model",
            f"expected a model (a directory, a packaged name or a hub id), got {show(value)}",
        )
    return value


def _parse_tuning(
    source: str, cluster: Fields, tuning: Fields, warnings: list[str]
) -> TuningConfig:
    """[tuning], where a key may also come from [cluster] (files written before [tuning]
    existed keep working) with a warning naming its place."""

    def at(key: str) -> Fields:
        if key not in cluster.data:
            return tuning
        if key in tuning.data:
            raise cluster.error(key, f"set in [tuning] too; keep only {tuning.path(key)}")
        warnings.append(
            f"{source}: {cluster.path(key)}: a per-process setting; "
            f"move it to [tuning] ({tuning.path(key)})"
        )
        return cluster

    return TuningConfig(
        max_batch=at("max_batch").integer("max_batch", 32, lo=1, hi=1024),
        cache_limit_gb=at("cache_limit_gb").opt_number("cache_limit_gb", gt=0, hi=MAX_GB),
        kv_cache_gb=at("kv_cache_gb").opt_number("kv_cache_gb", gt=0, hi=MAX_GB),
        prompt_cache_gb=at("prompt_cache_gb").opt_number("prompt_cache_gb", lo=0, hi=MAX_GB),
        busy_poll=_parse_busy_poll(at("busy_poll")),
        gates=at("gates").boolean("gates", True),
        convoys=_parse_convoys(at("convoys")),
    )


def _parse_busy_poll(t: Fields) -> bool | None:
    value = t.get("busy_poll", "auto")
    if isinstance(value, bool):
        return value
    if value != "auto":
        raise t.error("busy_poll", f'expected true, false or "auto", got {show(value)}')
    return None


def _parse_convoys(t: Fields) -> int | None:
    value = t.get("convoys", "auto")
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise t.error(
            "convoys", f'expected a whole number from 1 to 64 or "auto", got {show(value)}'
        )
    return value


def _parse_interfaces(t: Fields) -> tuple[str, ...]:
    value = t.get("interfaces", [])
    if not isinstance(value, list):
        raise t.error("interfaces", f"expected a list of strings, got {show(value)}")
    out = []
    for i, item in enumerate(value):
        key = f"interfaces[{i}]"
        if not isinstance(item, str) or not item or any(c.isspace() for c in item):
            raise t.error(key, f"expected an IPv4 address or interface name, got {show(item)}")
        # Something that looks like an address must be one; a typo'd IP is not an interface.
        if re.fullmatch(r"[0-9.]+", item):
            _ipv4(t, key, item)
        out.append(item)
    return tuple(out)


def _parse_api(t: Fields) -> ApiConfig:
    return ApiConfig(
        host=t.string("host", "0.0.0.0", nonempty=True),
        port=t.integer("port", 8100, lo=1, hi=65535),
        api_key=t.string("api_key", ""),
        max_body_bytes=t.integer("max_body_bytes", MIB, lo=1, hi=GIB),
        max_concurrent=t.integer("max_concurrent", 64, lo=1, hi=4096),
        max_queue=t.integer("max_queue", 256, lo=0, hi=65536),
        header_timeout_s=t.number("header_timeout_s", 10.0, gt=0, hi=3600.0),
        idle_timeout_s=t.number("idle_timeout_s", 30.0, gt=0, hi=DAY_S),
        body_timeout_s=t.number("body_timeout_s", 30.0, gt=0, hi=3600.0),
        max_connections=t.integer("max_connections", 1024, lo=1, hi=65536),
        max_connections_per_client=t.integer("max_connections_per_client", 256, lo=1, hi=65536),
        allowed_origins=_parse_origins(t),
    )


_ORIGIN_RE = re.compile(r"^https?://[^/\s?#]+$")


def _parse_origins(t: Fields) -> tuple[str, ...]:
    """`allowed_origins`: "*" or origins as browsers send them (`scheme://host[:port]`)."""
    value = t.get("allowed_origins", ["*"])
    if not isinstance(value, list):
        raise t.error("allowed_origins", f"expected a list of strings, got {show(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not (item == "*" or _ORIGIN_RE.match(item)):
            raise t.error(
                f"allowed_origins[{i}]",
                f'expected "*" or an origin such as "http://localhost:3000", got {show(item)}',
            )
        out.append(item.lower())
    return tuple(out)


def _parse_nodes(top: Fields, strategy: str) -> tuple[NodeConfig, ...]:
    raw = top.get("nodes", [])
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise top.error("nodes", f"expected an array of tables ([[nodes]]), got {show(raw)}")
    if not raw:
        raise top.error("nodes", "at least one [[nodes]] table is required")
    nodes = []
    for i, table in enumerate(raw):
        t = Fields(table, top.errors, f"nodes[{i}]").only(_NODE_KEYS)
        name = t.name("name")
        host = t.opt_string("host")
        if host is not None:
            host = _ipv4(t, "host", host)
        port = t.integer("port", lo=1, hi=65535)
        api_port = t.opt_integer("api_port", lo=1, hi=65535)
        layers: tuple[int, int] | None = None
        if strategy == "manual":
            layers = _parse_layers(t)
        elif "layers" in table:
            raise t.error("layers", f'only allowed with strategy = "manual" (not {strategy!r})')
        nodes.append(
            NodeConfig(
                name=name,
                host=host,
                port=port,
                api_port=api_port,
                layers=layers,
                memory_gb=t.opt_number("memory_gb", gt=0, hi=MAX_GB),
                compute=t.opt_number("compute", gt=0, hi=1e6),
            )
        )
    return tuple(nodes)


def _parse_layers(t: Fields) -> tuple[int, int]:
    if "layers" not in t.data:
        raise t.error(
            "layers", 'missing required key (every node needs one with strategy "manual")'
        )
    value = t.data["layers"]
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    ):
        raise t.error("layers", f"expected [start, end] with two integers, got {show(value)}")
    start, end = value
    if not 0 <= start < end:
        raise t.error("layers", f"expected 0 <= start < end, got {show(value)}")
    return start, end


def _check_unique(source: str, nodes: tuple[NodeConfig, ...], api: ApiConfig) -> None:
    seen_names: set[str] = set()
    # (host, port) -> description of its first user; ring and API ports share one space per host
    # because both are bound on that host.
    used: dict[tuple[str, int], str] = {}
    for i, node in enumerate(nodes):
        if node.name in seen_names:
            raise ConfigError(f"{source}: nodes[{i}].name: duplicate node name {node.name!r}")
        seen_names.add(node.name)
        if node.host is None:
            continue  # a zeroconf-resolved node is assumed to be its own machine
        ring = (node.host, node.port)
        if ring in used:
            raise ConfigError(
                f"{source}: nodes[{i}].port: duplicate host:port {node.host}:{node.port} "
                f"(already {used[ring]})"
            )
        used[ring] = f"the ring port of node {node.name!r}"
        http = (node.host, node.api_port_or(api.port))
        if http in used:
            raise ConfigError(
                f"{source}: nodes[{i}].api_port: API port {http[1]} on {node.host} is already "
                f"{used[http]} (give each node on one host its own api_port)"
            )
        used[http] = f"the API port of node {node.name!r}"


def _check_manual_layers(source: str, nodes: tuple[NodeConfig, ...]) -> None:
    # Ranges must tile [0, end) in ring order; the model's layer count is checked by the plan.
    prev_start, prev_end, prev_name = 0, 0, ""
    for i, node in enumerate(nodes):
        assert node.layers is not None  # _parse_layers made it required for manual
        start, end = node.layers
        where = f"{source}: nodes[{i}].layers"
        if i == 0 and start != 0:
            raise ConfigError(
                f"{where}: gap: the first node must start at layer 0, got [{start}, {end})"
            )
        if i > 0 and start < prev_end:
            raise ConfigError(
                f"{where}: [{start}, {end}) overlaps node {prev_name!r} [{prev_start}, {prev_end})"
            )
        if i > 0 and start > prev_end:
            raise ConfigError(
                f"{where}: gap: layers [{prev_end}, {start}) belong to no node "
                f"(node {prev_name!r} ends at {prev_end}, this one starts at {start})"
            )
        prev_start, prev_end, prev_name = start, end, node.name


def _ipv4(t: Fields, key: str, value: str) -> str:
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise t.error(key, f"expected an IPv4 address, got {show(value)}") from None
    if addr.is_unspecified or addr.is_multicast:
        raise t.error(key, f"{value} cannot address a peer")
    return str(addr)


def _toml_error(message: str, text: str) -> str:
    m = _TOML_POS_RE.search(message)
    if m is None:
        return f"invalid TOML: {message}"
    reason = message[: m.start()]
    if m.group(1) is None:  # "at end of document": the last line is the best we can name
        return f"line {text.count(chr(10)) + 1}: invalid TOML: {reason} (at end of file)"
    return f"line {m.group(1)}, column {m.group(2)}: invalid TOML: {reason}"
