"""The aiohttp front actor: OpenAI-compatible endpoints on every node.

The process hosting the head (the one with the engine) serves generation itself; any other node
forwards API requests to the head's API and streams the answer back event by event.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models[/{id}]`,
`GET /health`, `GET /cluster/status`, `GET /metrics` (Prometheus text, this process's own), and
the web page `GET /` with its files under `/web/`. Every error body has OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`. With an API key set, every endpoint needs it
but /health and the web page's files (they hold no data; the page asks for the key).

Decisions worth knowing:
- A prompt that leaves no room for one generated token is 413 (`context_length_exceeded`); a
  prompt that fits but with an explicit `max_tokens` that does not is 400 with the same code
  (OpenAI's answer). Without `max_tokens` a request may generate up to the end of the context.
- `temperature` defaults to 0 (greedy), as in mlx-lm's server, not OpenAI's 1.
- `usage.completion_tokens` counts every token the ring sampled, the EOS token included.
- Generation ends at the first token after which a stop string appears; the text is cut right
  before it. While streaming, a tail that could begin a stop string is held back.
- Every API port of the process shares one queue: `api.max_concurrent` generate, `api.max_queue`
  wait (at most `cluster.request_timeout_s`), the rest get 429.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import statistics
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, TypeGuard, cast

import aiohttp
import structlog
from aiohttp import web
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

from mlxring.aio import wait_for
from mlxring.api.metrics import Metrics, QueueDepth, TokenTimer
from mlxring.engine.lifecycle import GeneratedToken, RingUnavailable
from mlxring.protocol.messages import SamplingParams
from mlxring.ring.runtime import Runtime

log = structlog.get_logger()

Kind = Literal["chat", "completion"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FORWARDED = "X-Mlxring-Forwarded"  # set by a non-head node on the request it forwards
FORWARDED_RID = "X-Mlxring-Request-Id"  # the forwarding node's rid, for correlating logs
SHUTDOWN_S = 5.0  # how long a stopping node lets in-flight responses finish
PROXY_CONNECT_S = 5.0
STATUS_TIMEOUT_S = 3.0  # /health and /cluster/status asked of the head
RATE_EVERY_S = 2.0  # tokens/s and busy shares are measured over RATE_SAMPLES such periods
RATE_SAMPLES = 6
MAX_STOP = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_RID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Routes served without the API key: the web page and its files hold no data.
PUBLIC_ROUTES = frozenset({"web-index", "web-file"})
# Successful GETs of these routes log at debug: the web page polls status every second.
QUIET_ROUTES = frozenset({"health", "cluster-status", "metrics", "web-index", "web-file"})
WEB_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_WEB_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


# ---------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unavailable(reason: str) -> ApiError:
    # Retry-After: the ring re-forms within a few heartbeats once its nodes are back.
    return ApiError(
        503,
        f"The cluster cannot serve this request: {reason}",
        type_="cluster_unavailable",
        code="cluster_unavailable",
        headers={"Retry-After": "2"},
    )


def internal_error() -> ApiError:
    return ApiError(
        500,
        "The server had an error while processing your request. Check the node's log.",
        type_="server_error",
    )


def _http_error(e: web.HTTPException, request: web.Request) -> ApiError:
    """aiohttp's own errors (no route, wrong method, body too big) in OpenAI's shape."""
    if isinstance(e, web.HTTPNotFound):
        return ApiError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return ApiError(
            405,
            f"Method {request.method} is not allowed for {request.path} (allowed: {allowed})",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return _body_too_large(request)
    return ApiError(e.status, e.reason, type_="invalid_request_error")


def _body_too_large(request: web.Request) -> ApiError:
    limit = request.app[STATE].runtime.config.api.max_body_bytes
    return ApiError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes "
        "(api.max_body_bytes).",
        code="request_too_large",
    )


# ---------------------------------------------------------------------------------------------
# Parsed requests


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, str]:
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        out = {"role": role, "content": self.content}
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class GenerationRequest:
    kind: Kind
    model: str | None
    params: SamplingParams
    max_tokens: int | None  # None: up to the end of the context
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    messages: tuple[ChatMessage, ...] = ()  # chat
    prompt_text: str | None = None  # completion, as text
    prompt_ids: tuple[int, ...] | None = None  # completion, as token ids
    # Extension (as in vLLM): keep generating past EOS, for benchmarks of fixed length.
    ignore_eos: bool = False

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _wrong_type(param: str, expected: str, value: Any) -> ApiError:
    return invalid(
        param,
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        code="invalid_type",
    )


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


class Fields:
    """Typed access to one JSON object's fields; every error names its `param`.

    A field that is absent or null reads as None (OpenAI treats null as "not given")."""

    def __init__(self, data: dict[str, Any], prefix: str = "") -> None:
        self.data = data
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def boolean(self, key: str, default: bool = False) -> bool:
        v = self.data.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _wrong_type(self.name(key), "a boolean", v)
        return v

    def integer(self, key: str, *, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not _is_int(v):
            raise _wrong_type(self.name(key), "an integer", v)
        _check_range(self.name(key), v, lo, hi)
        return int(v)

    def number(
        self, key: str, *, lo: float, hi: float | None, lo_open: bool = False
    ) -> float | None:
        v = self.data.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _wrong_type(self.name(key), "a number", v)
        x = float(v)
        if (x <= lo if lo_open else x < lo) or (hi is not None and x > hi):
            left = "(" if lo_open else "["
            right = f"{hi:g}]" if hi is not None else "inf)"
            raise invalid(
                self.name(key),
                f"Invalid value for '{self.name(key)}': {v} is not in {left}{lo:g}, {right}.",
            )
        return x

    def string(self, key: str) -> str | None:
        v = self.data.get(key)
        if v is None:
            return None
        if not isinstance(v, str):
            raise _wrong_type(self.name(key), "a string", v)
        return v


def _check_range(param: str, v: int, lo: int | None, hi: int | None) -> None:
    if lo is not None and v < lo:
        raise invalid(param, f"Invalid value for '{param}': {v} is below the minimum of {lo}.")
    if hi is not None and v > hi:
        raise invalid(param, f"Invalid value for '{param}': {v} is above the maximum of {hi}.")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise invalid(
            None,
            "We could not parse the JSON body of your request. The body must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise invalid(
            None, f"The request body must be a JSON object, not {_type_name(data)}.", "invalid_json"
        )
    return data


def _parse_messages(value: Any) -> tuple[ChatMessage, ...]:
    if value is None:
        raise invalid("messages", "Missing required parameter: 'messages'.", "missing_required")
    if not isinstance(value, list):
        raise _wrong_type("messages", "an array", value)
    if not value:
        raise invalid("messages", "'messages' must be a non-empty array.", "empty_array")
    out = []
    for i, m in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(p, "an object", m)
        f = Fields(m, p + ".")
        role = f.string("role")
        if role is None:
            raise invalid(f"{p}.role", f"Missing required parameter: '{p}.role'.")
        if role not in CHAT_ROLES:
            raise invalid(
                f"{p}.role",
                f"Invalid value for '{p}.role': {role!r}; supported: {', '.join(CHAT_ROLES)}.",
            )
        content = _parse_content(f"{p}.content", m.get("content"), role)
        out.append(ChatMessage(role, content, f.string("tool_call_id")))
    return tuple(out)


def _parse_content(param: str, value: Any, role: str) -> str:
    if value is None:
        if role == "assistant":  # an assistant turn that only called tools
            return ""
        raise invalid(param, f"Missing required parameter: '{param}'.", "missing_required")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _wrong_type(param, "a string or an array of content parts", value)
    parts = []
    for j, part in enumerate(value):
        pp = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _wrong_type(pp, "an object", part)
        if part.get("type") != "text":
            raise invalid(
                f"{pp}.type",
                f"Unsupported content part type {part.get('type')!r} in '{pp}': this server "
                "serves a text model and accepts only parts of type 'text'.",
            )
        text = Fields(part, pp + ".").string("text")
        if text is None:
            raise invalid(f"{pp}.text", f"Missing required parameter: '{pp}.text'.")
        parts.append(text)
    return "".join(parts)


def _parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP} strings, got {len(items)}.")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise _wrong_type(f"stop[{i}]", "a string", s)
        if not s:
            raise invalid(f"stop[{i}]", "Stop strings must not be empty.")
    return tuple(items)


def _parse_logit_bias(value: Any, vocab_size: int) -> tuple[tuple[int, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _wrong_type("logit_bias", "an object", value)
    out = []
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise invalid(
                "logit_bias", f"Invalid key {key!r} in 'logit_bias': keys are token ids."
            ) from None
        if not 0 <= token < vocab_size:
            raise invalid(
                "logit_bias",
                f"Invalid key {key!r} in 'logit_bias': token ids are 0..{vocab_size - 1}.",
            )
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise _wrong_type(f"logit_bias.{key}", "a number", bias)
        if not -100 <= bias <= 100:
            raise invalid(
                f"logit_bias.{key}",
                f"Invalid value for 'logit_bias.{key}': {bias} is not in [-100, 100].",
            )
        out.append((token, float(bias)))
    return tuple(out)


def _parse_prompt(value: Any, vocab_size: int) -> tuple[str | None, tuple[int, ...] | None]:
    """A completions prompt: a string, or token ids; a one-element batch of either."""
    if value is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required")
    if isinstance(value, str):
        return value, None
    if not isinstance(value, list):
        raise _wrong_type("prompt", "a string or an array", value)
    if not value:
        raise invalid("prompt", "'prompt' must not be empty.")
    if all(_is_int(t) for t in value):
        return None, _token_ids("prompt", value, vocab_size)
    if len(value) != 1:
        raise invalid("prompt", "This server takes one prompt per request, not a batch.")
    (one,) = value
    if isinstance(one, str):
        return one, None
    if isinstance(one, list) and one and all(_is_int(t) for t in one):
        return None, _token_ids("prompt[0]", one, vocab_size)
    raise _wrong_type("prompt[0]", "a string or an array of token ids", one)


def _token_ids(param: str, ids: list[int], vocab_size: int) -> tuple[int, ...]:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise invalid(param, f"Token id {t} in '{param}' is not in 0..{vocab_size - 1}.")
    return tuple(ids)


def parse_generation(kind: Kind, data: dict[str, Any], vocab_size: int) -> GenerationRequest:
    """Check every field this server knows; unknown fields are ignored, as OpenAI does."""
    f = Fields(data)
    model = f.string("model")
    n = f.integer("n")
    if n is not None and n != 1:
        raise invalid("n", f"Only n=1 is supported (one choice per request), got n={n}.")
    stream = f.boolean("stream")
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _wrong_type("stream_options", "an object", opts)
        include_usage = Fields(opts, "stream_options.").boolean("include_usage")

    max_tokens = f.integer("max_tokens", lo=1)
    if kind == "chat":
        max_tokens = f.integer("max_completion_tokens", lo=1) or max_tokens

    temperature = f.number("temperature", lo=0, hi=2)
    top_p = f.number("top_p", lo=0, hi=1, lo_open=True)
    top_k = f.integer("top_k", lo=0)
    min_p = f.number("min_p", lo=0, hi=1)
    repetition_penalty = f.number("repetition_penalty", lo=0, hi=10, lo_open=True)
    repetition_context_size = f.integer("repetition_context_size", lo=1, hi=1 << 20)
    presence_penalty = f.number("presence_penalty", lo=-2, hi=2)
    frequency_penalty = f.number("frequency_penalty", lo=-2, hi=2)
    seed = f.integer("seed", lo=-(1 << 63), hi=(1 << 64) - 1)
    logit_bias = _parse_logit_bias(data.get("logit_bias"), vocab_size)
    stop = _parse_stop(data.get("stop"))

    logprobs: int | None
    if kind == "chat":
        want = f.boolean("logprobs")
        top = f.integer("top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS_CHAT)
        if top is not None and not want:
            raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        logprobs = (top or 0) if want else None
    else:
        logprobs = f.integer("logprobs", lo=0, hi=MAX_LOGPROBS_COMPLETION)

    params = SamplingParams(
        temperature=temperature if temperature is not None else 0.0,
        top_p=top_p if top_p is not None else 1.0,
        # mlx-lm refuses top_k >= vocab (and the failure would poison the shard's PRNG state);
        # keeping that many tokens is no filter at all.
        top_k=top_k if top_k is not None and top_k < vocab_size else 0,
        min_p=min_p or 0.0,
        repetition_penalty=repetition_penalty,
        repetition_context_size=repetition_context_size or 20,
        # 0 is OpenAI's "off"; None skips the logits processor altogether.
        presence_penalty=presence_penalty or None,
        frequency_penalty=frequency_penalty or None,
        logit_bias=logit_bias,
        # mx.random.key takes an unsigned 64-bit seed; negative seeds wrap around.
        seed=seed % (1 << 64) if seed is not None else None,
        logprobs=logprobs,
    )
    messages: tuple[ChatMessage, ...] = ()
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if kind == "chat":
        tools = data.get("tools")
        if tools:  # silently ignoring tools would answer a question the client did not ask
            raise invalid("tools", "Tool calling is not supported by this server.")
        fmt = data.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise invalid("response_format", "Only response_format type 'text' is supported.")
        messages = _parse_messages(data.get("messages"))
    else:
        if f.boolean("echo"):
            raise invalid("echo", "'echo' is not supported by this server.")
        if f.string("suffix"):
            raise invalid("suffix", "'suffix' is not supported by this server.")
        best_of = f.integer("best_of")
        if best_of is not None and best_of != 1:
            raise invalid("best_of", f"Only best_of=1 is supported, got {best_of}.")
        text, ids = _parse_prompt(data.get("prompt"), vocab_size)
    return GenerationRequest(
        kind=kind,
        model=model,
        params=params,
        max_tokens=max_tokens,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        messages=messages,
        prompt_text=text,
        prompt_ids=ids,
        ignore_eos=bool(f.boolean("ignore_eos")),
    )


# ---------------------------------------------------------------------------------------------
# Admission: a bounded number generating, a bounded queue waiting, 429 beyond


class Admission:
    def __init__(self, max_concurrent: int, max_queue: int, wait_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.wait_s = wait_s  # the longest a request waits in the queue for a slot
        self._sem = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.waiting = 0

    def _busy(self, message: str, code: str) -> ApiError:
        return ApiError(
            429,
            f"{message} ({self.running} requests generating, {self.waiting} waiting); "
            "retry shortly.",
            type_="rate_limit_exceeded",
            code=code,
            headers={"Retry-After": "1"},
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            raise self._busy("The server is at capacity", "queue_full")
        self.waiting += 1
        try:
            await wait_for(self._sem.acquire(), self.wait_s)
        except TimeoutError:
            raise self._busy(
                f"No generation slot freed up within {self.wait_s:g} s", "queue_timeout"
            ) from None
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()


# ---------------------------------------------------------------------------------------------
# Tokens to text: detokenize, cut at stop strings, hold back what could begin one


@dataclass(frozen=True)
class TokenInfo:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int  # where this token's text starts in the completion text


@dataclass(frozen=True)
class Piece:
    """A part of the completion ready to go to the client; the last one has a finish_reason."""

    text: str
    tokens: tuple[TokenInfo, ...]
    finish_reason: str | None = None
    completion_tokens: int = 0


class IncrementalDecoder:
    """Token ids to text as they arrive, equal to decoding them all at once.

    Each step decodes a short window and emits what the new token added to it (the method of
    vLLM and TGI). The window starts on the prompt's tail, so a first token's leading space is
    kept (mlx-lm's streaming detokenizer drops it); text ending in a partial UTF-8 character
    waits for the next token.
    """

    CONTEXT = 6

    def __init__(self, decode: Callable[[list[int]], str], prompt: Sequence[int]) -> None:
        self._decode = decode
        self.ids = list(prompt[-self.CONTEXT :])
        self.prefix = 0
        self.read = len(self.ids)
        self._before = decode(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, final: bool) -> str:
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(self._before) or (after.endswith("\ufffd") and not final):
            return ""
        new = after[len(self._before) :]
        self.prefix, self.read = self.read, len(self.ids)
        self._before = self._decode(self.ids[self.prefix : self.read])
        if self.prefix > 4096:  # keep the id list short on very long generations
            del self.ids[: self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return new


class TextAssembler:
    def __init__(self, decoder: IncrementalDecoder, stops: Sequence[str]) -> None:
        self.decoder = decoder
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0
        self.pending: list[TokenInfo] = []

    def add(self, token: int, logprob: float, top: tuple[tuple[int, float], ...]) -> None:
        self.pending.append(TokenInfo(token, logprob, top, len(self.text)))
        self.text += self.decoder.add(token)

    def finalize(self) -> None:
        self.text += self.decoder.flush()

    def take(self, final: bool) -> tuple[str, tuple[TokenInfo, ...], bool]:
        """Text safe to send now, the tokens it carries, and whether a stop string ended it."""
        cut = self._first_stop()
        if cut is not None:
            end = cut
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._holdback()
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        if cut is not None or final:
            tokens = [t for t in self.pending if t.offset < end or (final and cut is None)]
            self.pending = []
        else:
            tokens = [t for t in self.pending if t.offset < end]
            self.pending = self.pending[len(tokens) :]
        return out, tuple(tokens), cut is not None

    def _first_stop(self) -> int | None:
        # Text before `sent` never holds the start of a stop string (it was held back).
        found = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        return min(found) if found else None

    def _holdback(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


# ---------------------------------------------------------------------------------------------
# Per-process state shared by the apps of every API port


@dataclass
class ApiState:
    runtime: Runtime
    admission: Admission
    started: float = field(default_factory=time.time)
    # One thread for the tokenizer: long prompts stay off the event loop, and calls into the
    # Rust tokenizer never overlap.
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="mlxring-tokenize")
    )
    session: aiohttp.ClientSession | None = None
    users: int = 0
    _token_text: dict[int, tuple[str, list[int]]] = field(default_factory=dict)
    _byte_tokens: list[str] | None = None  # byte-level BPE token strings, [] if not byte-level

    # (time, tokens generated, each node's busy seconds), sampled every RATE_EVERY_S.
    _samples: deque[tuple[float, int, dict[str, float]]] = field(
        default_factory=lambda: deque(maxlen=RATE_SAMPLES)
    )
    _sampler: asyncio.Task[None] | None = None
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        adm = self.admission
        self.metrics = Metrics(self.runtime, lambda: QueueDepth(adm.running, adm.waiting))

    async def open(self) -> None:
        self.users += 1
        if self.session is None:
            api = self.runtime.config.api
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=api.max_concurrent + api.max_queue + 16),
                auto_decompress=False,
            )
        if self._sampler is None:
            self._sampler = asyncio.get_running_loop().create_task(self._sample_rates())

    async def close(self) -> None:
        self.users -= 1
        if self.users <= 0:
            if self._sampler is not None:
                self._sampler.cancel()
                self._sampler = None
            if self.session is not None:
                await self.session.close()
                self.session = None
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def _sample(self) -> tuple[float, int, dict[str, float]]:
        rt = self.runtime
        busy = {n: st.busy_s for n, st in rt.monitor.stats.items()} if rt.monitor else {}
        tokens = rt.engine.tokens_generated if rt.engine is not None else 0
        return time.monotonic(), tokens, busy

    async def _sample_rates(self) -> None:
        while True:
            self._samples.append(self._sample())
            await asyncio.sleep(RATE_EVERY_S)

    def rates(self) -> tuple[float | None, dict[str, float]]:
        """Tokens per second and each node's busy share over the last few seconds."""
        if not self._samples:
            return None, {}
        t0, tokens0, busy0 = self._samples[0]
        t1, tokens1, busy1 = self._sample()
        dt = t1 - t0
        if dt < 0.5:
            return None, {}
        # A new engine (after a re-plan) restarts its count: no rate across that.
        tps = (tokens1 - tokens0) / dt if tokens1 >= tokens0 else None
        share = {n: min(1.0, max(0.0, (b - busy0[n]) / dt)) for n, b in busy1.items() if n in busy0}
        return tps, share

    def token_text(self, token: int) -> tuple[str, list[int]]:
        """A token's own text and bytes, for logprobs (cached: the same ids come up again)."""
        hit = self._token_text.get(token)
        if hit is None:
            tok = self.runtime.tokenizer
            assert tok is not None
            text = str(tok.decode([token]))
            raw = text.encode()
            if self._byte_tokens is None:
                detok = tok.detokenizer
                self._byte_tokens = (
                    list(detok.tokenmap) if isinstance(detok, BPEStreamingDetokenizer) else []
                )
            if token < len(self._byte_tokens):
                # Byte-level BPE: a token may hold part of a UTF-8 character; give its real bytes.
                piece = self._byte_tokens[token]
                raw = b"".join(
                    bytes([_BYTE_LEVEL[c]]) if c in _BYTE_LEVEL else c.encode() for c in piece
                )
            hit = self._token_text[token] = (text, list(raw))
            if len(self._token_text) > 65536:
                self._token_text.clear()
        return hit

    def head_address(self) -> tuple[str, int] | None:
        """Where the head's API listens, as a node of this ring sees it."""
        rt = self.runtime
        api = rt.config.api
        head = rt.config.node(rt.head_name)
        # A wildcard API host listens on every address: reach the head at its ring address.
        host = head.host if api.host in ("0.0.0.0", "::", "") else api.host
        if host is None:
            return None
        return host, rt.config.api_port(rt.head_name)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the character that stands for each byte in a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    out = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in out.values()]
    out.update({chr(256 + i): b for i, b in enumerate(others)})
    return out


