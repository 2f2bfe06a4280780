"""The value types of the config schema, and the one text that says what each accepts.

The schema (``core.schema``) declares every key with these types. ``expectation``
reads a key's type back as words: the error messages say "config key 'train.lr' must
be <phrase>", and the reference (``core.config_docs``) shows the same words, so what
a key accepts is written once, in its type. Pure layer: pydantic only.

YAML reads ``1e-3`` as a string (YAML 1.1 needs a dot in a float), so a number key
takes a numeric string too; booleans are never numbers and numbers never strings.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import AllowInfNan, BaseModel, BeforeValidator, Strict
from typing_extensions import is_typeddict


@dataclass(frozen=True)
class Expect:
    """``Annotated`` metadata: what a compound value must be, in words.

    Attributes:
        phrase: completes "must be ...", e.g. ``"[H, W] positive integers"``.
        type_name: the reference's type column, e.g. ``"[H, W]"``.
        limits: the reference's choices/bounds column ("" when the phrase says it all).
        plural: the phrase for a list of them (default: the phrase).
    """

    phrase: str
    type_name: str
    limits: str = ""
    plural: str = ""


def _number_from_text(value: object) -> object:
    """``"1e-3"`` -> 0.001; anything else unchanged (the float check judges it)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_number_from_text), Strict(), AllowInfNan(False)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
PositiveInt = Annotated[Int, at.Ge(1)]
NonNegativeInt = Annotated[Int, at.Ge(0)]
NonNegativeFloat = Annotated[Float, at.Ge(0)]
PositiveFloat = Annotated[Float, at.Gt(0)]
Probability = Annotated[Float, at.Ge(0), at.Le(1)]
Size = Annotated[
    list[PositiveInt], at.Len(2, 2), Expect("[H, W] positive integers", "[H, W]", "> 0")
]


@dataclass(frozen=True)
class Expectation:
    """What a value must be: the error phrase, and the reference's two columns.

    Attributes:
        phrase: completes "must be ...", e.g. ``"an integer >= 1"``.
        type_name: e.g. ``"integer"``, ``"number or null"``, ``"list of strings"``.
        limits: bounds or choices, e.g. ``">= 1"``, ``"one of: mean, gmean, max"``.
        plural: the phrase for a list of them, e.g. ``"integers >= 1"``.
        nullable: null is accepted.
    """

    phrase: str
    type_name: str
    limits: str = ""
    plural: str = ""
    nullable: bool = False


_NUMBERS = {int: ("an integer", "integer", "integers"), float: ("a number", "number", "numbers")}


_BOUNDS = ((at.Ge, "ge", ">="), (at.Gt, "gt", ">"), (at.Le, "le", "<="), (at.Lt, "lt", "<"))


def _bounds(metadata: Sequence[object]) -> str:
    """``"> 0 and < 1"`` from annotated-types bounds in ``metadata`` ("" when none)."""
    parts = []
    for item in metadata:
        for cls, name, sign in _BOUNDS:
            if isinstance(item, cls):
                parts.append(f"{sign} {getattr(item, name):g}")
    return " and ".join(parts)


def _length(metadata: Sequence[object]) -> str:
    """``"non-empty"``, ``"exactly 5"``, ``"at least 2 items"``... or "" from the length
    constraints in ``metadata``."""
    low = high = None
    for item in metadata:
        if isinstance(item, at.Len):
            low, high = item.min_length, item.max_length
        elif isinstance(item, at.MinLen):
            low = item.min_length
        elif isinstance(item, at.MaxLen):
            high = item.max_length
    if low is not None and low == high:
        return f"exactly {low}"
    if low == 1 and high is None:
        return "non-empty"
    if low and high is not None:
        return f"{low} to {high} items"
    if low:
        return f"at least {low} items"
    if high is not None:
        return f"at most {high} items"
    return ""


def unwrap(annotation: object) -> tuple[object, list[object]]:
    """The bare type under nested ``Annotated`` layers, and their metadata (outer first)."""
    metadata: list[object] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        metadata.extend(extra)
    return annotation, metadata


def union_members(annotation: object) -> tuple[object, ...] | None:
    """The members of a union type (``X | Y`` or ``Union[X, Y]``); None for other types."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return None


def expectation(annotation: object, metadata: Sequence[object] = ()) -> Expectation:
    """What a value of ``annotation`` (with pydantic's field ``metadata``) must be."""
    bare, inner = unwrap(annotation)
    meta = [*metadata, *inner]
    expect = next((m for m in meta if isinstance(m, Expect)), None)
    if expect is not None:
        plural = expect.plural or expect.phrase
        return Expectation(expect.phrase, expect.type_name, expect.limits, plural)
    members = union_members(bare)
    if members is not None:
        return _union(members, meta)
    if get_origin(bare) is Literal:
        choices = get_args(bare)
        words = ", ".join(str(c) for c in choices)
        kind = "integer" if all(isinstance(c, int) for c in choices) else "string"
        return Expectation(f"one of {list(choices)}", kind, f"one of: {words}", f"{list(choices)}")
    if bare in _NUMBERS:
        article, kind, plural = _NUMBERS[typing.cast(type, bare)]
        bounds = _bounds(meta)
        tail = f" {bounds}" if bounds else ""
        return Expectation(f"{article}{tail}", kind, bounds, f"{plural}{tail}")
    if bare is bool:
        return Expectation("true or false", "boolean", "", "booleans")
    if bare is str:
        return Expectation("a string", "string", "", "strings")
    if get_origin(bare) is list:
        item = expectation(get_args(bare)[0])
        length = _length(meta)
        lead = "a non-empty list" if length == "non-empty" else "a list"
        size = f" ({length})" if length and length != "non-empty" else ""
        limits = "; ".join(p for p in (length, item.limits and f"each {item.limits}") if p)
        kind = f"list of {item.type_name}s" if item.type_name.isalpha() else "list"
        return Expectation(f"{lead} of {item.plural}{size}", kind, limits)
    if isinstance(bare, type) and issubclass(bare, BaseModel):
        return Expectation("a mapping (a section)", "section")
    if is_typeddict(bare):
        hints = typing.get_type_hints(bare, include_extras=True)
        keys = ", ".join(f"{k}: {expectation(v).phrase}" for k, v in hints.items())
        return Expectation(f"{{{keys}}}", "mapping", "", f"mappings {{{keys}}}")
    if get_origin(bare) is dict:
        return Expectation("a mapping", "mapping", "", "mappings")
    raise TypeError(f"no description for config type {annotation!r}")


def _union(members: Sequence[object], metadata: Sequence[object]) -> Expectation:
    """A union's expectation: ``X | None`` is "null or X"; ``bool | Literal[...]`` names
    the words it takes ("true, false or bfloat16")."""
    values = [m for m in members if m is not type(None)]
    nullable = len(values) < len(members)
    parts = [expectation(m, metadata if len(values) == 1 else ()) for m in values]
    words: list[str] = []
    for member, part in zip(values, parts, strict=True):
        bare = unwrap(member)[0]
        if bare is bool:
            words += ["true", "false"]
        elif get_origin(bare) is Literal:
            words += [str(c) for c in get_args(bare)]
        else:
            words.append(part.phrase)
    phrase = words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
    type_name = " or ".join(dict.fromkeys(p.type_name for p in parts))
    limits = parts[0].limits if len(parts) == 1 else phrase
    if nullable:
        return Expectation(f"null or {phrase}", f"{type_name} or null", limits, "", True)
    return Expectation(phrase, type_name, limits, phrase)
