"""nodes.toml parsing: the shipped default loads, and every mistake is a one-line error naming
the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mlxring.config import Config, ConfigError, load_config, load_config_or_exit, parse_config

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[cluster]
model = "demo"

[[nodes]]
name = "a"
port = 5100
"""

# A valid three-node file; cases below break one thing in it.
BASE = """
[cluster]
name = "home"
model = "demo"
strategy = "memory"

[api]
port = 8100

[[nodes]]
name = "mini1"
host = "192.168.5.1"
port = 5100
memory_gb = 16

[[nodes]]
name = "mini2"
host = "192.168.5.2"
port = 5100
memory_gb = 16

[[nodes]]
name = "studio"
host = "192.168.5.3"
port = 5100
memory_gb = 48
"""

MANUAL = """
[cluster]
model = "demo"
strategy = "manual"

[[nodes]]
name = "a"
port = 5101
layers = [0, 10]

[[nodes]]
name = "b"
port = 5102
layers = [{b_start}, 20]

[[nodes]]
name = "c"
port = 5103
layers = [20, 28]
"""


def error_of(text: str, source: str = "nodes.toml") -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{source}: ")
    return message


def test_default_nodes_toml_loads() -> None:
    config = load_config(ROOT / "nodes.toml")
    assert config.cluster.name == "local"
    assert config.cluster.model == "smollm2"
    assert config.cluster.strategy == "uniform"
    assert config.names == ("n1", "n2", "n3")
    assert [n.host for n in config.nodes] == ["127.0.0.1"] * 3
    assert [n.port for n in config.nodes] == [5101, 5102, 5103]
    assert [config.api_port(n) for n in config.names] == [8101, 8102, 8103]
    assert [config.position(n) for n in config.names] == [0, 1, 2]
    assert config.source == str(ROOT / "nodes.toml")


def test_defaults() -> None:
    config = parse_config(MINIMAL)
    c, a, (node,) = config.cluster, config.api, config.nodes
    assert (c.name, c.secret, c.strategy, c.prefill_chunk) == ("mlxring", "", "memory", 512)
    assert (c.heartbeat_s, c.down_after_s, c.request_timeout_s) == (1.0, 5.0, 600.0)
    assert (c.max_frame_mb, c.max_frame_bytes, c.interfaces) == (256.0, 256 << 20, ())
    t = config.tuning
    assert t.busy_poll is None  # "auto": decided by the machine's cores
    assert t.gates is True  # used where they work (CUDA)
    assert (t.max_batch, t.cache_limit_gb, t.kv_cache_gb, t.convoys) == (32, None, None, None)
    assert config.warnings == ()
    assert (a.host, a.port, a.api_key) == ("0.0.0.0", 8100, "")
    assert (a.max_body_bytes, a.max_concurrent, a.max_queue) == (1 << 20, 64, 256)
    assert a.allowed_origins == ("*",)  # as mlx-lm's --allowed-origins
    assert node == dataclasses.replace(node, host=None, api_port=None, layers=None)
    assert node.memory_gb is None and node.memory_bytes is None and node.compute is None
    assert node.api_port_or(8100) == 8100 and config.api_port("a") == 8100


def test_allowed_origins() -> None:
    text = MINIMAL + '\n[api]\nallowed_origins = ["http://LocalHost:3000", "https://a.example"]\n'
    assert parse_config(text).api.allowed_origins == ("http://localhost:3000", "https://a.example")
    for bad in ('"*"', '["localhost:3000"]', '["http://a.example/path"]', "[3]"):
        message = error_of(MINIMAL + f"\n[api]\nallowed_origins = {bad}\n")
        assert "nodes.toml: api.allowed_origins" in message, message


def test_full_config_values() -> None:
    config = parse_config(BASE.replace('strategy = "memory"', 'strategy = "memory"\nsecret = "s"'))
    assert config.cluster.secret == "s"
    assert config.node("studio").memory_gb == 48.0
    assert config.node("studio").memory_bytes == 48 << 30
    assert config.position("mini2") == 1
    assert isinstance(config, Config)


def tuned(setting: str, table: str = "tuning") -> str:
    """MINIMAL with one tuning line, in [tuning] or (as older files do) in [cluster]."""
    if table == "cluster":
        return MINIMAL.replace('model = "demo"', f'model = "demo"\n{setting}')
    return MINIMAL + f"\n[tuning]\n{setting}\n"


@pytest.mark.parametrize("table", ["tuning", "cluster"])
@pytest.mark.parametrize(("value", "parsed"), [("true", True), ("false", False), ('"auto"', None)])
def test_busy_poll_values(table: str, value: str, parsed: bool | None) -> None:
    assert parse_config(tuned(f"busy_poll = {value}", table)).tuning.busy_poll is parsed


