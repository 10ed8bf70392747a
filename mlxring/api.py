"""The aiohttp front actor: OpenAI-compatible endpoints on every node."""

from __future__ import annotations

from aiohttp import web

from mlxring.node import Runtime

RUNTIME = web.AppKey("runtime", Runtime)


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    if rt.monitor is None:
        return web.json_response({"status": "ok", "head": rt.head_name})
    view = rt.monitor.view
    if view.ok:
        return web.json_response({"status": "ok", "head": rt.head_name})
    return web.json_response({"status": "unavailable", "reason": view.reason}, status=503)


def create_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=runtime.config.api.max_body_bytes)
    app[RUNTIME] = runtime
    app.router.add_get("/health", health)
    return app


async def start_api(runtime: Runtime) -> list[web.AppRunner]:
    """One HTTP server per distinct API port of this process's nodes."""
    config = runtime.config
    ports = sorted({config.api_port(n) for n in runtime.names})
    runners = []
    for port in ports:
        runner = web.AppRunner(create_app(runtime), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, config.api.host, port).start()
        runners.append(runner)
    return runners
