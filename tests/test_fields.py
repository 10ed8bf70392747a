"""The typed-field reader shared by nodes.toml, frames and (after the API swaps to it) request
bodies: paths in messages, required and optional reads, and the checks every reader relies on."""

from __future__ import annotations

import pytest

from mlxring.fields import REQUIRED, FieldErrors, Fields


def read(data: dict[str, object], prefix: str = "") -> Fields:
    return Fields(data, FieldErrors(), prefix)


def error_of(call: object) -> str:
    with pytest.raises(ValueError) as info:
        call()  # type: ignore[operator]
    return str(info.value)


def test_required_defaulted_and_optional_reads() -> None:
    f = read({"port": 5, "name": "a-1", "on": False, "none": None})
    assert f.integer("port") == 5 and f.integer("absent", 7) == 7
    assert f.opt_integer("absent") is None and f.opt_integer("none") is None  # null is absent
    assert f.name("name") == "a-1" and f.boolean("on", True) is False
    assert error_of(lambda: f.integer("absent")) == "absent: missing required key"
    assert error_of(lambda: f.boolean("none", REQUIRED)) == "none: missing required key"


def test_a_flag_is_never_a_number_and_a_number_never_a_flag() -> None:
    f = read({"flag": True, "n": 1})
    assert error_of(lambda: f.integer("flag")) == "flag: expected an integer, got true"
    assert error_of(lambda: f.number("flag")) == "flag: expected a number, got true"
    assert error_of(lambda: f.boolean("n")) == "n: expected true or false, got 1"
    assert f.number("n") == 1.0 and isinstance(f.number("n"), float)


def test_bounds() -> None:
    f = read({"port": 0, "gb": 0, "inf": float("inf"), "p": 1.5})
    assert error_of(lambda: f.integer("port", lo=1, hi=9)) == "port: must be between 1 and 9, got 0"
    assert error_of(lambda: f.integer("port", lo=1)) == "port: must be >= 1, got 0"
    assert error_of(lambda: f.number("gb", gt=0)) == "gb: must be > 0, got 0"
    assert error_of(lambda: f.number("inf", gt=0)) == "inf: expected a finite number, got inf"
    assert error_of(lambda: f.number("p", lo=0, hi=1, lo_open=True)) == (
        "p: must be in (0, 1], got 1.5"
    )


def test_paths_name_nested_tables_and_list_items() -> None:
    f = read({"stats": [{"name": "a"}, {"name": 3}], "odd key": 1}, "probe")
    stats = f.elements("stats")
    assert stats.table(0).string("name") == "a"
    assert error_of(lambda: stats.table(1).string("name")) == (
        "probe.stats[1].name: expected a string, got 3"
    )
    assert f.path("odd key") == 'probe."odd key"'
    assert error_of(lambda: f.table("odd key")) == (
        'probe."odd key": expected a table ([probe."odd key"]), got 1'
    )


def test_integers_and_unknown_keys() -> None:
    f = read({"ids": [1, 2, 3], "bad": [1, -1], "mixed": [1, True]})
    assert f.integers("ids", lo=0) == (1, 2, 3)
    assert error_of(lambda: f.integers("bad", lo=0)) == "bad: expected integers >= 0"
    assert error_of(lambda: f.integers("mixed")) == "mixed: expected integers"
    assert error_of(lambda: read({"prot": 1}).only(("port", "host"))) == (
        "prot: unknown key (expected one of: port, host); did you mean 'port'?"
    )