@pytest.mark.parametrize("table", ["tuning", "cluster"])
def test_gates_can_be_turned_off(table: str) -> None:
    assert parse_config(tuned("gates = false", table)).tuning.gates is False


@pytest.mark.parametrize("table", ["tuning", "cluster"])
@pytest.mark.parametrize(("value", "parsed"), [('"auto"', None), ("1", 1), ("3", 3)])
def test_convoys_values(table: str, value: str, parsed: int | None) -> None:
    assert parse_config(tuned(f"convoys = {value}", table)).tuning.convoys == parsed


@pytest.mark.parametrize("table", ["tuning", "cluster"])
def test_max_batch_and_cache_limits(table: str) -> None:
    t = parse_config(tuned("max_batch = 4\ncache_limit_gb = 2\nkv_cache_gb = 0.5", table)).tuning
    assert (t.max_batch, t.cache_limit_gb, t.kv_cache_gb) == (4, 2.0, 0.5)


def test_tuning_in_cluster_warns_naming_the_new_place() -> None:
    """A file from before [tuning] keeps working, and says once per key where it belongs."""
    config = parse_config(tuned("busy_poll = true\nconvoys = 1", "cluster"))
    assert config.warnings == (
        "nodes.toml: cluster.busy_poll: a per-process setting; move it to [tuning] "
        "(tuning.busy_poll)",
        "nodes.toml: cluster.convoys: a per-process setting; move it to [tuning] (tuning.convoys)",
    )
    assert parse_config(tuned("busy_poll = true")).warnings == ()


def test_load_config_or_exit_prints_the_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nodes.toml"
    path.write_text(tuned("gates = false", "cluster"))
    assert load_config_or_exit(path).tuning.gates is False
    err = capsys.readouterr().err
    assert (
        err == f"mlxring: warning: {path}: cluster.gates: a per-process setting; move it to "
        "[tuning] (tuning.gates)\n"
    )


def test_manual_layers_parse() -> None:
    config = parse_config(MANUAL.format(b_start=10))
    assert [n.layers for n in config.nodes] == [(0, 10), (10, 20), (20, 28)]


def test_unknown_node_name_is_config_error() -> None:
    config = parse_config(BASE)
    with pytest.raises(ConfigError, match="no node named 'nope'"):
        config.node("nope")


