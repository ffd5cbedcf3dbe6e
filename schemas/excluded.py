"""Excluded characters (NUL, control characters) checked once per message, not once per field.

A field typed :data:`schemas.types.Text` (or another :func:`schemas.types.excluding` type)
must not hold a character of its excluded class. JSON can only carry those characters escaped
(``\\u0000``, ``\\n``…), except DEL, so a message without a backslash or a DEL byte passes
unread; any other is walked, and only its constrained fields are matched. msgspec would run the
pattern on every field of every message: for a file's 5,000 lines of metadata, three quarters
of decoding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

import msgspec
import msgspec.inspect as mi

from schemas.types import excluding_pattern

T = TypeVar("T")

# Walks a decoded value; raises ValidationError naming the path of the first field that breaks.
Check = Callable[[Any, str], None]


class Decoder(Generic[T]):
    """A JSON decoder for ``type_`` that also enforces its fields' excluded characters."""

    @overload
    def __init__(self: Decoder[T], type_: type[T]) -> None: ...
    @overload
    def __init__(self: Decoder[Any], type_: Any) -> None: ...
    def __init__(self, type_: Any) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(type_)
        self._check = _check_of(mi.type_info(type_))

    def decode(self, raw: bytes) -> T:
        value = self._decoder.decode(raw)
        if self._check is not None and (b"\\" in raw or b"\x7f" in raw):
            self._check(value, "$")
        return value


def _check_of(info: mi.Type) -> Check | None:
    """The check for values of ``info``, or None when nothing in it excludes characters.

    (No contract is a recursive struct; one would recurse here at import.)"""
    if isinstance(info, mi.Metadata):
        chars = (info.extra or {}).get("excludes")
        return _check_of(info.type) if chars is None else _text(chars)
    if isinstance(info, mi.StructType):
        return _struct(info)
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return _items(_check_of(info.item_type))
    if isinstance(info, mi.TupleType):
        return _positions([_check_of(t) for t in info.item_types])
    if isinstance(info, mi.DictType):
        return _mapping(_check_of(info.key_type), _check_of(info.value_type))
    if isinstance(info, mi.UnionType):
        return _union(info)
    return None


def _text(chars: str) -> Check:
    # Searched anywhere: "$" in the published pattern would let a final "\n" through.
    excluded = re.compile(f"[{chars}]")
    pattern = excluding_pattern(chars)

    def check(value: Any, path: str) -> None:
        if excluded.search(value):
            raise msgspec.ValidationError(
                f"Expected `str` matching regex {pattern!r} - at `{path}`"
            )

    return check


def _struct(info: mi.StructType) -> Check | None:
    fields = [(f.name, c) for f in info.fields if (c := _check_of(f.type)) is not None]
    if not fields:
        return None

    def check(value: Any, path: str) -> None:
        for name, field_check in fields:
            field = getattr(value, name)
            if field is not None:
                field_check(field, f"{path}.{name}")

    return check


def _items(item: Check | None) -> Check | None:
    if item is None:
        return None

    def check(value: Any, path: str) -> None:
        for i, each in enumerate(value):
            item(each, f"{path}[{i}]")

    return check


def _positions(items: list[Check | None]) -> Check | None:
    checks = [(i, c) for i, c in enumerate(items) if c is not None]
    if not checks:
        return None

    def check(value: Any, path: str) -> None:
        for i, item in checks:
            if value[i] is not None:
                item(value[i], f"{path}[{i}]")

    return check


def _mapping(key: Check | None, item: Check | None) -> Check | None:
    if key is None and item is None:
        return None

    def check(value: Any, path: str) -> None:
        for k, v in value.items():
            if key is not None:
                key(k, f"{path}[...]")
            if item is not None and v is not None:
                item(v, f"{path}[{k!r}]")

    return check


def _union(info: mi.UnionType) -> Check | None:
    """Members told apart by the Python type they decode to (struct class, str, list, dict)."""
    by_type: dict[type, Check] = {}
    for member in info.types:
        member_check = _check_of(member)
        if member_check is not None:
            by_type[_python_type(member)] = member_check
    if not by_type:
        return None

    def check(value: Any, path: str) -> None:
        member_check = by_type.get(type(value))
        if member_check is not None:
            member_check(value, path)

    return check


def _python_type(info: mi.Type) -> type:
    while isinstance(info, mi.Metadata):
        info = info.type
    if isinstance(info, mi.StructType):
        return info.cls
    return {
        mi.StrType: str, mi.ListType: list, mi.VarTupleType: tuple, mi.TupleType: tuple,
        mi.DictType: dict, mi.SetType: set, mi.FrozenSetType: frozenset,
    }[type(info)]  # fmt: skip
