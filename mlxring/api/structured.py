"""Structured output: a request's `response_format` as the grammar its output must match.

`text` is free text (no grammar); `json_object` is any JSON object; `json_schema`
({name, schema, strict}) is JSON valid against the schema. Each becomes llguidance's grammar
JSON, checked here so that a schema llguidance cannot compile is a 400 naming what is wrong, and
carried to the last shard in the request's `SamplingParams.grammar` (`shard.grammar` enforces
it while sampling). The schema is enforced whether or not `strict` is set: a schema given is a
schema kept.

The JSON is written without free whitespace, with `", "` and `": "` between items and keys (as
Python's `json.dumps`): a model that may put whitespace anywhere can pad a short answer out to
its max_tokens, and this layout is the one models mostly saw. A schema's own `x-guidance`
options (llguidance's) override it."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import llguidance

from mlxring.fields import Fields
from mlxring.shard.grammar import MAX_GRAMMAR_CHARS

if TYPE_CHECKING:  # a type of llguidance's stubs only
    from llguidance._lib import JsonCompileOptions

#: llguidance's JSON compile options every schema starts from (see the module's docstring).
JSON_LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# OpenAI's rule for a json_schema's name.
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
TYPES = ("text", "json_object", "json_schema")


def grammar_of(f: Fields, key: str = "response_format") -> str | None:
    """The grammar `f[key]` asks for (None: free text), or the reader's error naming the
    param that is wrong: a 400 `invalid_request_error` in the API's dialect."""
    if f.raw(key) is None:
        return None
    fmt = f.table(key)
    kind = fmt.string("type")
    if kind not in TYPES:
        raise fmt.error("type", f"Unknown response_format type '{kind}': expected one of {TYPES}.")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compiled(fmt, "type", {"type": "object"})
    spec = fmt.table("json_schema")
    name = spec.string("name")
    if not _NAME_RE.fullmatch(name):
        raise spec.error("name", "must be 1 to 64 letters, digits, '_' or '-'.")
    spec.opt_string("description")
    spec.boolean("strict", False)
    schema = dict(spec.table("schema", {"type": "object"}).data)
    return _compiled(spec, "schema", schema)


def _compiled(f: Fields, key: str, schema: dict[str, Any]) -> str:
    """llguidance's grammar for `schema`, once llguidance has checked it compiles."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except (ValueError, TypeError) as e:
        raise f.error(key, f"Invalid JSON schema in '{f.path(key)}': {e}") from e
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise f.error(key, f"The JSON schema is too large (at most {MAX_GRAMMAR_CHARS} bytes).")
    if why := llguidance.LLMatcher.validate_grammar(grammar):
        raise f.error(key, f"Invalid JSON schema in '{f.path(key)}': {why.strip()}")
    return grammar
