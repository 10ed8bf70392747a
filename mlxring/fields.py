"""Typed reads of decoded data: a TOML table, a frame's msgpack map, a JSON request body.

`Fields` reads one mapping and knows its path (`nodes[1]`, `stats[0]`, `messages[2]`), so every
mistake names the key it is about. How a mistake is worded, and which exception carries it, is
left to an error dialect (`FieldErrors`): nodes.toml's ConfigError, a frame's FrameError and the
HTTP API's 400 run the same checks and differ only in how they say what is wrong.

A key that is absent or null reads as absent everywhere: TOML has no null, OpenAI treats null as
"not given", and a frame leaves out its optional fields when they are None.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

#: What a getter expected, for the dialect to word ("finite number": a bounded number).
Kind = Literal["string", "integer", "number", "finite number", "boolean", "list", "table", "bytes"]

#: Sentinel default of a getter: the key must be there. Typed Any so it stands in for any type.
REQUIRED: Any = object()

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_INT = frozenset((int,))
_EXPECTED: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "finite number": "a finite number",
    "boolean": "true or false",
    "list": "a list",
    "table": "a table",
    "bytes": "bytes",
}


class FieldErrors:
    """How one kind of reader says what is wrong: one method per kind of mistake, each returning
    the exception to raise. This wording is nodes.toml's (`<path>: expected an integer, got
    "x"`, shown as TOML spells values); a dialect overrides `invalid` to pick its exception and
    any other method to word that mistake its own way."""

    def invalid(self, path: str, message: str) -> Exception:
        return ValueError(f"{path}: {message}")

    def missing(self, path: str) -> Exception:
        return self.invalid(path, "missing required key")

    def wrong_type(self, path: str, kind: Kind, value: Any) -> Exception:
        expected = f"a table ([{path}])" if kind == "table" else _EXPECTED[kind]
        return self.invalid(path, f"expected {expected}, got {show(value)}")

    def out_of_range(
        self,
        path: str,
        kind: Kind,
        value: float,
        lo: float | None,
        hi: float | None,
        lo_open: bool,
    ) -> Exception:
        return self.invalid(path, f"must be {bounds(lo, hi, lo_open)}, got {_num(value)}")

    def unknown(self, path: str, key: str, allowed: Sequence[str]) -> Exception:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return self.invalid(path, f"unknown key (expected one of: {', '.join(allowed)}){hint}")


class Fields:
    """Typed access to one mapping's keys; every error names the key's path.

    Getters without a default require the key (`integer("port")`); with one they return it
    when the key is absent (`integer("port", 8100)`); `opt_*` getters return None then. A
    list is read through `elements(key)`: a Fields over its items, keyed by index."""

    __slots__ = ("_where", "data", "errors")

    def __init__(self, data: Mapping[Any, Any], errors: FieldErrors, prefix: str = "") -> None:
        self.data = data
        self.errors = errors
        # The path of `data`, or (the parent reader, the key it is under) until a message
        # needs the path: frames are read far more often than they are wrong.
        self._where: str | tuple[Fields, str | int] = prefix

    def child(self, key: str | int, data: Mapping[Any, Any]) -> Fields:
        """A reader over `data`, found at `key` here: its paths start with this key's."""
        sub = Fields(data, self.errors)
        sub._where = (self, key)
        return sub

    # --- paths and errors -----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The path of this reader's data (`cluster`, `nodes[1]`, `stats[0]`; "": the top)."""
        where = self._where
        if isinstance(where, tuple):
            parent, key = where
            where = self._where = parent.path(key)
        return where

    def path(self, key: str | int) -> str:
        """The key's full name in messages: `cluster.port`, `nodes[1]`, `"odd key"`."""
        if isinstance(key, int):
            return f"{self.prefix}[{key}]"
        shown = key if _BARE_KEY_RE.fullmatch(key) or "[" in key else json.dumps(key)
        return f"{self.prefix}.{shown}" if self.prefix else shown

    def error(self, key: str | int, message: str) -> Exception:
        """The dialect's exception for a mistake of the caller's own wording about `key`."""
        return self.errors.invalid(self.path(key), message)

    def only(self, allowed: Sequence[str]) -> Fields:
        """This reader, once no key outside `allowed` is present (a typo is refused)."""
        for key in self.data:
            if key not in allowed:
                raise self.errors.unknown(self.path(key), key, allowed)
        return self

    def _absent(self, key: str | int, default: Any) -> Any:
        if default is REQUIRED:
            raise self.errors.missing(self.path(key))
        return default

    # --- untyped --------------------------------------------------------------------------

    def raw(self, key: str | int) -> Any:
        """The value as it is, None when absent."""
        return self.data.get(key)

    def get(self, key: str | int, default: Any = REQUIRED) -> Any:
        """The value as it is, for a caller that checks it itself."""
        value = self.data.get(key)
        return self._absent(key, default) if value is None else value

    # --- scalars --------------------------------------------------------------------------
    # Each getter tests the common case first: frames are decoded on every hop of every token.

    def string(self, key: str | int, default: str = REQUIRED, *, nonempty: bool = False) -> str:
        value = self.data.get(key)
        if type(value) is str:
            if nonempty and not value:
                raise self.error(key, "must not be empty")
            return value
        if value is None:
            return cast(str, self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "string", value)

    def opt_string(self, key: str | int, *, nonempty: bool = False) -> str | None:
        return None if self.data.get(key) is None else self.string(key, nonempty=nonempty)

    def name(self, key: str | int, default: str = REQUIRED) -> str:
        """A non-empty name of letters, digits, '_', '.' and '-' (a node's, a cluster's)."""
        value = self.string(key, default, nonempty=True)
        if not NAME_RE.fullmatch(value):
            raise self.error(key, f"expected letters, digits, '_', '.' or '-', got {show(value)}")
        return value

    def integer(
        self,
        key: str | int,
        default: int = REQUIRED,
        *,
        lo: int | None = None,
        hi: int | None = None,
    ) -> int:
        value = self.data.get(key)
        if type(value) is int:  # not bool, an int to Python: a flag is never a count here
            if (lo is None or value >= lo) and (hi is None or value <= hi):
                return value
            raise self.errors.out_of_range(self.path(key), "integer", value, lo, hi, False)
        if value is None:
            return cast(int, self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "integer", value)

    def opt_integer(
        self, key: str | int, *, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        return None if self.data.get(key) is None else self.integer(key, lo=lo, hi=hi)

    def number(
        self,
        key: str | int,
        default: float = REQUIRED,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        gt: float | None = None,
    ) -> float:
        """A float (an integer is taken as one). `gt=x` is `lo=x, lo_open=True`; a bounded
        number must be finite."""
        value = self.data.get(key)
        if type(value) is float or type(value) is int:
            if gt is not None:
                lo, lo_open = gt, True
            if lo is None and hi is None:
                return float(value)
            if not math.isfinite(value):
                raise self.errors.wrong_type(self.path(key), "finite number", value)
            if (lo is None or (value > lo if lo_open else value >= lo)) and (
                hi is None or value <= hi
            ):
                return float(value)
            raise self.errors.out_of_range(self.path(key), "number", value, lo, hi, lo_open)
        if value is None:
            return float(self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "number", value)

    def opt_number(
        self,
        key: str | int,
        *,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        gt: float | None = None,
    ) -> float | None:
        if self.data.get(key) is None:
            return None
        return self.number(key, lo=lo, hi=hi, lo_open=lo_open, gt=gt)

    def boolean(self, key: str | int, default: bool = REQUIRED) -> bool:
        value = self.data.get(key)
        if value is True or value is False:
            return value
        if value is None:
            return bool(self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "boolean", value)

    def binary(self, key: str | int, default: bytes = REQUIRED) -> bytes:
        value = self.data.get(key)
        if type(value) is bytes:
            return value
        if value is None:
            return bytes(self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "bytes", value)

    # --- containers -----------------------------------------------------------------------

    def array(self, key: str | int, default: list[Any] = REQUIRED) -> list[Any]:
        """A list, its items unchecked (see `elements` and `integers`)."""
        value = self.data.get(key)
        if type(value) is list:
            return value
        if value is None:
            return list(self._absent(key, default))
        raise self.errors.wrong_type(self.path(key), "list", value)

    def integers(self, key: str | int, *, lo: int | None = None) -> tuple[int, ...]:
        """A list of integers, all >= lo."""
        value = self.array(key)
        # map/set/min run in C: a 2 048-token prompt chunk is checked in microseconds.
        if value and (set(map(type, value)) != _INT or (lo is not None and min(value) < lo)):
            raise self.error(key, "expected integers" + ("" if lo is None else f" >= {lo}"))
        return tuple(value)

    def elements(self, key: str | int) -> Fields:
        """A reader over the list at `key`, keyed by index (paths `key[0]`, `key[1]`, ...)."""
        return self.child(key, dict(enumerate(self.array(key))))

    def table(self, key: str | int, default: Mapping[str, Any] = REQUIRED) -> Fields:
        """A reader over the mapping at `key` (a TOML table, a nested map or JSON object)."""
        value = self.data.get(key)
        if value is None:
            value = self._absent(key, default)
        if not isinstance(value, dict):
            raise self.errors.wrong_type(self.path(key), "table", value)
        return self.child(key, value)


def bounds(lo: float | None, hi: float | None, lo_open: bool) -> str:
    """A range in words: `between 1 and 65535`, `> 0`, `in (0, 1]`."""
    if lo is not None and hi is not None:
        if lo_open:
            return f"in ({_num(lo)}, {_num(hi)}]"
        return f"between {_num(lo)} and {_num(hi)}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    return f"<= {_num(hi)}"


def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def show(value: Any) -> str:
    """A value as TOML would spell it, short and on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str):
        text = json.dumps(value)  # escapes newlines and non-ASCII: stays one line
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