_BYTE_LEVEL = _byte_level_alphabet()


STATE = web.AppKey("mlxring_api_state", ApiState)
RID = web.RequestKey("mlxring_rid", str)
ARRIVED = web.RequestKey("mlxring_arrived", float)  # time.monotonic() when the request came in
NOTES = web.RequestKey("mlxring_notes", dict[str, Any])  # fields for the request's log line


def _note(request: web.Request, **fields: Any) -> None:
    notes: dict[str, Any] = dict(request.get(NOTES, {}))
    notes.update(fields)
    request[NOTES] = notes


def context_length(model_config: dict[str, Any]) -> int | None:
    for cfg in (model_config, model_config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            v = cfg.get(key)
            if _is_int(v) and v > 0:
                return int(v)
    return None


def vocab_size(rt: Runtime) -> int:
    cfg = rt.model_config
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if _is_int(v) and v > 0:
        return int(v)
    return len(rt.tokenizer) if rt.tokenizer is not None else 1 << 31


# ---------------------------------------------------------------------------------------------
# Middleware: request ids, auth, errors, one log line per request


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    rid = uuid.uuid4().hex[:16]
    request[RID] = rid
    upstream = request.headers.get(FORWARDED_RID, "")
    t0 = time.perf_counter()
    request[ARRIVED] = time.monotonic()
    with structlog.contextvars.bound_contextvars(
        rid=rid, **({"via_rid": upstream} if _RID_OK.match(upstream) else {})
    ):
        try:
            _check_auth(request, state)
            resp = await handler(request)
        except ApiError as e:
            resp = e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = _http_error(e, request).response()
        except asyncio.CancelledError:
            # The client hung up (aiohttp cancels its handler); 499 as nginx logs it.
            _log_request(request, 499, t0)
            raise
        except Exception:  # never a traceback or a path in a body: details go to the log
            log.exception("request_failed", method=request.method, path=request.path)
            resp = internal_error().response()
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        _log_request(request, resp.status, t0)
        return resp


def _log_request(request: web.Request, status: int, t0: float) -> None:
    seconds = time.perf_counter() - t0
    notes = request.get(NOTES, {})
    route = request.match_info.route
    resource = route.resource
    endpoint = resource.canonical if resource is not None else "other"
    request.app[STATE].metrics.request_done(
        endpoint, request.method, status, seconds, notes.get("finish_reason")
    )
    quiet = status < 400 and route.name in QUIET_ROUTES
    (log.debug if quiet else log.info)(
        "http_request",
        method=request.method,
        path=request.path,
        status=status,
        ms=round(seconds * 1000, 1),
        **notes,
    )


def _check_auth(request: web.Request, state: ApiState) -> None:
    key = state.runtime.config.api.api_key
    if not key or request.path == "/health" or request.match_info.route.name in PUBLIC_ROUTES:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
            code="invalid_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


# ---------------------------------------------------------------------------------------------
# Generation endpoints


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, "completion")


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[STATE].runtime.config.api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise _body_too_large(request)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _body_too_large(request) from None


