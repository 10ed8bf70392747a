"""A model by Hugging Face repo id, end to end: real `mlxring node` processes fetch a sharded
checkpoint from a stand-in for the hub on loopback (tests/hubstandin.py), each through its own
endpoint prefix and into its own cache, as separate machines would. huggingface.co is never
reached: HF_ENDPOINT points at the stand-in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from mlxring.config import load_config
from mlxring.model.hub import shard_files
from mlxring.model.make import make_model
from tests.hubstandin import HubStandIn, Request
from tests.ringutil import (
    FAST,
    NodeProcess,
    decode,
    encode,
    free_port,
    post_completion,
    reference,
    write_valid_config,
)

REPO = "test-org/tiny-sharded"
N_LAYERS = 6
META = {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six layers in six weight files (the embedding in the first, the norm and the untied
    head in the last), so that every node of a ring needs different files."""
    out = tmp_path_factory.mktemp("repo") / "tiny-sharded"
    return make_model(out, layers=N_LAYERS, tie=False, shards=N_LAYERS)


@pytest.fixture
def hub(sharded: Path) -> Iterator[HubStandIn]:
    with HubStandIn({REPO: sharded}) as h:
        yield h


@contextlib.contextmanager
def hub_nodes(
    config: Path,
    names: Sequence[str],
    tmp: Path,
    hub: HubStandIn,
    caches: dict[str, Path],
    endpoint: str | None = None,
) -> Iterator[dict[str, NodeProcess]]:
    """`mlxring node` processes, each asking the stand-in under its own name and keeping its
    files in its own cache (a NodeProcess takes this process's environment as it starts)."""
    saved = dict(os.environ)
    procs: dict[str, NodeProcess] = {}
    try:
        for name in names:
            os.environ.pop("HF_HUB_OFFLINE", None)
            os.environ.pop("HF_TOKEN", None)
            os.environ.update(
                HF_ENDPOINT=endpoint or hub.endpoint(name),
                HF_HUB_CACHE=str(caches[name]),
                HF_HOME=str(tmp / "hf-home"),
                HF_HUB_DISABLE_XET="1",
                HF_HUB_DISABLE_TELEMETRY="1",
                MLXRING_CACHE=str(tmp / "mlxring-cache"),
            )
            procs[name] = NodeProcess(config, name, tmp)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield procs
    finally:
        hung = [p.name for p in procs.values() if not p.stop()]
        assert not hung, f"{hung} did not exit within 10 s of SIGTERM"


def weight_gets(requests: list[Request]) -> list[str]:
    """The weight files fetched whole (a header read asks for a Range from byte 0)."""
    return [
        r.file
        for r in requests
        if r.method == "GET" and r.file and r.file.endswith(".safetensors") and r.range is None
    ]


def exit_line(proc: NodeProcess) -> str:
    """The node's last line, once it has exited with status 2 (within 30 s)."""
    assert proc.proc.wait(30) == 2, proc.log()[-3000:]
    assert "Traceback" not in proc.log(), proc.log()[-3000:]
    return proc.log().strip().splitlines()[-1]


def test_each_node_fetches_only_its_own_layers_files(
    tmp_path: Path, hub: HubStandIn, sharded: Path
) -> None:
    ranges = [(0, 2), (2, 4), (4, N_LAYERS)]
    cfg = write_valid_config(
        tmp_path,
        REPO,
        3,
        strategy="manual",
        extra_cluster=FAST,
        node_extra=[f"layers = [{a}, {b}]" for a, b in ranges],
    )
    names = ["n0", "n1", "n2"]
    caches = {n: tmp_path / f"cache-{n}" for n in names}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    all_files = set(index.values())
    prompt = encode(sharded, "Which files does each node of the ring fetch?")
    with hub_nodes(cfg, names, tmp_path, hub, caches) as procs:
        for p in procs.values():
            p.wait_log("node_started", 60)
        port = load_config(cfg).api_port("n0")
        deadline = time.monotonic() + 30
        status, body = post_completion(port, prompt, 12)
        while status != 200 and time.monotonic() < deadline:  # the ring's first probe
            time.sleep(0.2)
            status, body = post_completion(port, prompt, 12)
        assert status == 200, body
        want = reference(sharded, prompt, 12)
        assert body["choices"][0]["text"] == decode(sharded, want)
        logs = {n: p.log() for n, p in procs.items()}
        # Before the nodes stop: one left alone plans the whole model for itself.
        requests = {n: hub.of(n) for n in names}
    fetched = {}
    for name, (a, b) in zip(names, ranges, strict=True):
        own = shard_files(index, a, b, a == 0, b == N_LAYERS, tied=False)
        asked = requests[name]
        fetched[name] = weight_gets(asked)
        # Only its own layers' files, each once, and a progress line for each.
        assert sorted(fetched[name]) == sorted(own), (name, fetched[name], own)
        for f in own:
            assert f'"file": "{f}"' in logs[name] and "model_downloaded" in logs[name]
        assert "it/s]" not in logs[name]  # no tqdm bars in a node's log
        # Planning read the headers of every weight file (Range reads from byte 0) before any
        # weight file was fetched whole.
        first_get = next(i for i, r in enumerate(asked) if r.file in own and r.range is None)
        headers = {
            r.file
            for r in asked[:first_get]
            if r.range is not None and r.range.startswith("bytes=0-")
        }
        assert headers == all_files, (name, headers)
        # Whole, besides those: the metadata files and nothing else.
        whole = {r.file for r in asked if r.method == "GET" and r.file and r.range is None}
        assert whole - own == META, (name, whole - own)
        # Nothing beyond what huggingface_hub asks for: the API, HEADs, GETs.
        assert all(r.method in ("GET", "HEAD") for r in asked)
    assert len({frozenset(v) for v in fetched.values()}) == 3