def test_config_is_frozen() -> None:
    config = parse_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.nodes[0].port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        pytest.param(
            BASE.replace('model = "demo"\n', ""), "cluster.model", "missing", id="no-model"
        ),
        pytest.param(
            BASE.replace("port = 5100\nmemory_gb = 48", "memory_gb = 48"),
            "nodes[2].port",
            "missing",
            id="no-node-port",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'busy_poll = "yes"'),
            "cluster.busy_poll",
            'expected true, false or "auto", got "yes"',
            id="busy-poll-word",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'gates = "auto"'),
            "cluster.gates",
            'expected true or false, got "auto"',
            id="gates-word",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', "convoys = 0"),
            "cluster.convoys",
            'expected a whole number from 1 to 64 or "auto", got 0',
            id="convoys-zero",
        ),
        pytest.param(
            BASE.replace('name = "mini1"', 'host_ = "x"'),
            "nodes[0].host_",
            "unknown key",
            id="unknown-node-key",
        ),
        pytest.param(
            BASE.replace('name = "mini2"', 'name = "mini1"'),
            "nodes[1].name",
            "duplicate node name 'mini1'",
            id="duplicate-name",
        ),
        pytest.param(
            BASE.replace('host = "192.168.5.2"', 'host = "192.168.5.1"'),
            "nodes[1].port",
            "duplicate host:port 192.168.5.1:5100",
            id="duplicate-host-port",
        ),
        pytest.param(
            MANUAL.format(b_start=8), "nodes[1].layers", "overlaps node 'a'", id="manual-overlap"
        ),
        pytest.param(MANUAL.format(b_start=12), "nodes[1].layers", "gap", id="manual-gap"),
        pytest.param(
            MANUAL.format(b_start=10).replace("[0, 10]", "[2, 10]"),
            "nodes[0].layers",
            "gap",
            id="manual-first-not-zero",
        ),
        pytest.param(
            MANUAL.format(b_start=10).replace("layers = [20, 28]\n", ""),
            "nodes[2].layers",
            "missing",
            id="manual-missing-layers",
        ),
        pytest.param(
            MANUAL.format(b_start=10).replace("[0, 10]", "[0, 10, 12]"),
            "nodes[0].layers",
            "expected [start, end]",
            id="manual-three-ints",
        ),
        pytest.param(
            MANUAL.format(b_start=10).replace("[20, 28]", "[20, 20]"),
            "nodes[2].layers",
            "start < end",
            id="manual-empty-range",
        ),
        pytest.param(
            BASE.replace("memory_gb = 48", "memory_gb = 48\nlayers = [0, 1]"),
            "nodes[2].layers",
            "only allowed",
            id="layers-without-manual",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'strategy = "fast"'),
            "cluster.strategy",
            "unknown strategy 'fast' (expected uniform, memory, compute, manual)",
            id="unknown-strategy",
        ),
        pytest.param(
            BASE.replace("port = 5100\nmemory_gb = 16", 'port = "abc"\nmemory_gb = 16', 1),
            "nodes[0].port",
            'expected an integer, got "abc"',
            id="wrong-type-str",
        ),
        pytest.param(
            BASE.replace("port = 8100", "port = true"),
            "api.port",
            "expected an integer, got true",
            id="bool-is-not-int",
        ),
        pytest.param(
            BASE.replace("port = 8100", "port = 70000"),
            "api.port",
            "between 1 and 65535",
            id="port",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', "strategy = 3"),
            "cluster.strategy",
            "expected a string, got 3",
            id="wrong-type-int",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'strategy = "memory"\nstrategyy = "uniform"'),
            "cluster.strategyy",
            "unknown key",
            id="unknown-cluster-key",
        ),
        pytest.param(BASE + "\n[extra]\n", "extra", "unknown key", id="unknown-top-key"),
        pytest.param(
            BASE.replace("memory_gb = 16", "memory_gb = 0", 1),
            "nodes[0].memory_gb",
            "must be in (0, 65536], got 0",
            id="zero-memory",
        ),
        pytest.param(
            BASE.replace("memory_gb = 48", "memory_gb = 48\ncompute = -1.5"),
            "nodes[2].compute",
            "must be in (0, 1e+06], got -1.5",
            id="negative-compute",
        ),
        pytest.param(
            BASE.replace('host = "192.168.5.3"', 'host = "studio.local"'),
            "nodes[2].host",
            "IPv4",
            id="hostname-not-ip",
        ),
        pytest.param(
            BASE.replace('name = "mini1"', 'name = "mini 1"'),
            "nodes[0].name",
            "letters, digits",
            id="bad-name-chars",
        ),
        pytest.param(
            BASE.replace('name = "mini1"', 'name = ""'), "nodes[0].name", "empty", id="empty-name"
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', "heartbeat_s = 2.0\ndown_after_s = 1.5"),
            "cluster.down_after_s",
            "greater than cluster.heartbeat_s",
            id="down-after-below-heartbeat",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', "prefill_chunk = 0"),
            "cluster.prefill_chunk",
            "must be between 1 and 65536, got 0",
            id="prefill-chunk-zero",
        ),
        *(
            pytest.param(
                BASE.replace('strategy = "memory"', f"{key} = {value}")
                if table == "cluster"
                else BASE + f"\n[{table}]\n{key} = {value}\n"
                if table == "tuning"
                else BASE.replace("port = 8100", f"port = 8100\n{key} = {value}"),
                f"{table}.{key}",
                words,
                id=f"{key}-too-large",
            )
            for table, key, value, words in [
                ("cluster", "prefill_chunk", "1000000000000000000", "must be between 1 and 65536"),
                ("cluster", "heartbeat_s", "1e9", "must be in (0, 60]"),
                ("cluster", "down_after_s", "1e9", "must be in (0, 3600]"),
                ("cluster", "request_timeout_s", "1e12", "must be in (0, 86400]"),
                ("cluster", "max_frame_mb", "1e12", "must be in (0, 4096]"),
                ("tuning", "max_batch", "100000", "must be between 1 and 1024"),
                ("tuning", "cache_limit_gb", "1e12", "must be in (0, 65536]"),
                ("tuning", "kv_cache_gb", "1e12", "must be in (0, 65536]"),
                ("tuning", "convoys", "1000", "from 1 to 64"),
                ("api", "max_body_bytes", "1000000000000", "must be between 1 and 1073741824"),
                ("api", "max_concurrent", "1000000", "must be between 1 and 4096"),
                ("api", "max_queue", "10000000", "must be between 0 and 65536"),
                ("api", "header_timeout_s", "0", "must be in (0, 3600]"),
                ("api", "idle_timeout_s", "1e12", "must be in (0, 86400]"),
                ("api", "body_timeout_s", "1e5", "must be in (0, 3600]"),
                ("api", "max_connections", "0", "must be between 1 and 65536"),
                ("api", "max_connections_per_client", "1000000", "must be between 1 and 65536"),
            ]
        ),
        pytest.param(
            MINIMAL.replace("port = 5100", "port = 5100\nmemory_gb = 1e12"),
            "nodes[0].memory_gb",
            "must be in (0, 65536], got 1e+12",
            id="memory-gb-too-large",
        ),
        pytest.param(
            MINIMAL.replace("port = 5100", "port = 5100\ncompute = 1e12"),
            "nodes[0].compute",
            "must be in (0, 1e+06], got 1e+12",
            id="compute-too-large",
        ),
        pytest.param(
            BASE.replace("port = 8100", "max_queue = -1"),
            "api.max_queue",
            "must be between 0 and 65536, got -1",
            id="negative-queue",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'interfaces = "en0"'),
            "cluster.interfaces",
            "expected a list",
            id="interfaces-not-list",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', 'interfaces = ["en0", "192.168.5.300"]'),
            "cluster.interfaces[1]",
            "IPv4",
            id="interfaces-bad-ip",
        ),
        pytest.param(
            MINIMAL.replace('[[nodes]]\nname = "a"\nport = 5100', ""),
            "nodes",
            "at least one",
            id="no-nodes",
        ),
        pytest.param(
            MINIMAL + '\n[[nodes]]\nname = "b"\nhost = "127.0.0.1"\nport = 5101\n'
            '\n[[nodes]]\nname = "c"\nhost = "127.0.0.1"\nport = 5102\n',
            "nodes[2].api_port",
            "API port 8100 on 127.0.0.1",
            id="shared-api-port-on-one-host",
        ),
        pytest.param(
            MINIMAL + '\n[[nodes]]\nname = "b"\nhost = "127.0.0.1"\nport = 5101\napi_port = 5101\n',
            "nodes[1].api_port",
            "ring port of node 'b'",
            id="api-port-equals-ring-port",
        ),
        pytest.param('cluster = "x"\n', "cluster", "expected a table", id="cluster-not-table"),
        pytest.param(
            BASE + '\n[tuning]\nbusy_poll = "yes"\n',
            "tuning.busy_poll",
            'expected true, false or "auto", got "yes"',
            id="tuning-busy-poll-word",
        ),
        pytest.param(
            BASE + "\n[tuning]\nmax_batch = 0\n",
            "tuning.max_batch",
            "between 1 and 1024, got 0",
            id="max-batch-zero",
        ),
        pytest.param(
            BASE + "\n[tuning]\ncache_limit_gb = -2\n",
            "tuning.cache_limit_gb",
            "must be in (0, 65536], got -2",
            id="negative-cache-limit",
        ),
        pytest.param(
            BASE + "\n[tuning]\nkv_cache_gb = 0\n",
            "tuning.kv_cache_gb",
            "must be in (0, 65536], got 0",
            id="zero-kv-cache",
        ),
        pytest.param(
            BASE + "\n[tuning]\nprefill_chunk = 4\n",
            "tuning.prefill_chunk",
            "unknown key",
            id="ring-fact-in-tuning",
        ),
        pytest.param(
            BASE.replace('strategy = "memory"', "gates = false") + "\n[tuning]\ngates = true\n",
            "cluster.gates",
            "set in [tuning] too; keep only tuning.gates",
            id="tuning-key-in-both-tables",
        ),
    ],
)
def test_invalid_config_names_key(text: str, key: str, words: str) -> None:
    message = error_of(text)
    assert f"nodes.toml: {key}: " in message
    assert words in message


def test_bad_toml_names_line() -> None:
    message = error_of('[cluster]\nmodel = "demo"\nstrategy = = "x"\n')
    assert message.startswith("nodes.toml: line 3")
    assert "invalid TOML" in message


def test_bad_toml_at_end_of_file() -> None:
    message = error_of('[cluster]\nmodel = "demo\n')
    assert "line " in message and "invalid TOML" in message


def test_values_with_newlines_stay_on_one_line() -> None:
    message = error_of(BASE.replace('host = "192.168.5.1"', 'host = "a\\nb\\u2028c"'))
    assert "nodes[0].host" in message


def test_file_path_in_message(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(BASE.replace('name = "mini2"', 'name = "mini1"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: nodes[1].name: duplicate node name 'mini1'")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe[cluster]\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


def test_nodes_without_host_may_share_ports() -> None:
    # zeroconf-resolved nodes are separate machines; only nodes with a host are compared
    text = MINIMAL + '\n[[nodes]]\nname = "b"\nport = 5100\n'
    config = parse_config(text)
    assert [n.host for n in config.nodes] == [None, None]