def _hosts_head(rt: Runtime) -> bool:
    """Whether this process is (or, while re-planning, is about to be again) the head."""
    return rt.engine is not None or rt.head_name in rt.nodes


def _not_serving(rt: Runtime) -> str:
    """Why the head in this process cannot serve now ("" when it can)."""
    reason = rt.serving_reason()
    if not reason and rt.engine is None:
        reason = "the head is not serving yet"
    return reason


async def _generation(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE]
    rt = state.runtime
    if not _hosts_head(rt):
        return await _forward(request)
    data = parse_json_body(await _read_body(request))
    req = parse_generation(kind, data, vocab_size(rt))
    if req.model is not None and req.model not in (rt.model_name, rt.config.cluster.model):
        raise ApiError(
            400,
            f"The model {req.model!r} does not exist on this server; it serves "
            f"{rt.model_name!r} (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )
    ids = await _prompt_ids(state, req)
    max_tokens = _fit_context(rt, req, len(ids))
    # Refuse at once when the ring cannot serve, rather than time out inside the engine.
    if reason := _not_serving(rt):
        raise unavailable(reason)
    _note(request, prompt_tokens=len(ids))
    async with state.admission.slot():
        timer = state.metrics.timer(len(ids), request[ARRIVED])
        pieces = _pieces(state, req, ids, max_tokens, request[RID], timer)
        async with contextlib.aclosing(pieces):
            if req.stream:
                return await _stream(request, req, len(ids), pieces)
            return await _complete(request, req, len(ids), pieces)


async def _prompt_ids(state: ApiState, req: GenerationRequest) -> list[int]:
    tok = state.runtime.tokenizer
    assert tok is not None
    if req.prompt_ids is not None:
        return list(req.prompt_ids)

    def run() -> list[int]:
        if req.kind == "chat":
            msgs = [m.template_dict() for m in req.messages]
            return list(tok.apply_chat_template(msgs, add_generation_prompt=True))
        assert req.prompt_text is not None
        return list(tok.encode(req.prompt_text))

    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(state.tokenize_pool, run)
    except Exception as e:  # noqa: BLE001 - the template or tokenizer rejected this input
        what = "the model's chat template" if req.kind == "chat" else "the tokenizer"
        log.info("prompt_rejected", error=f"{type(e).__name__}: {e}")
        raise invalid(
            req.prompt_param, f"The {req.prompt_param} could not be processed by {what}: {e}"
        ) from None
    if not ids:
        raise invalid(req.prompt_param, f"The {req.prompt_param} encodes to no tokens.")
    return ids


def _fit_context(rt: Runtime, req: GenerationRequest, n_prompt: int) -> int:
    """The max_tokens to generate; 413 for a prompt over the context, 400 for a budget over."""
    ctx = context_length(rt.model_config)
    if ctx is None:
        return req.max_tokens or 4096
    if n_prompt >= ctx:
        raise ApiError(
            413,
            f"This model's maximum context length is {ctx} tokens. However, your "
            f"{req.prompt_param} resulted in {n_prompt} tokens, which leaves no room to generate.",
            param=req.prompt_param,
            code="context_length_exceeded",
        )
    if req.max_tokens is None:
        return ctx - n_prompt
    if n_prompt + req.max_tokens > ctx:
        raise invalid(
            "max_tokens",
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{n_prompt + req.max_tokens} tokens ({n_prompt} in the {req.prompt_param}, "
            f"{req.max_tokens} for the completion). Please reduce the length of the "
            f"{req.prompt_param} or the completion.",
            code="context_length_exceeded",
        )
    return req.max_tokens


async def _pieces(
    state: ApiState,
    req: GenerationRequest,
    ids: list[int],
    max_tokens: int,
    rid: str,
    timer: TokenTimer,
) -> AsyncGenerator[Piece, None]:
    rt = state.runtime
    # Checked again here: the ring may have gone down while this request waited for a slot.
    engine, tok = rt.engine, rt.tokenizer
    reason = _not_serving(rt)
    if engine is None or tok is None or reason:
        raise RingUnavailable(reason or "the head is not serving")
    decoder = IncrementalDecoder(lambda ids: str(tok.decode(ids)), ids)
    text = TextAssembler(decoder, req.stop)
    n = 0
    gen = cast(
        AsyncGenerator[GeneratedToken, None],
        engine.generate(ids, req.params, max_tokens, rid=rid, ignore_eos=req.ignore_eos),
    )
    # Leaving this block early (stop string, client gone, error) closes the engine's generator,
    # which sends End(rid) and frees the request's caches on every shard.
    async with contextlib.aclosing(gen):
        async for g in gen:
            n += 1
            timer.token()
            if g.finish_reason != "stop":  # the EOS token ends the text; it is not part of it
                text.add(g.token, g.logprob, g.top_logprobs)
            final = g.finish_reason is not None
            if final:
                text.finalize()
            out, tokens, stopped = text.take(final)
            if stopped or final:
                yield Piece(out, tokens, "stop" if stopped else g.finish_reason, n)
                return
            if out or tokens:
                yield Piece(out, tokens)
    yield Piece("", (), "length", n)  # the engine ended without a finish reason (max_tokens)


def _usage(n_prompt: int, n_completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_completion,
        "total_tokens": n_prompt + n_completion,
    }


class Formatter:
    """OpenAI's JSON shapes for one request's responses and stream chunks."""

    def __init__(self, state: ApiState, req: GenerationRequest, rid: str) -> None:
        self.state = state
        self.req = req
        self.chat = req.kind == "chat"
        self.id = f"chatcmpl-{rid}" if self.chat else f"cmpl-{rid}"
        self.created = int(time.time())
        self.model = state.runtime.model_name

    def _envelope(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def logprobs(self, tokens: Sequence[TokenInfo]) -> dict[str, Any] | None:
        if self.req.params.logprobs is None:
            return None
        tt = self.state.token_text
        if self.chat:

            def entry(t: int, lp: float) -> dict[str, Any]:
                text, raw = tt(t)
                return {"token": text, "logprob": lp, "bytes": raw}

            return {
                "content": [
                    {**entry(t.token, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                    for t in tokens
                ],
                "refusal": None,
            }
        return {
            "tokens": [tt(t.token)[0] for t in tokens],
            "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{tt(i)[0]: v for i, v in t.top} for t in tokens],
            "text_offset": [t.offset for t in tokens],  # from the start of the completion
        }

    def response(
        self, text: str, tokens: Sequence[TokenInfo], finish: str | None, usage: dict[str, int]
    ) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self.logprobs(tokens),
                "finish_reason": finish,
            }
            return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage}
        choice = {
            "index": 0,
            "text": text,
            "logprobs": self.logprobs(tokens),
            "finish_reason": finish,
        }
        return {**self._envelope("text_completion"), "choices": [choice], "usage": usage}

    def chunk(self, piece: Piece | None, first: bool = False) -> dict[str, Any]:
        usage: dict[str, Any] = {"usage": None} if self.req.include_usage else {}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if piece is not None and piece.text:
                delta["content"] = piece.text
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta,
                "logprobs": self.logprobs(piece.tokens) if piece else None,
                "finish_reason": piece.finish_reason if piece else None,
            }
            return {**self._envelope("chat.completion.chunk"), "choices": [choice], **usage}
        assert piece is not None
        choice = {
            "index": 0,
            "text": piece.text,
            "logprobs": self.logprobs(piece.tokens),
            "finish_reason": piece.finish_reason,
        }
        return {**self._envelope("text_completion"), "choices": [choice], **usage}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage}


async def _complete(
    request: web.Request, req: GenerationRequest, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    texts: list[str] = []
    tokens: list[TokenInfo] = []
    last = Piece("", ())
    try:
        async for p in pieces:
            texts.append(p.text)
            tokens.extend(p.tokens)
            last = p
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    usage = _usage(n_prompt, last.completion_tokens)
    _note(request, **usage, finish_reason=last.finish_reason)
    return web.json_response(fmt.response("".join(texts), tokens, last.finish_reason, usage))


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not buffer the stream
}


async def _stream(
    request: web.Request, req: GenerationRequest, n_prompt: int, pieces: AsyncIterator[Piece]
) -> web.StreamResponse:
    fmt = Formatter(request.app[STATE], req, request[RID])
    # Headers wait for the first piece so that a ring that cannot serve still gets a real 503.
    try:
        piece = await anext(pieces)
    except RingUnavailable as e:
        raise unavailable(str(e)) from None
    resp = web.StreamResponse(headers={**SSE_HEADERS, "X-Request-Id": request[RID]})
    await resp.prepare(request)
    try:
        try:
            if fmt.chat:
                await resp.write(_sse(fmt.chunk(None, first=True)))
            while True:
                if piece.text or piece.tokens or piece.finish_reason:
                    await resp.write(_sse(fmt.chunk(piece)))
                if piece.finish_reason is not None:
                    break
                piece = await anext(pieces)
            usage = _usage(n_prompt, piece.completion_tokens)
            _note(request, **usage, finish_reason=piece.finish_reason)
            if req.include_usage:
                await resp.write(_sse(fmt.usage_chunk(usage)))
        except RingUnavailable as e:
            log.warning("stream_failed", reason=str(e))
            _note(request, finish_reason="error")
            await resp.write(_sse(unavailable(str(e)).body()))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # headers are sent: the error can only travel as an event
            log.exception("stream_failed")
            _note(request, finish_reason="error")
            await resp.write(_sse(internal_error().body()))
        await resp.write(SSE_DONE)
        await resp.write_eof()
    except ConnectionError:  # the client went away; leaving closes the generation
        log.info("client_disconnected")
        _note(request, finish_reason="disconnected")
    return resp


# ---------------------------------------------------------------------------------------------
# Forwarding to the head


def _head_url(state: ApiState, path_qs: str) -> str:
    addr = state.head_address()
    if addr is None:
        raise unavailable(f"the head {state.runtime.head_name} has no known address")
    host, port = addr
    return f"http://{host}:{port}{path_qs}"


async def _forward(request: web.Request) -> web.StreamResponse:
    """Send this request to the head's API and relay its answer, SSE event by event."""
    state = request.app[STATE]
    rt = state.runtime
    if FORWARDED in request.headers:
        # The head forwarded to us: two nodes disagree on who the head is. Do not loop.
        raise unavailable(f"node {', '.join(rt.names)} is not the head ({rt.head_name})")
    body = await _read_body(request)
    url = _head_url(state, request.path_qs)
    headers = {k: v for k in ("Authorization", "Content-Type") if (v := request.headers.get(k))}
    headers[FORWARDED] = rt.names[0]
    headers[FORWARDED_RID] = request[RID]
    _note(request, forwarded_to=rt.head_name)
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=PROXY_CONNECT_S,
        sock_connect=PROXY_CONNECT_S,
        # A token (or a queue slot) may take as long as a ring step may take.
        sock_read=rt.config.cluster.request_timeout_s + 30,
    )
    assert state.session is not None
    try:
        upstream = await state.session.request(
            request.method, url, data=body, headers=headers, timeout=timeout
        )
    except (aiohttp.ClientError, TimeoutError) as e:
        raise unavailable(f"cannot reach the head {rt.head_name} at {url}: {_reason(e)}") from None
    try:
        if upstream.content_type != "text/event-stream":
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise unavailable(f"the head {rt.head_name} failed: {_reason(e)}") from None
            keep = {k: v for k in ("Retry-After", "Allow") if (v := upstream.headers.get(k))}
            return web.Response(
                body=data,
                status=upstream.status,
                content_type=upstream.content_type,
                headers=keep,
            )
        return await _relay_sse(request, upstream)
    finally:
        upstream.close()  # not release(): an unfinished stream must reach the head as a hang-up