@pytest.mark.parametrize(("repo", "status", "cause"), [
    ("test-org/missing", None, "no such repo (or it is private or gated: set HF_TOKEN)"),
    (REPO, 500, "the hub answered HTTP 500"),
])  # fmt: skip
def test_a_hub_failure_is_one_line(
    tmp_path: Path, hub: HubStandIn, repo: str, status: int | None, cause: str
) -> None:
    if status is not None:
        hub.status[repo] = status
    cfg = write_valid_config(tmp_path, repo, 1)
    with hub_nodes(cfg, ["n0"], tmp_path, hub, {"n0": tmp_path / "cache"}) as procs:
        line = exit_line(procs["n0"])
    assert line.startswith(f"mlxring: cannot fetch {repo!r} from {hub.endpoint('n0')}: "), line
    assert line.endswith(cause), line
    assert not weight_gets(hub.of("n0"))


def test_an_unreachable_hub_is_one_line(tmp_path: Path, hub: HubStandIn) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = write_valid_config(tmp_path, REPO, 1)
    with hub_nodes(cfg, ["n0"], tmp_path, hub, {"n0": tmp_path / "cache"}, nowhere) as procs:
        line = exit_line(procs["n0"])
    assert line.startswith(f"mlxring: cannot fetch {REPO!r} from {nowhere}: ConnectError: "), line


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs: room for the metadata, not for the weights."""
    d = tmp_path / "small-disk"
    d.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_disk_without_room_is_refused_before_the_download(
    tmp_path: Path, hub: HubStandIn, sharded: Path, small_disk: Path
) -> None:
    cfg = write_valid_config(tmp_path, REPO, 1)
    need = sum(f.stat().st_size for f in sharded.glob("model-*.safetensors"))
    with hub_nodes(cfg, ["n0"], tmp_path, hub, {"n0": small_disk}) as procs:
        line = exit_line(procs["n0"])
    folder = small_disk / "models--test-org--tiny-sharded"
    assert f"need {need / 1e6:.2f} MB in {folder}, " in line, line
    assert line.endswith(" MB missing)"), line
    free, missing = (float(s.split(" MB")[0]) for s in line.split(", ")[-1].split(" free ("))
    assert abs(free + missing - need / 1e6) < 0.011, line
    assert not weight_gets(hub.of("n0"))  # refused before the first weight byte


def test_a_download_killed_halfway_resumes_on_restart(
    tmp_path: Path, hub: HubStandIn, sharded: Path
) -> None:
    slow = "model-00003-of-00006.safetensors"
    hub.slow[slow] = 40_000  # ~2 s for its 75 KB
    cfg = write_valid_config(tmp_path, REPO, 1)
    cache = tmp_path / "cache"
    blobs = cache / "models--test-org--tiny-sharded" / "blobs"
    part = blobs / f"{hashlib.sha256((sharded / slow).read_bytes()).hexdigest()}.incomplete"
    with hub_nodes(cfg, ["n0"], tmp_path, hub, {"n0": cache}) as procs:
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 16384):
            assert time.monotonic() < deadline, procs["n0"].log()[-3000:]
            assert procs["n0"].proc.poll() is None, procs["n0"].log()[-3000:]
            time.sleep(0.05)
        procs["n0"].kill()
    had = part.stat().st_size
    size = (sharded / slow).stat().st_size
    assert 0 < had < size
    del hub.slow[slow]
    before = len(hub.of("n0"))
    with hub_nodes(cfg, ["n0"], tmp_path, hub, {"n0": cache}) as procs:
        procs["n0"].wait_log("node_started", 60)
        log = procs["n0"].log()
    again = [r for r in hub.of("n0")[before:] if r.file == slow and r.method == "GET"]
    # Planning's header read, then only the missing bytes.
    assert [r.range for r in again] == ["bytes=0-100000", f"bytes={had}-"], again
    assert f'"resumed_from": {had}' in log
    fetched = cache / "models--test-org--tiny-sharded" / "snapshots" / hub.sha(REPO) / slow
    digest = hashlib.sha256(fetched.read_bytes()).hexdigest()
    assert digest == hashlib.sha256((sharded / slow).read_bytes()).hexdigest()
    assert not list(blobs.glob("*.incomplete"))
