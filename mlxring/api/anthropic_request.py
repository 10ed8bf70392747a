"""An Anthropic Messages request read as the chat GenerationRequest the OpenAI routes use.

A request becomes a chat: `system` (a string or text blocks) is the first message, then the
turns. A user turn's `tool_result` blocks become tool messages (one per result, before the
turn's text, which follows as a user message when there is any); an assistant turn's `text`,
`tool_use` and `thinking` blocks become one assistant message with its content, its tool calls
and its reasoning (`redacted_thinking` is dropped: there is nothing in it to show the model).
`tools` (custom tools: name, description, input_schema) and `tool_choice` are the OpenAI
chat's tools (`api.tools`): `auto`, `any` (a call is required), `tool` (that one is), `none`
(the model is not shown them), `disable_parallel_tool_use`; a required call is enforced by a
grammar where the family allows (app._with_tools). `thinking` reaches the chat template as
`enable_thinking`: `enabled` (and `adaptive`) true, `disabled` false, absent the template's
own default; `budget_tokens` is checked as Anthropic checks it (>= 1024, < max_tokens) but
not enforced: the model thinks for as long as it does, within max_tokens. `stop_sequences` are
stop strings; `max_tokens` is required, as Anthropic's is. Refused with a 400: server tools,
image and document blocks, and a last turn of the assistant's (a prefill). Any model name is
accepted: Anthropic clients send their own model ids, and the ring serves one model, which the
response names.
"""

from __future__ import annotations

import json
from typing import Any

from mlxring.api.errors import invalid
from mlxring.api.schema import API, MAX_STOP, ChatMessage, GenerationRequest
from mlxring.api.tools import Function, Mode, Tools, unique_name
from mlxring.engine.text import ToolCall
from mlxring.fields import Fields
from mlxring.protocol.messages import SamplingParams

MAX_STOP_SEQUENCES = 4 * MAX_STOP  # each is checked against every new piece of text
ROLES = ("user", "assistant")
# The content blocks each place may hold here (others are refused with a 400).
BLOCKS = {
    "text": ("text",),  # `system`, a tool result's content
    "user": ("text", "tool_result"),
    "assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
}
MIN_THINKING_BUDGET = 1024  # Anthropic's least `budget_tokens`


def _blocks(param: str, value: Any, place: str) -> list[Fields]:
    """A content value's blocks (a string is one text block), each of a type `place` takes."""
    if isinstance(value, str):
        return [Fields({"type": "text", "text": value}, API, param)]
    if not isinstance(value, list):
        raise invalid(
            param, f"Invalid type for '{param}': expected a string or an array of content blocks."
        )
    out = []
    for j, block in enumerate(value):
        p = f"{param}[{j}]"
        if not isinstance(block, dict):
            raise API.wrong_type(p, "table", block)
        kind = block.get("type")
        if kind not in BLOCKS[place]:
            raise invalid(
                f"{p}.type",
                f"Unsupported content block type {kind!r} in '{p}': this server serves a text "
                f"model and takes here only blocks of type {', '.join(map(repr, BLOCKS[place]))}.",
            )
        out.append(Fields(block, API, p))
    return out


def _text(param: str, value: Any) -> str:
    """A content value of text blocks (or a string) as its text."""
    return "".join(b.string("text") for b in _blocks(param, value, "text"))


def _user_turn(param: str, value: Any) -> list[ChatMessage]:
    """A user turn: a tool message per `tool_result`, then its text (if any is left beside
    them) as a user message."""
    tools = []
    texts = []
    for b in _blocks(param, value, "user"):
        if b.data["type"] == "text":
            texts.append(b.string("text"))
            continue
        content = b.raw("content")
        result = "" if content is None else _text(b.path("content"), content)
        b.boolean("is_error", False)  # checked; the result's own text says what went wrong
        tools.append(ChatMessage("tool", result, tool_call_id=b.string("tool_use_id")))
    if not tools or texts:
        return [*tools, ChatMessage("user", "".join(texts))]
    return tools


def _assistant_turn(param: str, value: Any) -> ChatMessage:
    """An assistant turn: its text, its calls and its thinking, as one message."""
    texts = []
    calls = []
    thoughts: list[str] = []
    for b in _blocks(param, value, "assistant"):
        kind = b.data["type"]
        if kind == "text":
            texts.append(b.string("text"))
        elif kind == "thinking":
            thoughts.append(b.string("thinking"))
            b.opt_string("signature")
        elif kind == "tool_use":
            args = b.get("input")
            if not isinstance(args, dict):
                raise invalid(
                    b.path("input"),
                    f"Invalid type for '{b.path('input')}': a tool_use block's input is an object.",
                )
            calls.append(ToolCall(b.string("id"), b.string("name"), json.dumps(args)))
    reasoning = "".join(thoughts) if thoughts else None
    return ChatMessage("assistant", "".join(texts), tool_calls=tuple(calls), reasoning=reasoning)


def _messages(data: dict[str, Any]) -> tuple[ChatMessage, ...]:
    out = []
    system = data.get("system")
    if system is not None:
        text = _text("system", system)
        if text:
            out.append(ChatMessage("system", text))
    value = data.get("messages")
    if value is None:
        raise API.missing("messages")
    if not isinstance(value, list):
        raise API.wrong_type("messages", "list", value)
    if not value:
        raise invalid("messages", "'messages' must hold at least one message.")
    for i, m in enumerate(value):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise API.wrong_type(p, "table", m)
        f = Fields(m, API, p)
        role = f.string("role")
        if role not in ROLES:
            raise invalid(
                f"{p}.role", f"Invalid value for '{p}.role': {role!r}; supported: user, assistant."
            )
        if "content" not in m:
            raise API.missing(f"{p}.content")
        if role == "user":
            out.extend(_user_turn(f"{p}.content", m["content"]))
        else:
            out.append(_assistant_turn(f"{p}.content", m["content"]))
    if out[-1].role == "assistant":
        raise invalid(
            f"messages[{len(value) - 1}].role",
            "A last message of the assistant (a prefill to continue) is not supported by this "
            "server yet: end with a user message.",
        )
    return tuple(out)