async def _relay_sse(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    rt = request.app[STATE].runtime
    resp = web.StreamResponse(
        status=upstream.status, headers={**SSE_HEADERS, "X-Request-Id": request[RID]}
    )
    await resp.prepare(request)
    buf = b""
    done = False
    try:
        try:
            async for chunk in upstream.content.iter_any():
                buf += chunk
                # Relay whole events only, so an error event can never splice into half a one.
                end = buf.rfind(b"\n\n")
                if end >= 0:
                    events, buf = buf[: end + 2], buf[end + 2 :]
                    done = done or SSE_DONE in events
                    await resp.write(events)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("head_stream_failed", error=_reason(e))
        if not done:
            err = unavailable(f"the head {rt.head_name} stopped answering mid-stream")
            await resp.write(_sse(err.body()) + SSE_DONE)
        await resp.write_eof()
    except ConnectionError:
        log.info("client_disconnected")
    return resp


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def _ask_head(state: ApiState, path: str) -> tuple[int, Any]:
    """GET a small JSON document from the head (status code, parsed body)."""
    assert state.session is not None
    url = _head_url(state, path)
    headers = {FORWARDED: state.runtime.names[0]}
    if key := state.runtime.config.api.api_key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_S)
    async with state.session.get(url, headers=headers, timeout=timeout) as r:
        return r.status, await r.json(content_type=None)


