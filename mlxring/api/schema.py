"""What a generation request may say: parsing and checking its JSON into a GenerationRequest.

Every field this server knows is checked here, and every error names its `param` as OpenAI's
do; unknown fields are ignored, as OpenAI does. The body is read with its size and time limits
(`read_body`) and parsed as strict JSON (`parse_json_body`) before `parse_generation` reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from aiohttp import web

from mlxring.aio import wait_for
from mlxring.api.errors import ApiError, body_too_large, body_too_slow, invalid
from mlxring.api.structured import grammar_of
from mlxring.api.tools import NO_TOOLS, Tools, parse_tools
from mlxring.config import ApiConfig
from mlxring.engine.text import ToolCall
from mlxring.fields import FieldErrors, Fields
from mlxring.fields import Kind as FieldKind
from mlxring.model.sharded import config_value
from mlxring.protocol.messages import SamplingParams

Kind = Literal["chat", "completion"]

MAX_STOP = 4
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETION = 5
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# `n` choices per prompt, and choices per request in all (prompts x n): each is a row the ring
# generates at once, holding one admission slot and one KV cache on every shard.
MAX_N = 16
MAX_CHOICES = 64

Prompt = str | tuple[int, ...]  # a completions prompt: text, or token ids


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_call_id: str | None = None  # a tool's result: the call it answers
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's turn: the calls it made
    reasoning: str | None = None  # an assistant's turn: its thinking, given back

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (the shape mlx-lm's server gives them)."""
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.content}
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Templates write the arguments with `tojson`: they take them as an object.
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.loads(c.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
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
    prompts: tuple[Prompt, ...] = ()  # completion: one choice (times n) per prompt
    n: int = 1  # choices per prompt
    echo: bool = False  # completion: the prompt's text opens each choice's text
    tools: Tools = NO_TOOLS  # chat
    # chat: extra variables for the chat template (`chat_template_kwargs`, as vLLM's and
    # mlx-lm's servers take them: `enable_thinking`, `reasoning_effort`, ...).
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    # Extension (as in vLLM): keep generating past EOS, for benchmarks of fixed length.
    ignore_eos: bool = False
    # Extension: `"speculative": false` opts a request out of speculative decoding (where
    # the ring speculates: `[cluster] speculative`).
    speculative: bool = True
    # Extension (llama.cpp's server's name): `"cache_prompt": false` neither starts from the
    # ring's prompt cache nor leaves an entry in it (benchmarks of prefill want that).
    cache_prompt: bool = True

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


_API_KINDS: dict[FieldKind, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "finite number": "a finite number",
    "boolean": "a boolean",
    "list": "an array",
    "table": "an object",
    "bytes": "a string",
}


class ApiFieldErrors(FieldErrors):
    """The typed-field reader's mistakes as OpenAI words them: a 400 naming the `param`."""

    def invalid(self, path: str, message: str) -> ApiError:
        return invalid(path, message)

    def missing(self, path: str) -> ApiError:
        return invalid(path, f"Missing required parameter: '{path}'.", "missing_required")

    def wrong_type(self, path: str, kind: FieldKind, value: Any) -> ApiError:
        return _wrong_type(path, _API_KINDS[kind], value)

    def out_of_range(
        self,
        path: str,
        kind: FieldKind,
        value: float,
        lo: float | None,
        hi: float | None,
        lo_open: bool,
    ) -> ApiError:
        if kind == "integer":
            if lo is not None and value < lo:
                return invalid(
                    path, f"Invalid value for '{path}': {value} is below the minimum of {lo}."
                )
            return invalid(
                path, f"Invalid value for '{path}': {value} is above the maximum of {hi}."
            )
        left = "(" if lo_open else "["
        right = f"{hi:g}]" if hi is not None else "inf)"
        low = f"{lo:g}" if lo is not None else "-inf"
        return invalid(path, f"Invalid value for '{path}': {value} is not in {left}{low}, {right}.")


API = ApiFieldErrors()


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
        f = Fields(m, API, p)
        role = f.opt_string("role")
        if role is None:
            raise invalid(f"{p}.role", f"Missing required parameter: '{p}.role'.")
        if role not in CHAT_ROLES:
            raise invalid(
                f"{p}.role",
                f"Invalid value for '{p}.role': {role!r}; supported: {', '.join(CHAT_ROLES)}.",
            )
        content = _parse_content(f"{p}.content", m.get("content"), role)
        calls: tuple[ToolCall, ...] = ()
        reasoning = None
        if role == "assistant":
            calls = _parse_tool_calls(f)
            # Clients give a thinking model's reasoning back under either name.
            reasoning = f.opt_string("reasoning_content")
            if reasoning is None:
                reasoning = f.opt_string("reasoning")
        out.append(ChatMessage(role, content, f.opt_string("tool_call_id"), calls, reasoning))
    return tuple(out)


def _parse_tool_calls(f: Fields) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls`: the calls it made, for the template to show."""
    if f.raw("tool_calls") is None:
        return ()
    items = f.elements("tool_calls")
    out = []
    for i in range(len(items.data)):
        c = items.table(i)
        fn = c.table("function")
        args = fn.string("arguments")
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise invalid(
                fn.path("arguments"),
                f"Invalid value for '{fn.path('arguments')}': the arguments must be a JSON "
                "object, as a string.",
            )
        out.append(ToolCall(c.opt_string("id") or "", fn.string("name"), args))
    return tuple(out)


# Template variables a request may not set: the server sets them.
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt", "tokenize")


def _parse_template_kwargs(f: Fields) -> dict[str, Any]:
    if f.raw("chat_template_kwargs") is None:
        return {}
    kwargs = dict(f.table("chat_template_kwargs").data)
    for key in kwargs:
        if key in RESERVED_TEMPLATE_KWARGS or key.startswith("_"):
            raise invalid(
                "chat_template_kwargs",
                f"Invalid key {key!r} in 'chat_template_kwargs': the server sets it.",
            )
    return kwargs


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
        text = Fields(part, API, pp).opt_string("text")
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


def _parse_prompts(value: Any, vocab_size: int) -> tuple[Prompt, ...]:
    """A completions prompt: a string, token ids, or a batch (an array) of either."""
    if value is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required")
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _wrong_type("prompt", "a string or an array", value)
    if not value:
        raise invalid("prompt", "'prompt' must not be empty.")
    if all(_is_int(t) for t in value):
        return (_token_ids("prompt", value, vocab_size),)
    out: list[Prompt] = []
    for i, one in enumerate(value):
        if isinstance(one, str):
            out.append(one)
        elif isinstance(one, list) and one and all(_is_int(t) for t in one):
            out.append(_token_ids(f"prompt[{i}]", one, vocab_size))
        else:
            raise _wrong_type(f"prompt[{i}]", "a string or an array of token ids", one)
    return tuple(out)


def _token_ids(param: str, ids: list[int], vocab_size: int) -> tuple[int, ...]:
    for t in ids:
        if not 0 <= t < vocab_size:
            raise invalid(param, f"Token id {t} in '{param}' is not in 0..{vocab_size - 1}.")
    return tuple(ids)


def parse_generation(kind: Kind, data: dict[str, Any], vocab_size: int) -> GenerationRequest:
    """Check every field this server knows; unknown fields are ignored, as OpenAI does."""
    f = Fields(data, API)
    model = f.opt_string("model")
    n = f.integer("n", 1, lo=1, hi=MAX_N)
    stream = f.boolean("stream", False)
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _wrong_type("stream_options", "an object", opts)
        include_usage = Fields(opts, API, "stream_options").boolean("include_usage", False)

    max_tokens = f.opt_integer("max_tokens", lo=1)
    if kind == "chat":
        max_tokens = f.opt_integer("max_completion_tokens", lo=1) or max_tokens

    temperature = f.opt_number("temperature", lo=0, hi=2)
    top_p = f.opt_number("top_p", lo=0, hi=1, lo_open=True)
    top_k = f.opt_integer("top_k", lo=0)
    min_p = f.opt_number("min_p", lo=0, hi=1)
    repetition_penalty = f.opt_number("repetition_penalty", lo=0, hi=10, lo_open=True)
    repetition_context_size = f.opt_integer("repetition_context_size", lo=1, hi=1 << 20)
    presence_penalty = f.opt_number("presence_penalty", lo=-2, hi=2)
    frequency_penalty = f.opt_number("frequency_penalty", lo=-2, hi=2)
    seed = f.opt_integer("seed", lo=-(1 << 63), hi=(1 << 64) - 1)
    logit_bias = _parse_logit_bias(data.get("logit_bias"), vocab_size)
    stop = _parse_stop(data.get("stop"))
    # The grammar the output must match (`api.structured`); legacy completions take it too.
    grammar = grammar_of(f)

    logprobs: int | None
    if kind == "chat":
        want = f.boolean("logprobs", False)
        top = f.opt_integer("top_logprobs", lo=0, hi=MAX_TOP_LOGPROBS_CHAT)
        if top is not None and not want:
            raise invalid("top_logprobs", "'top_logprobs' requires 'logprobs' to be true.")
        logprobs = (top or 0) if want else None
    else:
        logprobs = f.opt_integer("logprobs", lo=0, hi=MAX_LOGPROBS_COMPLETION)

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
        grammar=grammar,
    )
    messages: tuple[ChatMessage, ...] = ()
    prompts: tuple[Prompt, ...] = ()
    tools = NO_TOOLS
    template_kwargs: dict[str, Any] = {}
    echo = False
    if kind == "chat":
        tools = parse_tools(data, API)
        if tools.grammar() is not None and params.grammar is not None:
            raise invalid(
                "response_format",
                "A 'response_format' other than text cannot be combined with a 'tool_choice' "
                "that requires a tool call.",
            )
        messages = _parse_messages(data.get("messages"))
        template_kwargs = _parse_template_kwargs(f)
    else:
        echo = f.boolean("echo", False)
        if echo and logprobs is not None:
            # The ring samples from the last position only: the prompt's own logprobs are
            # never computed, and inventing them would mislead a client scoring text.
            raise invalid(
                "echo", "'echo' with 'logprobs' is not supported: prompt logprobs are not computed."
            )
        if f.opt_string("suffix"):
            raise invalid("suffix", "'suffix' is not supported by this server.")
        best_of = f.opt_integer("best_of")
        if best_of is not None and best_of != n:
            raise invalid("best_of", f"Only best_of equal to n ({n}) is supported, got {best_of}.")
        prompts = _parse_prompts(data.get("prompt"), vocab_size)
    choices = max(1, len(prompts)) * n
    if choices > MAX_CHOICES:
        raise invalid(
            "n",
            f"This request asks for {choices} choices ({len(prompts)} prompts x n={n}); "
            f"the most a request may ask for is {MAX_CHOICES}.",
        )
    return GenerationRequest(
        kind=kind,
        model=model,
        params=params,
        max_tokens=max_tokens,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        messages=messages,
        prompts=prompts,
        n=n,
        echo=echo,
        tools=tools,
        template_kwargs=template_kwargs,
        ignore_eos=bool(f.boolean("ignore_eos", False)),
        speculative=bool(f.boolean("speculative", True)),
        cache_prompt=bool(f.boolean("cache_prompt", True)),
    )


async def read_body(request: web.Request, api: ApiConfig) -> bytes:
    """The request's body; 413 for one over `api.max_body_bytes` bytes (before reading it when
    it says so), 408 for one that has not all come within `api.body_timeout_s`."""
    limit = api.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit)
    try:
        return await wait_for(request.read(), api.body_timeout_s)
    except web.HTTPRequestEntityTooLarge:
        raise body_too_large(limit) from None
    except TimeoutError:
        raise body_too_slow(api.body_timeout_s, request.protocol.force_close) from None


def vocab_size(model_config: dict[str, Any], tokenizer_size: int | None) -> int:
    """The model's vocabulary size: its config's, else the tokenizer's, else no bound."""
    v = config_value(model_config, "vocab_size")
    if _is_int(v) and v > 0:
        return int(v)
    return tokenizer_size if tokenizer_size is not None else 1 << 31