def _functions(f: Fields) -> tuple[Function, ...]:
    """`tools`: custom tools, each a function the model may call."""
    if f.raw("tools") is None:
        return ()
    items = f.elements("tools")
    out: list[Function] = []
    seen: set[str] = set()
    for i in range(len(items.data)):
        t = items.table(i)
        kind = t.opt_string("type")
        if kind not in (None, "custom"):
            raise invalid(
                t.path("type"),
                f"Unsupported tool type {kind!r} in '{t.prefix}': this server runs no server "
                "tools; it takes custom tools (name, description, input_schema).",
            )
        name = unique_name(t, seen)
        schema = t.table("input_schema")
        if schema.data.get("type") != "object":
            raise invalid(
                schema.path("type"),
                f"Invalid value for '{schema.path('type')}': an input_schema is a JSON schema "
                "of type 'object'.",
            )
        out.append(Function(name, t.opt_string("description"), dict(schema.data), strict=False))
    return tuple(out)


def _tools(f: Fields) -> Tools:
    """`tools` and `tool_choice` as the chat's Tools."""
    functions = _functions(f)
    if f.raw("tool_choice") is None:
        return Tools(functions, "auto" if functions else "none")
    c = f.table("tool_choice")
    kind = c.string("type")
    parallel = not c.boolean("disable_parallel_tool_use", False)
    modes: dict[str, Mode] = {"auto": "auto", "none": "none", "any": "required", "tool": "required"}
    mode = modes.get(kind)
    if mode is None:
        raise invalid(
            "tool_choice.type",
            f"Invalid value for 'tool_choice.type': {kind!r}; expected one of 'auto', 'any', "
            "'tool', 'none'.",
        )
    if mode == "required" and not functions:
        raise invalid(
            "tool_choice", f"tool_choice {kind!r} may be given only when 'tools' are specified."
        )
    named = c.string("name") if kind == "tool" else None
    if named is not None and named not in {fn.name for fn in functions}:
        raise invalid(
            "tool_choice.name", f"Tool {named!r} of 'tool_choice.name' is not one of 'tools'."
        )
    return Tools(functions, mode, named, parallel)


def _thinking(f: Fields, max_tokens: int | None) -> dict[str, Any]:
    """`thinking` as chat template variables: `enable_thinking`, or nothing when absent."""
    if f.raw("thinking") is None:
        return {}
    t = f.table("thinking")
    kind = t.string("type")
    if kind == "disabled":
        return {"enable_thinking": False}
    if kind == "adaptive":  # the model decides how much to think: it may
        return {"enable_thinking": True}
    if kind != "enabled":
        raise invalid(
            "thinking.type",
            f"Invalid value for 'thinking.type': {kind!r}; expected 'enabled', 'adaptive' or "
            "'disabled'.",
        )
    budget = t.integer("budget_tokens", lo=MIN_THINKING_BUDGET)
    if max_tokens is not None and budget >= max_tokens:
        raise invalid(
            "max_tokens",
            f"'max_tokens' ({max_tokens}) must be greater than 'thinking.budget_tokens' "
            f"({budget}).",
        )
    return {"enable_thinking": True}


def _stop_sequences(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise API.wrong_type("stop_sequences", "list", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid(
            "stop_sequences",
            f"'stop_sequences' may hold at most {MAX_STOP_SEQUENCES} strings, got {len(value)}.",
        )
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise API.wrong_type(f"stop_sequences[{i}]", "string", s)
        if not s:
            raise invalid(f"stop_sequences[{i}]", "Stop sequences must not be empty.")
    return tuple(value)


def parse_request(
    data: dict[str, Any], vocab_size: int, *, count: bool = False
) -> GenerationRequest:
    """A Messages request as the chat GenerationRequest; `count`: a count_tokens request, which
    has no max_tokens and no sampling (its tools and thinking shape the prompt all the same)."""
    f = Fields(data, API)
    model = f.opt_string("model")
    tools = _tools(f)
    messages = _messages(data)
    if count:
        return GenerationRequest(
            "chat",
            model,
            SamplingParams(),
            None,
            (),
            False,
            False,
            messages,
            tools=tools,
            template_kwargs=_thinking(f, None),
        )
    max_tokens = f.integer("max_tokens", lo=1)
    template_kwargs = _thinking(f, max_tokens)
    temperature = f.opt_number("temperature", lo=0, hi=1)
    top_p = f.opt_number("top_p", lo=0, hi=1, lo_open=True)
    top_k = f.opt_integer("top_k", lo=0)
    params = SamplingParams(
        # Greedy unless asked, as on this server's OpenAI routes (Anthropic's default is 1).
        temperature=temperature if temperature is not None else 0.0,
        top_p=top_p if top_p is not None else 1.0,
        top_k=top_k if top_k is not None and top_k < vocab_size else 0,
    )
    return GenerationRequest(
        kind="chat",
        model=model,
        params=params,
        max_tokens=max_tokens,
        stop=_stop_sequences(data.get("stop_sequences")),
        stream=f.boolean("stream", False),
        include_usage=False,
        messages=messages,
        tools=tools,
        template_kwargs=template_kwargs,
    )