# ---------------------------------------------------------------------------------------------
# Models, health, cluster status


def _model_object(state: ApiState) -> dict[str, Any]:
    return {
        "id": state.runtime.model_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "mlxring",
    }


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request.app[STATE])]})


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    if name not in (state.runtime.model_name, state.runtime.config.cluster.model):
        raise ApiError(
            404, f"The model {name!r} does not exist.", param="model", code="model_not_found"
        )
    return web.json_response(_model_object(state))


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rt = state.runtime
    if not _hosts_head(rt):
        try:
            status, body = await _ask_head(state, "/health")
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            reason = f"cannot reach the head {rt.head_name}: {_reason(e)}"
            return _unhealthy(rt, reason)
        if not isinstance(body, dict):
            return _unhealthy(rt, f"the head {rt.head_name} answered {status} without JSON")
        headers = {"Retry-After": "2"} if status != 200 else {}
        return web.json_response(body, status=status, headers=headers)
    if reason := _not_serving(rt):
        return _unhealthy(rt, reason)
    return web.json_response(
        {"status": "ok", "head": rt.head_name, "model": rt.model_name, "nodes": list(rt.members)}
    )


def _unhealthy(rt: Runtime, reason: str) -> web.Response:
    return web.json_response(
        {"status": "unavailable", "head": rt.head_name, "reason": reason},
        status=503,
        headers={"Retry-After": "2"},
    )


