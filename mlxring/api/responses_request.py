"""A Responses API request (`POST /v1/responses`) read as the chat request it amounts to.

`parse_responses` maps it onto the chat schema, which checks it: `instructions` is a system
message, `input` the messages (parts of type `input_text` / `output_text` are text),
`max_output_tokens` the budget, function `tools` (flat in Responses: `{type, name, description,
parameters, strict}`) and `tool_choice` the chat's, `reasoning.effort` the template variable
`reasoning_effort` (gpt-oss's templates read it). Input items of type `function_call` become
the assistant's `tool_calls` (consecutive ones, and an assistant message right before them,
one assistant turn), `function_call_output` a `tool` message, and a `reasoning` item's text the
`reasoning_content` of the assistant turn after it (templates that show past thinking show it;
others drop it). A chat error names the chat field, but a tool's (`tools[0].name`, not
`tools[0].function.name`) and the budget's keep their Responses names. The answer's shapes are
api/responses.py's.
"""

from __future__ import annotations

import re
from typing import Any

from mlxring.api.errors import ApiError, invalid
from mlxring.api.schema import API, GenerationRequest, parse_generation
from mlxring.fields import Fields

TEXT_PARTS = ("input_text", "output_text", "text")


def parse_responses(data: dict[str, Any], vocab_size: int) -> GenerationRequest:
    """The chat request a Responses request amounts to, checked as one."""
    f = Fields(data, API)
    messages: list[dict[str, Any]] = []
    if (instructions := f.opt_string("instructions")) is not None:
        messages.append({"role": "system", "content": instructions})
    value = data.get("input")
    if isinstance(value, str):
        messages.append({"role": "user", "content": value})
    elif isinstance(value, list):
        messages += _messages(value)
    else:
        raise invalid("input", "'input' must be a string or an array of input items.")
    if data.get("text") is not None:
        kind = f.table("text").table("format", {"type": "text"}).raw("type")
        if kind != "text":
            raise invalid(
                "text.format", f"Only text.format type 'text' is supported, got {kind!r}."
            )
    chat: dict[str, Any] = {k: data[k] for k in _SAME if k in data}
    chat["messages"] = messages
    if "max_output_tokens" in data:
        chat["max_completion_tokens"] = data["max_output_tokens"]
    if "tools" in data:
        chat["tools"] = [_chat_tool(i, t) for i, t in enumerate(f.array("tools"))]
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and "name" in choice:  # Responses names the function flat
        chat["tool_choice"] = {"type": choice.get("type"), "function": {"name": choice["name"]}}
    if data.get("reasoning") is not None:
        effort = f.table("reasoning").opt_string("effort")
        if effort is not None:
            kwargs = chat.get("chat_template_kwargs")
            kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
            chat["chat_template_kwargs"] = {"reasoning_effort": effort, **kwargs}
    try:
        return parse_generation("chat", chat, vocab_size)
    except ApiError as e:
        raise _renamed(e) from None


# Fields a Responses request shares with a chat request (`chat_template_kwargs` is an extension,
# as on the chat API: `enable_thinking: false`, ...).
_SAME = (
    "model",
    "stream",
    "temperature",
    "top_p",
    "tool_choice",
    "parallel_tool_calls",
    "seed",
    "chat_template_kwargs",
)

# Chat names of fields Responses names otherwise: (chat pattern, Responses replacement).
_RENAMES = (
    (re.compile(r"\btools\[(\d+)\]\.function\b"), r"tools[\1]"),
    (re.compile(r"\btool_choice\.function\.name\b"), "tool_choice.name"),
    (re.compile(r"\bmax_completion_tokens\b"), "max_output_tokens"),
)


def _renamed(e: ApiError) -> ApiError:
    """The chat schema's error with the fields named as the Responses request names them."""
    param, message = e.param, e.message
    for pattern, name in _RENAMES:
        if param is not None:
            param = pattern.sub(name, param)
        message = pattern.sub(name, message)
    if (param, message) == (e.param, e.message):
        return e
    return ApiError(e.status, message, type_=e.type, param=param, code=e.code, headers=e.headers)


def _messages(items: list[Any]) -> list[dict[str, Any]]:
    """The chat messages of `input`'s items."""
    out: list[dict[str, Any]] = []
    reasoning: str | None = None  # a reasoning item's text, for the assistant turn after it
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(param, f"'{param}' must be an input item (an object).")
        f = Fields(item, API, param)
        kind = item.get("type", "message")
        if kind == "reasoning":
            reasoning = (reasoning or "") + _reasoning_text(f)
            continue
        if kind == "function_call":
            call = {
                "id": f.string("call_id"),
                "type": "function",
                "function": {"name": f.string("name"), "arguments": f.string("arguments")},
            }
            last = out[-1] if out else None
            # A turn's calls are one assistant message, after the turn's text if it had any.
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                out.append(last)
            last.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": f.string("call_id"),
                    "content": _output(f),
                }
            )
        elif kind == "message":
            out.append(_message(param, item))
        else:
            raise invalid(
                f"{param}.type",
                f"Input items of type {kind!r} are not supported by this server; only "
                "message, function_call, function_call_output and reasoning.",
            )
        if out[-1]["role"] == "assistant" and reasoning is not None:
            out[-1].setdefault("reasoning_content", reasoning)
        reasoning = None
    return out


def _reasoning_text(f: Fields) -> str:
    """A reasoning item's text: its reasoning_text content, else its summary."""
    for key, part in (("content", "reasoning_text"), ("summary", "summary_text")):
        if f.raw(key) is None:
            continue
        parts = f.elements(key)
        texts = [parts.table(j).string("text") for j in range(len(parts.data))]
        if texts and all(parts.table(j).raw("type") == part for j in range(len(parts.data))):
            return "".join(texts)
    return ""


def _output(f: Fields) -> str:
    """A function_call_output's `output`: a string, or text parts."""
    value = f.raw("output")
    if isinstance(value, list):
        parts = f.elements("output")
        texts = []
        for j in range(len(parts.data)):
            part = parts.table(j)
            if part.raw("type") not in TEXT_PARTS:
                raise invalid(
                    part.path("type"),
                    f"Only output parts of type {', '.join(TEXT_PARTS)} are supported.",
                )
            texts.append(part.string("text"))
        return "".join(texts)
    return f.string("output")


def _message(param: str, item: dict[str, Any]) -> dict[str, Any]:
    content = item.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
                raise invalid(
                    f"{param}.content[{j}]",
                    f"Only content parts of type {', '.join(TEXT_PARTS)} are supported.",
                )
            parts.append({"type": "text", "text": part.get("text")})
        content = parts
    return {"role": item.get("role"), "content": content}


def _chat_tool(i: int, tool: Any) -> Any:
    if not isinstance(tool, dict):
        return tool  # the chat schema names what is wrong
    kind = tool.get("type")
    if kind != "function":
        raise invalid(
            f"tools[{i}].type",
            f"Tools of type {kind!r} are not supported by this server; only 'function'.",
            code="unsupported_value",
        )
    fields = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in fields if k in tool}}
