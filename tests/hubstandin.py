"""A stand-in for the Hugging Face hub on loopback: an aiohttp server, in a thread of its own,
answering the requests huggingface_hub makes (the model API with its file listing, HEAD and
GET of /{repo}/resolve/{rev}/{file} with Range) for model directories on disk.

Each client points HF_ENDPOINT at its own prefix, http://127.0.0.1:PORT/<client>, so the server
knows who asked for what. It can answer a repo with an error status, and send a file slowly
(so that a download can be killed halfway). It sends no X-Xet-* header, so huggingface_hub
never takes the Xet path."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from aiohttp import web


@dataclass(frozen=True)
class Request:
    client: str
    method: str
    path: str  # after the client prefix, e.g. "org/name/resolve/<sha>/config.json"
    range: str | None

    @property
    def file(self) -> str | None:
        """The file a resolve request names."""
        return (
            self.path.split("/resolve/", 1)[1].split("/", 1)[1]
            if "/resolve/" in self.path
            else None
        )


class HubStandIn:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.requests: list[Request] = []
        self.status: dict[str, int] = {}  # repo -> the HTTP status every request for it gets
        self.slow: dict[str, float] = {}  # file name -> bytes per second it is sent at
        self._shas = {r: self._commit(d) for r, d in repos.items()}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @staticmethod
    def _commit(directory: Path) -> str:
        digest = hashlib.sha1()
        for f in sorted(directory.iterdir()):
            digest.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
        return digest.hexdigest()

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{client}/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def endpoint(self, client: str) -> str:
        return f"http://127.0.0.1:{self.port}/{client}"

    def sha(self, repo: str) -> str:
        return self._shas[repo]

    def of(self, client: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.client == client]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        client, tail = request.match_info["client"], request.match_info["tail"]
        with self._lock:
            self.requests.append(
                Request(client, request.method, tail, request.headers.get("Range"))
            )
        if tail.startswith("api/models/"):
            repo = tail.removeprefix("api/models/").split("/revision/")[0].split("/tree/")[0]
            if "/tree/" in tail:  # snapshot_download lists the files so
                return self._error(repo) or self._tree(repo)
            return self._error(repo) or self._info(repo)
        if "/resolve/" not in tail:
            return web.json_response({"error": "not found"}, status=404)
        repo, rest = tail.split("/resolve/", 1)
        name = rest.split("/", 1)[1]
        error = self._error(repo)
        if error is not None:
            return error
        path = self.repos[repo] / name
        if not path.is_file():
            return web.json_response(
                {"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"}
            )
        return await self._file(request, repo, path)

    def _error(self, repo: str) -> web.Response | None:
        if repo not in self.repos:
            return web.json_response(
                {"error": "Repository not found"},
                status=404,
                headers={"X-Error-Code": "RepoNotFound"},
            )
        status = self.status.get(repo)
        if status is not None:
            return web.json_response({"error": "stand-in failure"}, status=status)
        return None

    def _info(self, repo: str) -> web.Response:
        siblings = []
        for f in sorted(self.repos[repo].iterdir()):
            etag = hashlib.sha256(f.read_bytes()).hexdigest()
            size = f.stat().st_size
            siblings.append({"rfilename": f.name, "size": size, "blobId": etag[:40], "lfs": None})
        return web.json_response({"id": repo, "sha": self.sha(repo), "siblings": siblings})

    def _tree(self, repo: str) -> web.Response:
        entries = []
        for f in sorted(self.repos[repo].iterdir()):
            etag = hashlib.sha256(f.read_bytes()).hexdigest()
            size = f.stat().st_size
            entries.append({"type": "file", "oid": etag[:40], "size": size, "path": f.name})
        return web.json_response(entries)

    async def _file(self, request: web.Request, repo: str, path: Path) -> web.StreamResponse:
        data = path.read_bytes()
        etag = hashlib.sha256(data).hexdigest()
        headers = {
            "ETag": f'"{etag}"',
            "X-Repo-Commit": self.sha(repo),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["X-Linked-Size"] = str(len(data))
            return web.Response(status=200, headers=headers)
        start, end, status = 0, len(data) - 1, 200
        spec = request.headers.get("Range")
        if spec is not None and spec.startswith("bytes="):
            a, b = spec.removeprefix("bytes=").split("-")
            start, end = int(a), min(len(data) - 1, int(b)) if b else len(data) - 1
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        body = data[start : end + 1]
        headers["Content-Length"] = str(len(body))
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        rate = self.slow.get(path.name)
        step = 8192 if rate else len(body) or 1
        for i in range(0, len(body), step):
            await response.write(body[i : i + step])
            if rate:
                await asyncio.sleep(step / rate)
        await response.write_eof()
        return response
