"""The schema: every key typed (never Any) and described; shared fit settings declared once."""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

import annotated_types as at
import pytest
from pydantic import BaseModel, Field
from typing_extensions import is_typeddict

from pipeline.core import schema
from pipeline.core.config_types import Bool, Float, PositiveInt, Size, Str, expectation, unwrap


def _fields(model: type[BaseModel], prefix: str = "") -> typing.Iterator[tuple[str, object, str]]:
    """(dotted key, annotation, description) of every key, sections and list items too."""
    for name, info in model.model_fields.items():
        dotted = f"{prefix}{name}"
        yield dotted, info.annotation, info.description or ""
        yield from _nested(info.annotation, dotted)


def _nested(annotation: object, dotted: str) -> typing.Iterator[tuple[str, object, str]]:
    bare = unwrap(annotation)[0]
    if isinstance(bare, type) and issubclass(bare, BaseModel):
        yield from _fields(bare, f"{dotted}.")
    elif is_typeddict(bare):
        for key, sub in typing.get_type_hints(bare, include_extras=True).items():
            info = next((m for m in unwrap(sub)[1] if hasattr(m, "description")), None)
            yield f"{dotted}.{key}", sub, getattr(info, "description", None) or ""
            yield from _nested(sub, f"{dotted}.{key}")
    else:
        for arg in typing.get_args(bare):
            yield from _nested(arg, f"{dotted}[]")


def _mentions_any(annotation: object) -> bool:
    if annotation is Any:
        return True
    bare, _ = unwrap(annotation)
    if bare is Any:
        return True
    if is_typeddict(bare):
        return any(_mentions_any(a) for a in typing.get_type_hints(bare).values())
    return any(_mentions_any(arg) for arg in typing.get_args(bare))


def keys_typed_any(model: type[BaseModel]) -> list[str]:
    return [key for key, annotation, _ in _fields(model) if _mentions_any(annotation)]


def keys_without_meaning(model: type[BaseModel]) -> list[str]:
    return [key for key, _, text in _fields(model) if not text.strip()]


def test_no_key_is_typed_any():
    assert keys_typed_any(schema.RootConfig) == []


def test_every_key_has_a_meaning():
    assert keys_without_meaning(schema.RootConfig) == []
    keys = [key for key, _, _ in _fields(schema.RootConfig)]
    assert "model.unfreeze_schedule[].fraction" in keys and "augment[].params" in keys


def test_the_checks_find_an_untyped_or_undescribed_key():
    class Bad(schema.Section):
        loose: Any = Field(None, description="anything")
        silent: int = 3

    assert keys_typed_any(Bad) == ["loose"]
    assert keys_without_meaning(Bad) == ["silent"]


def test_fit_settings_are_declared_once_for_both_trainers():
    shared = schema.FitConfig.model_fields
    for model in (schema.TrainConfig, schema.ClassifierConfig):
        assert issubclass(model, schema.FitConfig)
        for name, info in shared.items():
            mine = model.model_fields[name]
            assert (mine.annotation, mine.description) == (info.annotation, info.description)
            assert mine.metadata == info.metadata, name
    train, classifier = schema.TrainConfig(), schema.ClassifierConfig()
    assert (train.epochs, classifier.epochs) == (50, 30)
    assert (train.accumulation_steps, classifier.accumulation_steps) == (8, 1)
    assert (train.monitor, classifier.monitor) == ("val_dice", "val_auc")


def test_choices_of_a_key():
    assert schema.choices("tta.merge") == ("mean", "gmean", "max")
    assert "auto" in schema.choices("data.csv_format")
    with pytest.raises(ValueError, match="'train.lr' is not a choice"):
        schema.choices("train.lr")


@pytest.mark.parametrize(
    ("annotation", "phrase"),
    [
        (PositiveInt, "an integer >= 1"),
        (Annotated[Float, at.Gt(0), at.Lt(1)] | None, "null or a number > 0 and < 1"),
        (Bool | Literal["bfloat16"], "true, false or bfloat16"),
        (Float | Literal["auto"], "a number or auto"),
        (Annotated[list[PositiveInt], at.Len(5, 5)], "a list of integers >= 1 (exactly 5)"),
        (Annotated[list[Literal["a", "b"]], at.MinLen(1)], "a non-empty list of ['a', 'b']"),
        (Size | None, "null or [H, W] positive integers"),
        (list[Str], "a list of strings"),
    ],
)
def test_what_a_type_accepts_in_words(annotation, phrase):
    assert expectation(annotation).phrase == phrase
