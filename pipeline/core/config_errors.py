"""Config validation errors in the project's words: the key, what it must be, what it got.

pydantic reports where a value failed (``('train', 'batch_size')``) and why; this module
finds that key in the schema and says it as the rest of the project does: ``config key
'train.batch_size' must be an integer >= 1; got 0``. What a key must be is read from its
type (``config_types.expectation``), so the message and the reference agree. Pure layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import get_args, get_origin, get_type_hints

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from typing_extensions import is_typeddict

from pipeline.core.config_types import expectation, union_members, unwrap


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


_MISSING = object()


def dotted(path: Sequence[str | int]) -> str:
    """``['model', 'unfreeze_schedule', 0, 'lr']`` -> ``'model.unfreeze_schedule[0].lr'``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def unknown_key_message(key: str, valid: Sequence[str], section: str = "") -> str:
    """``unknown config key 'train.lrr'; valid keys under 'train': ...``."""
    where = f"under {section!r}" if section else "at top level"
    return f"unknown config key {key!r}; valid keys {where}: {', '.join(sorted(valid))}"


@dataclass
class _Spot:
    """Where in the schema an error lies: the key's path, type and raw value."""

    path: list[str | int] = field(default_factory=list)
    annotation: object = None
    metadata: list[object] = field(default_factory=list)
    raw: object = _MISSING
    unknown: str | None = None  # an unknown key of the mapping at ``path``
    valid: list[str] = field(default_factory=list)


def _is_structured(annotation: object) -> bool:
    """Items worth reporting one by one: mappings and unions, not scalars."""
    bare = unwrap(annotation)[0]
    return (
        is_typeddict(bare)
        or (isinstance(bare, type) and issubclass(bare, BaseModel))
        or union_members(bare) is not None
    )


def _step(raw: object, part: str | int) -> object:
    if isinstance(raw, Mapping) and part in raw:
        return raw[part]
    if isinstance(raw, list) and isinstance(part, int) and 0 <= part < len(raw):
        return raw[part]
    return _MISSING


def _locate(root: type[BaseModel], error: ErrorDetails, data: object) -> _Spot:
    """Follow the error's location down the schema as far as the schema names it."""
    spot = _Spot(annotation=root, raw=data)
    annotation: object = root
    structural = error["type"] in ("missing", "extra_forbidden")
    for part in error["loc"]:
        bare = unwrap(annotation)[0]
        members = union_members(bare)
        if members is not None:
            values = [m for m in members if m is not type(None)]
            if len(values) > 1:
                break  # a union is reported whole, not branch by branch
            bare = unwrap(values[0])[0]
        if isinstance(bare, type) and issubclass(bare, BaseModel):
            keys = dict(bare.model_fields)
            if part not in keys:
                spot.unknown, spot.valid = str(part), list(keys)
                break
            annotation, metadata = keys[part].annotation, list(keys[part].metadata)
        elif is_typeddict(bare):
            hints = get_type_hints(bare, include_extras=True)
            if part not in hints or structural:
                break
            annotation, metadata = hints[part], []
        elif get_origin(bare) is list and isinstance(part, int):
            item = get_args(bare)[0]
            if not _is_structured(item):
                break
            annotation, metadata = item, []
        else:
            break
        spot.path.append(part)
        spot.annotation, spot.metadata = annotation, metadata
        spot.raw = _step(spot.raw, part)
    return spot


def _message(root: type[BaseModel], error: ErrorDetails, data: object) -> tuple[str, str]:
    """(dotted key, message) for one pydantic error."""
    spot = _locate(root, error, data)
    key = dotted(spot.path)
    if spot.unknown is not None and error["type"] == "extra_forbidden":
        name = dotted([*spot.path, spot.unknown])
        return name, unknown_key_message(name, spot.valid, key)
    expected = expectation(spot.annotation, spot.metadata)
    if error["type"] == "value_error":
        reason = str((error.get("ctx") or {}).get("error", error["msg"]))
        return key, f"config key {key!r}: {reason}; got {spot.raw!r}"
    if spot.raw is None and not expected.nullable:
        return key, f"config key {key!r} may not be null; it must be {expected.phrase}"
    phrase = expected.phrase
    if error["type"] == "finite_number" and phrase.startswith("a number"):
        phrase = "a finite" + phrase[1:]
    return key, f"config key {key!r} must be {phrase}; got {spot.raw!r}"


def config_error(exc: ValidationError, root: type[BaseModel], data: object) -> ConfigError:
    """One ``ConfigError`` for a failed validation of ``data`` against ``root``: the first
    wrong key's message, followed by the other wrong keys' names."""
    messages: dict[str, str] = {}
    for error in exc.errors():
        key, message = _message(root, error, data)
        messages.setdefault(key, message)
    first, *others = messages
    text = messages[first]
    if others:
        text += f" (also wrong: {', '.join(repr(k) for k in others)})"
    return ConfigError(text)
