"""OpenAI's tool fields of a chat request: `tools`, `tool_choice`, `parallel_tool_calls`.

Each is parsed into a frozen `Tools` and checked as OpenAI checks it (a 400 naming the `param`).
The functions offered go to the model through its own chat template (`template`); the calls it
writes come back through `engine.channels`. With `tool_choice: "none"` the model is not shown
the tools at all (mlx-lm's server shows them whatever the choice, and a model shown tools may
call one anyway). `required` and a named function are enforced while sampling where the family
writes its calls as JSON between markers (Qwen, Hermes: mlx-lm's `json_tools` format): the
output is then a grammar of calls (`grammar`), each valid against its function's parameters;
for other formats the choice reaches the model only through the template.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from mlxring.api.errors import ApiError, invalid
from mlxring.fields import FieldErrors, Fields

Mode = Literal["none", "auto", "required"]
MODES: tuple[Mode, ...] = ("none", "auto", "required")
MAX_TOOLS = 128  # OpenAI's limit on `tools`
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any] | None  # a JSON Schema object, as given
    strict: bool


@dataclass(frozen=True)
class Tools:
    functions: tuple[Function, ...]
    mode: Mode  # what `tool_choice` says; a named function is "required" with `named` set
    named: str | None = None
    parallel: bool = True

    @property
    def offered(self) -> tuple[Function, ...]:
        """The functions the model is shown: none when it may not call any."""
        return () if self.mode == "none" else self.functions

    def template(self) -> list[dict[str, Any]] | None:
        """The offered functions as chat templates (and mlx-lm's tool parsers) take them."""
        if not self.offered:
            return None
        out = []
        for fn in self.offered:
            spec: dict[str, Any] = {"name": fn.name}
            if fn.description is not None:
                spec["description"] = fn.description
            spec["parameters"] = fn.parameters or {"type": "object", "properties": {}}
            out.append({"type": "function", "function": spec})
        return out

    def grammar(self, start: str = '"<tool_call>"', end: str = '"</tool_call>"') -> str | None:
        """llguidance's lark grammar of the calls this choice requires, in the json_tools
        format (`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`), or None
        when the model may answer without one. `start` and `end` are the markers in lark: a
        quoted string, or `<tool_call>` for the tokenizer's own token (llguidance matches an
        added token only by that reference)."""
        if self.mode != "required":
            return None
        fns = [fn for fn in self.functions if self.named in (None, fn.name)]
        one = {"anyOf": [_call_schema(fn) for fn in fns]} if len(fns) > 1 else _call_schema(fns[0])
        more = ' ("\\n" call)*' if self.parallel else ""
        return (
            f"start: call{more}\n"
            f'call: {start} "\\n" body "\\n" {end}\n'
            f"body: %json {json.dumps({**one, 'x-guidance': _LAYOUT})}\n"
        )


NO_TOOLS = Tools((), "none")

# How the call's JSON is laid out: as Qwen's template writes calls (json.dumps's separators).
_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _call_schema(fn: Function) -> dict[str, Any]:
    """The JSON schema of one call of `fn`: its name, then arguments valid for it."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": fn.name},
            "arguments": fn.parameters or {"type": "object"},
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def parse_tools(data: dict[str, Any], errors: FieldErrors) -> Tools:
    """The tool fields of a chat request body; `errors` words the mistakes."""
    f = Fields(data, errors)
    functions = _functions(f)
    mode, named = _choice(data.get("tool_choice"), functions, errors)
    parallel = f.boolean("parallel_tool_calls", True)
    return Tools(functions, mode, named, bool(parallel))


def _functions(f: Fields) -> tuple[Function, ...]:
    raw = f.raw("tools")
    if raw is None:
        return ()
    items = f.elements("tools")
    if len(items.data) > MAX_TOOLS:
        raise invalid(
            "tools", f"'tools' may hold at most {MAX_TOOLS} tools, got {len(items.data)}."
        )
    out: list[Function] = []
    seen: set[str] = set()
    for i in range(len(items.data)):
        t = items.table(i)
        kind = t.string("type")
        if kind != "function":
            raise invalid(
                t.path("type"),
                f"Invalid value for '{t.path('type')}': {kind!r}; expected 'function'.",
            )
        fn = t.table("function")
        name = unique_name(fn, seen)
        params = fn.raw("parameters")
        if params is not None:
            params = dict(fn.table("parameters").data)
        out.append(
            Function(
                name=name,
                description=fn.opt_string("description"),
                parameters=params,
                strict=fn.boolean("strict", False),
            )
        )
    return tuple(out)


def unique_name(f: Fields, seen: set[str]) -> str:
    """A tool's `name`, as OpenAI's and Anthropic's rule has it, and not one of `seen` (which
    it joins)."""
    name = f.string("name")
    if not NAME.match(name):
        raise invalid(
            f.path("name"),
            f"Invalid value for '{f.path('name')}': {name!r}; a tool's name is 1 to 64 "
            "letters, digits, underscores or dashes.",
        )
    if name in seen:
        raise invalid(f.path("name"), f"Tool names must be unique: {name!r} is repeated.")
    seen.add(name)
    return name


def _choice(
    value: Any, functions: tuple[Function, ...], errors: FieldErrors
) -> tuple[Mode, str | None]:
    """`tool_choice`: a mode, or one function by name (which `tools` must declare)."""
    if value is None:
        return ("auto" if functions else "none"), None
    if isinstance(value, str):
        if value not in MODES:
            raise invalid(
                "tool_choice",
                f"Invalid value for 'tool_choice': {value!r}; expected one of "
                f"{', '.join(map(repr, MODES))} or a named function.",
            )
        if value == "required" and not functions:
            raise _no_tools()
        return value, None
    if not isinstance(value, dict):
        raise errors.wrong_type("tool_choice", "table", value)
    c = Fields(value, errors, "tool_choice")
    kind = c.string("type")
    if kind != "function":
        raise invalid(
            "tool_choice.type",
            f"Invalid value for 'tool_choice.type': {kind!r}; expected 'function'.",
        )
    name = c.table("function").string("name")
    if not functions:
        raise _no_tools()
    if name not in {fn.name for fn in functions}:
        raise invalid(
            "tool_choice.function.name",
            f"Invalid value for 'tool_choice.function.name': {name!r} is not a function of "
            "'tools'.",
        )
    return "required", name


def _no_tools() -> ApiError:
    return invalid(
        "tool_choice", "'tool_choice' may name or require a tool only when 'tools' are specified."
    )
