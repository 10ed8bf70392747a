"""What a node says about itself and the ring: /v1/models, /health, /cluster/status, /metrics.

/cluster/status is rendered from one `RingSnapshot` (the same one the metrics read); `mlxring
status`, `mlxring top` and the web page read its JSON. A node without the head asks the head for
/health and /cluster/status; when the head cannot answer, it says what it knows alone. Both say
which long-lived tasks of the answering process (and of the head's, when asked through it) are
failing, under "tasks".
"""

from __future__ import annotations

import statistics
from typing import Any

import aiohttp
from aiohttp import web

from mlxring.api.errors import ApiError
from mlxring.api.metrics import PromptCacheCounts, prompt_cache_counts
from mlxring.api.proxy import ask_head, error_text
from mlxring.api.state import AUTHORIZED, STATE, ApiState
from mlxring.ring.snapshot import NodeRow, RingSnapshot, TaskRow

DECODE_TRIPS = 64  # recent decode steps the status' decode_trip_ms is the median of


def _model_object(state: ApiState) -> dict[str, Any]:
    return {
        "id": state.model_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "mlxring",
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request.app[STATE])]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    if name not in state.model_names:
        raise ApiError(
            404, f"The model {name!r} does not exist.", param="model", code="model_not_found"
        )
    return web.json_response(_model_object(state))


async def health(request: web.Request) -> web.Response:
    """The ring's health; to a client without the API key (where one is set), only whether it
    serves: node names, the model and the reasons stay behind the key."""
    resp = await _health(request)
    if request.get(AUTHORIZED, True):
        return resp
    word = "ok" if resp.status == 200 else "unavailable"
    retry = {k: v for k, v in resp.headers.items() if k == "Retry-After"}
    return web.json_response({"status": word}, status=resp.status, headers=retry)


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap = state.snapshot()
    tasks = [t.text for t in snap.tasks]
    if not state.hosts_head:
        try:
            status, body = await ask_head(state, "/health")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            reason = f"cannot reach the head {state.head_name}: {error_text(e)}"
            return _unhealthy(state, reason, tasks)
        if not isinstance(body, dict):
            reason = f"the head {state.head_name} answered {status} without JSON"
            return _unhealthy(state, reason, tasks)
        body["tasks"] = [*_list(body.get("tasks")), *tasks]
        headers = {"Retry-After": "2"} if status != 200 else {}
        return web.json_response(body, status=status, headers=headers)
    if snap.reason:
        return _unhealthy(state, snap.reason, tasks)
    return web.json_response(
        {
            "status": "ok",
            "head": state.head_name,
            "model": state.model_name,
            "nodes": list(state.members),
            "tasks": tasks,
        }
    )


def _unhealthy(state: ApiState, reason: str, tasks: list[str]) -> web.Response:
    return web.json_response(
        {"status": "unavailable", "head": state.head_name, "reason": reason, "tasks": tasks},
        status=503,
        headers={"Retry-After": "2"},
    )


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


async def cluster_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    snap = state.snapshot()
    if state.hosts_head:
        return web.json_response(status_here(snap, prompt_cache_counts(state.engine)))
    try:
        status, body = await ask_head(state, "/cluster/status")
        if status == 200 and isinstance(body, dict):
            # The head knows its own process's tasks; this process's are added here.
            body["tasks"] = [*_list(body.get("tasks")), *map(_task_json, snap.tasks)]
            return web.json_response(body)
        reason = f"the head {state.head_name} answered {status}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        reason = f"cannot reach the head {state.head_name}: {error_text(e)}"
    return web.json_response(status_local(snap, reason))


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def _round(x: float | None, digits: int) -> float | None:
    return round(x, digits) if x is not None else None


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None