async def cluster_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    rt = state.runtime
    if _hosts_head(rt):
        return web.json_response(_status_here(state))
    try:
        status, body = await _ask_head(state, "/cluster/status")
        if status == 200 and isinstance(body, dict):
            return web.json_response(body)
        reason = f"the head {rt.head_name} answered {status}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        reason = f"cannot reach the head {rt.head_name}: {_reason(e)}"
    return web.json_response(_status_local(state, reason))


def _node_rows(
    state: ApiState,
    layers: dict[str, tuple[int, int]],
    up: Callable[[str], bool],
    busy_share: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    rt = state.runtime
    reports = rt.monitor.stats if rt.monitor is not None else {}
    rows = []
    for i, n in enumerate(rt.config.nodes):
        rng = layers.get(n.name)
        # What the node reported of itself as the head's last good probe passed it.
        st = reports.get(n.name)
        rows.append(
            {
                "name": n.name,
                "position": i,
                "address": n.host,
                "ring_port": n.port,
                "api_port": rt.config.api_port(n.name),
                "layers": list(rng) if rng is not None else None,
                "up": up(n.name),
                "member": n.name in rt.members,
                "head": n.name == rt.head_name,
                "memory_active_bytes": st.active_bytes if st else None,
                "memory_peak_bytes": st.peak_bytes if st else None,
                "memory_total_bytes": st.total_bytes if st else None,
                "busy_s": round(st.busy_s, 4) if st else None,
                "busy_share": round(b, 3)
                if (b := (busy_share or {}).get(n.name)) is not None
                else None,
                "steps": st.steps if st else None,
                "decode_busy_s": round(st.decode_busy_s, 4) if st else None,
                "decode_steps": st.decode_steps if st else None,
                "kv_requests": st.requests if st else None,
            }
        )
    return rows


def _status_here(state: ApiState) -> dict[str, Any]:
    """The head's view: while the ring serves, a node is up if the last probe passed through it
    (with the layers it reported); otherwise up means its heartbeat link is alive."""
    rt = state.runtime
    view = rt.monitor.view if rt.monitor is not None else None
    reason = _not_serving(rt)
    tokens_per_s, busy_share = state.rates()
    if view is not None and view.ok:
        probed = {h[0]: (h[1], h[2]) for h in view.hops}
        rows = _node_rows(state, probed, lambda n: n in probed, busy_share)
    else:
        rows = _node_rows(state, rt.layout, rt.is_up, busy_share)
    engine = rt.engine
    trips = engine.trip_s[-64:] if engine is not None else []
    decode_hops = engine.hop_s[-256:] if engine is not None else []
    return {
        "cluster": rt.config.cluster.name,
        "model": rt.model_name,
        "head": rt.head_name,
        "answered_by": rt.names[0],
        "members": list(rt.members),
        "ring": {
            "ok": not reason,
            "reason": reason,
            "hop_ms": round(view.hop_s * 1000, 3) if view is not None and view.ok else None,
            # Recent per-hop times of the head's probes (trip / hops); they pass an idle ring.
            "hop_samples_s": list(rt.monitor.hop_samples[-256:]) if rt.monitor is not None else [],
            # Network time of one hop of recent decode steps (mlxring/ring/hoptime.py).
            "decode_hop_ms": round(statistics.median(decode_hops) * 1000, 3)
            if decode_hops
            else None,
            "decode_hop_samples_s": decode_hops,
            "last_probe_s_ago": round(time.monotonic() - view.checked, 3)
            if view is not None and view.checked
            else None,
        },
        "nodes": rows,
        "requests": {
            "generating": state.admission.running,
            "waiting": state.admission.waiting,
            "tokens_generated": engine.tokens_generated if engine is not None else 0,
            "tokens_per_s": round(tokens_per_s, 2) if tokens_per_s is not None else None,
            "decode_trip_ms": round(statistics.median(trips) * 1000, 3) if trips else None,
        },
    }


def _status_local(state: ApiState, reason: str) -> dict[str, Any]:
    """What a non-head node knows alone: the head is down; its own nodes are up; others are up
    while their heartbeat links are."""
    rt = state.runtime
    return {
        "cluster": rt.config.cluster.name,
        "model": rt.model_name,
        "head": rt.head_name,
        "answered_by": rt.names[0],
        "members": list(rt.members),
        "ring": {"ok": False, "reason": reason, "hop_ms": None, "last_probe_s_ago": None},
        "nodes": _node_rows(state, rt.layout, lambda n: n != rt.head_name and rt.is_up(n)),
        "requests": None,
    }


# ---------------------------------------------------------------------------------------------
# Metrics and the web page


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[STATE].metrics.render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def _web_response(name: str) -> web.Response:
    """A file of mlxring/web (package data): read per request, they are small and rarely asked."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    path = resources.files("mlxring").joinpath("web", name)
    if not _WEB_NAME.match(name) or suffix not in WEB_TYPES or not path.is_file():
        raise ApiError(404, f"Invalid URL (GET /web/{name})", code="unknown_url")
    return web.Response(
        body=path.read_bytes(),
        headers={
            "Content-Type": WEB_TYPES[suffix],
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def web_index(request: web.Request) -> web.Response:
    return _web_response("index.html")


async def web_file(request: web.Request) -> web.Response:
    return _web_response(request.match_info["name"])


# ---------------------------------------------------------------------------------------------
# Wiring


def _admission(runtime: Runtime) -> Admission:
    api = runtime.config.api
    return Admission(api.max_concurrent, api.max_queue, runtime.config.cluster.request_timeout_s)


def create_app(runtime: Runtime, state: ApiState | None = None) -> web.Application:
    """One aiohttp app; apps of one process share `state` (queue, tokenizer thread, client)."""
    if state is None:
        state = ApiState(runtime, _admission(runtime))
    # aiohttp's own size check is a backstop; _read_body answers 413 before reading.
    app = web.Application(
        client_max_size=runtime.config.api.max_body_bytes, middlewares=[middleware]
    )
    app[STATE] = state

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await state.open()
        yield
        await state.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/cluster/status", cluster_status, name="cluster-status")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/", web_index, name="web-index")
    app.router.add_get("/web/{name}", web_file, name="web-file")
    return app


async def start_api(runtime: Runtime) -> list[web.AppRunner]:
    """One HTTP server per distinct API port of this process's nodes."""
    config = runtime.config
    api = config.api
    state = ApiState(runtime, _admission(runtime))
    ports = sorted({config.api_port(n) for n in runtime.names})
    runners: list[web.AppRunner] = []
    try:
        for port in ports:
            runner = web.AppRunner(
                create_app(runtime, state),
                access_log=None,
                # A client that hangs up cancels its handler, and so its generation, at once.
                handler_cancellation=True,
                shutdown_timeout=SHUTDOWN_S,
            )
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, api.host, port).start()
            log.info("api_listening", host=api.host, port=port)
    except BaseException:  # e.g. a port in use: stop the servers already listening
        for r in runners:
            await r.cleanup()
        raise
    return runners
