"""Each message type's wire form, derived once from its dataclass's fields and type hints.

A dataclass travels as a map of its fields under their own names: nested dataclasses as maps,
tuples as arrays, a field that is None left out. Reading checks every field against its hint with
`Fields` (a missing field is an error unless its type allows None; `Annotated[int, AtLeast(0)]`
sets a least value) and raises whatever the reader's error dialect makes. The field holding a
tensor is left to the codec, which sends it after the map's other keys.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
import types
from collections.abc import Callable
from typing import Annotated, Any, Union, cast, get_args, get_origin, get_type_hints

from mlxring.fields import Fields
from mlxring.protocol.messages import AtLeast, Tensor

#: Reads one field: (reader over the map or list holding it, its key) -> its value.
Read = Callable[[Fields, Any], Any]


class Schema:
    """How one dataclass travels: `to_map(obj, tag)` is its map for msgpack, `read(r, tensor)`
    the object a map read through `r` holds. `tensor` names the field holding a tensor, which
    the codec sends as dtype/shape/data after the map's other keys."""

    __slots__ = ("cls", "read", "tensor", "to_map")

    def __init__(self, cls: type) -> None:
        if hasattr(cls, "__post_init__") or hasattr(cls, "__slots__"):
            raise TypeError(f"{cls.__name__}: decoding fills __dict__ without running __init__")
        hints = get_type_hints(cls, include_extras=True)
        reads: list[tuple[str, Read]] = []
        convert: list[tuple[str, Callable[[Any], Any]]] = []
        optional: list[str] = []
        self.cls, self.tensor = cls, None
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if Tensor in get_args(hint):
                self.tensor = f.name
                reads.append((f.name, lambda r, k: None))  # filled in by `read`'s tensor
                continue
            inner = _without_none(hint)
            if inner is not hint:
                optional.append(f.name)
            reads.append((f.name, _reader(hint)))
            to_wire = _converter(inner)
            if to_wire is not None:
                convert.append((f.name, to_wire))
        # Closures over locals, not methods reading attributes: a frame's map is built and
        # read on every hop of every token.
        self.to_map = _to_map(self.tensor, tuple(optional), tuple(convert))
        self.read = _read(cls, tuple(reads), self.tensor)


schema = functools.cache(Schema)
"""The wire form of dataclass `cls`, derived once from its fields and their type hints."""


def _to_map(
    tensor: str | None,
    optional: tuple[str, ...],
    convert: tuple[tuple[str, Callable[[Any], Any]], ...],
) -> Callable[..., dict[str, Any]]:
    def to_map(obj: Any, tag: str | None = None) -> dict[str, Any]:
        # A frozen dataclass's __dict__ holds its fields in order: copied in C, not per field.
        m = obj.__dict__.copy() if tag is None else {"type": tag, **obj.__dict__}
        if tensor is not None:
            del m[tensor]
        for name in optional:
            if m[name] is None:
                del m[name]
        for name, to_wire in convert:
            value = m.get(name)
            if value is not None:
                m[name] = to_wire(value)
        return m

    return to_map


def _read(
    cls: type, reads: tuple[tuple[str, Read], ...], tensor_field: str | None
) -> Callable[..., Any]:
    names = tuple(name for name, _ in reads)
    readers = tuple(read for _, read in reads)
    new, call, repeat = object.__new__, operator.call, itertools.repeat

    def read(r: Fields, tensor: Callable[[Fields], Any] | None = None) -> Any:
        """The object `r` holds; `tensor` reads its tensor field from the same map (a nested
        map, a batch's row, carries none)."""
        # Built as pickle builds an object: the fields' values go into a new instance's
        # __dict__, not through a frozen dataclass's __init__, whose object.__setattr__ per
        # field is a large part of a small frame's decoding (benchmarks/wire_bench.py); map
        # runs read(r, name) per field in C.
        obj: Any = new(cls)
        fields = obj.__dict__
        fields.update(zip(names, map(call, readers, repeat(r), names), strict=True))
        if tensor is not None and tensor_field is not None:
            fields[tensor_field] = tensor(r)
        return obj

    return read


_PLAIN: dict[Any, Read] = {
    str: Fields.string,
    int: Fields.integer,
    float: Fields.number,
    bool: Fields.boolean,
    bytes: Fields.binary,
}


def _reader(hint: Any) -> Read:
    """The reader of a value of type `hint` as msgpack decoded it (tuples arrive as lists)."""
    inner = _without_none(hint)
    if inner is not hint:
        read = _reader(inner)
        return lambda r, k: None if r.data.get(k) is None else read(r, k)
    lo = _bound(hint)
    if lo is not None:
        if _base(hint) is int:
            return lambda r, k: r.integer(k, lo=lo)
        return lambda r, k: r.number(k, lo=lo)
    args = get_args(hint)
    if get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        if _base(args[0]) is int:  # token ids: checked in one pass
            item_lo = _bound(args[0])
            return lambda r, k: r.integers(k, lo=item_lo)
        each = _reader(args[0])
        return _items(each)
    if get_origin(hint) is tuple:
        readers = tuple(_reader(a) for a in args)
        return _fixed(readers)
    if dataclasses.is_dataclass(hint):
        read_nested = schema(cast(type, hint)).read
        return lambda r, k: read_nested(r.table(k))
    if hint not in _PLAIN:
        raise TypeError(f"no wire form for {hint!r}")
    return _PLAIN[hint]


def _converter(hint: Any) -> Callable[[Any], Any] | None:
    """How encoding turns a value of type `hint` into msgpack's terms; None: as it is."""
    if dataclasses.is_dataclass(hint):
        return schema(cast(type, hint)).to_map
    args = get_args(hint)
    if get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
        to_map = schema(cast(type, args[0])).to_map
        return lambda values: list(map(to_map, values))
    return None


def _without_none(hint: Any) -> Any:
    """`X` of `X | None`; any other hint as it is."""
    if get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint):
        rest = tuple(a for a in get_args(hint) if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007 - built from a tuple
    return hint


def _base(hint: Any) -> Any:
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def _bound(hint: Any) -> int | None:
    if get_origin(hint) is not Annotated:
        return None
    return next((m.bound for m in get_args(hint)[1:] if isinstance(m, AtLeast)), None)


def _items(each: Read) -> Read:
    """The reader of a list whose items `each` reads (`tuple[X, ...]`)."""

    def read(r: Fields, key: str) -> tuple[Any, ...]:
        values = r.array(key)
        if not values:
            return ()
        e = r.child(key, dict(enumerate(values)))
        return tuple([each(e, i) for i in range(len(values))])

    return read


def _fixed(readers: tuple[Read, ...]) -> Read:
    """The reader of a list of len(readers) items, each read by its own (`tuple[A, B]`)."""

    def read(r: Fields, key: str) -> tuple[Any, ...]:
        e = r.elements(key)
        if len(e.data) != len(readers):
            raise e.errors.invalid(e.prefix, f"expected {len(readers)} items, got {len(e.data)}")
        return tuple([item(e, i) for i, item in enumerate(readers)])

    return read