def _node_json(
    row: NodeRow, layers: tuple[int, int] | None, up: bool, busy_share: float | None
) -> dict[str, Any]:
    st = row.report  # what the node reported of itself as the head's last good probe passed it
    return {
        "name": row.name,
        "position": row.position,
        "address": row.address,
        "ring_port": row.ring_port,
        "api_port": row.api_port,
        "layers": list(layers) if layers is not None else None,
        "up": up,
        "member": row.member,
        "head": row.head,
        "memory_active_bytes": st.active_bytes if st else None,
        "memory_peak_bytes": st.peak_bytes if st else None,
        "memory_total_bytes": st.total_bytes if st else None,
        "busy_s": round(st.busy_s, 4) if st else None,
        "busy_share": _round(busy_share, 3),
        "steps": st.steps if st else None,
        "decode_busy_s": round(st.decode_busy_s, 4) if st else None,
        "decode_steps": st.decode_steps if st else None,
        "kv_requests": st.requests if st else None,
        "prompt_cache_bytes": st.cache_bytes if st else None,
        "prompt_cache_entries": st.cache_entries if st else None,
    }


def _task_json(t: TaskRow) -> dict[str, Any]:
    return {
        "task": t.task,
        "nodes": list(t.nodes),
        "error": t.cause,
        "failures": t.failures,
        "failing_s": round(t.failing_s, 3),
        "retry_in_s": _round(t.retry_in_s, 3),
        "vital": t.vital,
        "text": t.text,
    }


def _head(snap: RingSnapshot) -> dict[str, Any]:
    return {
        "cluster": snap.cluster,
        "model": snap.model,
        "head": snap.head,
        "answered_by": snap.answered_by,
        "members": list(snap.members),
    }


def status_here(snap: RingSnapshot, cache: PromptCacheCounts | None) -> dict[str, Any]:
    """The head's view: while the ring serves, a node is up if the last probe passed through it
    (with the layers it reported); otherwise up means its heartbeat link is alive. `cache`: the
    head's prompt-cache counters (None before its engine starts)."""
    trips = snap.decode_trip_samples_s[-DECODE_TRIPS:]
    decode_hops = snap.decode_hop_samples_s
    return {
        **_head(snap),
        "ring": {
            "ok": snap.ok,
            "reason": snap.reason,
            "hop_ms": _ms(snap.hop_s),
            # Recent per-hop times of the head's probes (trip / hops); they pass an idle ring.
            "hop_samples_s": list(snap.hop_samples_s),
            # Network time of one hop of recent decode steps (mlxring/ring/hoptime.py).
            "decode_hop_ms": _ms(statistics.median(decode_hops)) if decode_hops else None,
            "decode_hop_samples_s": list(decode_hops),
            "last_probe_s_ago": _round(snap.probe_age_s, 3),
        },
        "nodes": [_node_json(r, r.layers, r.up, r.busy_share) for r in snap.nodes],
        "requests": {
            "generating": snap.queue.running,
            "waiting": snap.queue.waiting,
            "tokens_generated": snap.tokens_generated,
            "tokens_per_s": _round(snap.tokens_per_s, 2),
            "decode_trip_ms": _ms(statistics.median(trips)) if trips else None,
            # Requests that started from a kept prompt, those whose entry a shard had lost,
            # and the prompt tokens the hits did not prefill.
            "prompt_cache_hits": cache.hits if cache is not None else 0,
            "prompt_cache_misses": cache.misses if cache is not None else 0,
            "prompt_cache_tokens": cache.tokens if cache is not None else 0,
        },
        "tasks": [_task_json(t) for t in snap.tasks],
    }


def status_local(snap: RingSnapshot, reason: str) -> dict[str, Any]:
    """What a non-head node knows alone: the head is down; its own nodes are up; others are up
    while their heartbeat links are."""
    return {
        **_head(snap),
        "ring": {"ok": False, "reason": reason, "hop_ms": None, "last_probe_s_ago": None},
        "nodes": [_node_json(r, r.planned, r.reachable and not r.head, None) for r in snap.nodes],
        "requests": None,
        "tasks": [_task_json(t) for t in snap.tasks],
    }
