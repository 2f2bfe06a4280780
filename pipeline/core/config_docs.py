"""``configs/default.yaml`` and ``docs/config.md``, generated from the schema.

Both are written from ``core.schema`` alone: every key with its default and its one-line
meaning (the recipe, as YAML), and a reference table per section (type, default,
choices or bounds, meaning). ``python -m pipeline.core.config_docs`` rewrites them;
``--check`` lists the stale ones and exits 1, as tests/unit/core/test_config_docs.py
does. A key without a meaning is an error here, so it cannot be added undocumented.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
import typing
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typing_extensions import is_typeddict

from pipeline.core.atomic import write_text
from pipeline.core.config_types import expectation, union_members, unwrap
from pipeline.core.schema import RENAMED_KEYS, FitConfig, RootConfig

REGENERATE = "python -m pipeline.core.config_docs"
# Where the generated files live, relative to the repository root.
DEFAULT_YAML = Path("configs/default.yaml")
CONFIG_DOC = Path("docs/config.md")

_COMMENT_COLUMN = 35
_WIDTH = 100
_YAML_HEADER = f"""\
# The reference recipe: the published 48th-place Understanding Clouds solution (U-Net +
# EfficientNet-B2). Every key is here with its default and meaning; other configs name
# `base: default.yaml` and hold only what they change. Types, bounds and choices are in
# docs/config.md. Generated from pipeline/core/schema.py by
# `{REGENERATE}`: edit the schema, not this file.
"""
_DOC_HEADER = f"""\
# Configuration reference

Generated from `pipeline/core/schema.py` by `{REGENERATE}`; edit the
schema, not this page. The defaults are the reference recipe, `configs/default.yaml`.

- Every command takes `--config FILE` (default `configs/default.yaml`) and any number of
  `--set key.path=value` overrides, the value read as YAML (`--set train.lr=3e-4`,
  `--set data.submission_size=null`, `--set "tta.views=[identity, hflip]"`).
- A config names `base: <file>` (relative to itself) and holds only what it changes;
  sections merge key by key, lists are replaced whole.
- Keys are strict: an unknown key is an error that lists the valid ones, and a wrong
  value names the key, what it must be and what it got. Numbers written `1e-3` (which
  YAML reads as text) are numbers; `true`/`false` are never numbers.
- `train` and `classifier` share their fit settings, declared once, each section with
  its own defaults: {{shared}}.
- A run records its resolved config (`runs/<experiment>/config.yaml` and each fold's
  `config.yaml`); later stages compare theirs with it. Runs recorded by earlier
  versions still load: keys added since take their defaults and renamed keys (below)
  are migrated.
- The measurements behind some defaults and advice: [history-notes.md](history-notes.md).
"""


def _description(info: FieldInfo | None, dotted: str) -> str:
    text = (info.description or "").strip() if info is not None else ""
    if not text:
        raise ValueError(
            f"config key {dotted!r} has no meaning: give it Field(description=...) in "
            "pipeline/core/schema.py"
        )
    return " ".join(text.split())


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    annotation = info.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _typed_dict_items(annotation: object) -> type | None:
    """The TypedDict of a list of them (``augment``'s transforms), else None."""
    bare = unwrap(annotation)[0]
    if typing.get_origin(bare) is not list:
        return None
    item = unwrap(typing.get_args(bare)[0])[0]
    members = union_members(item)
    for candidate in members if members is not None else (item,):
        candidate = unwrap(candidate)[0]
        if is_typeddict(candidate):
            return typing.cast(type, candidate)
    return None


def _typed_dict_fields(typed: type) -> Iterator[tuple[str, object, FieldInfo | None]]:
    for name, annotation in typing.get_type_hints(typed, include_extras=True).items():
        info = next(
            (m for m in unwrap(annotation)[1] if isinstance(m, FieldInfo)),
            None,
        )
        yield name, annotation, info


# --------------------------------------------------------------------------------------
# configs/default.yaml
# --------------------------------------------------------------------------------------


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    if isinstance(value, int):
        return str(value)
    text = yaml.safe_dump([value], default_flow_style=True, width=1_000_000).strip()
    return text[1:-1]


def render_value(value: object) -> str:
    """A value in YAML flow style: ``[384, 576]``, ``{p: 0.5}``, ``0.000001``, ``null``."""
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    return _scalar(value)


def _commented(code: str, meaning: str) -> list[str]:
    """``code`` with ``# meaning`` beside it, wrapped under the comment column; above
    it when the code reaches the column (a long path or list)."""
    if len(code) > _COMMENT_COLUMN - 2:
        indent = code[: len(code) - len(code.lstrip())]
        above = textwrap.wrap(meaning, _WIDTH - len(indent) - 2)
        return [f"{indent}# {line}" for line in above] + [code]
    lines = textwrap.wrap(meaning, _WIDTH - _COMMENT_COLUMN - 2)
    out = [f"{code:<{_COMMENT_COLUMN}}# {lines[0]}"]
    out += [f"{'':<{_COMMENT_COLUMN}}#   {line}" for line in lines[1:]]
    return out


def _yaml_block(name: str, info: FieldInfo, value: object, indent: str, dotted: str) -> list[str]:
    meaning = _description(info, dotted)
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        lines = _commented(f"{indent}{name}:", meaning)
        for item in value:
            first = True
            for key, sub in item.items():
                lead = f"{indent}  - " if first else f"{indent}    "
                lines.append(f"{lead}{key}: {render_value(sub)}")
                first = False
        return lines
    return _commented(f"{indent}{name}: {render_value(value)}", meaning)


def render_default_yaml(root: type[BaseModel] = RootConfig) -> str:
    """``configs/default.yaml``: every key of ``root`` with its default and meaning."""
    defaults = root().model_dump(mode="python")
    lines = [_YAML_HEADER.rstrip("\n")]
    for name, info in root.model_fields.items():
        section = _section_model(info)
        if section is None:
            if len(lines) > 1 and lines[-1].startswith(" "):
                lines.append("")  # a top-level key after a section
            lines += _yaml_block(name, info, defaults[name], "", name)
            continue
        lines.append("")
        lines += _commented(f"{name}:", _description(info, name))
        for key, sub in section.model_fields.items():
            dotted = f"{name}.{key}"
            lines += _yaml_block(key, sub, defaults[name][key], "  ", dotted)
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == defaults, "default.yaml must read back as the defaults"
    return text


# --------------------------------------------------------------------------------------
# docs/config.md
# --------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _prose(text: str) -> str:
    """Markdown prose that keeps ``<name>`` visible (not read as an HTML tag)."""
    return re.sub(r"<(?=[A-Za-z/])", "&lt;", text)


def _row(dotted: str, annotation: object, info: FieldInfo | None, default: object) -> str:
    expected = expectation(annotation, info.metadata if info is not None else ())
    shown = "" if default is _NO_DEFAULT else f"`{render_value(default)}`"
    cells = [f"`{dotted}`", expected.type_name, shown, expected.limits]
    cells.append(_prose(_description(info, dotted)))
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


_NO_DEFAULT = object()
_TABLE_HEAD = [
    "| Key | Type | Default | Choices / bounds | Meaning |",
    "|---|---|---|---|---|",
]


def _rows(model: type[BaseModel], defaults: dict[str, object], prefix: str) -> Iterator[str]:
    for key, info in model.model_fields.items():
        dotted = f"{prefix}{key}"
        yield _row(dotted, info.annotation, info, defaults[key])
        typed = _typed_dict_items(info.annotation)
        if typed is not None:
            for sub, annotation, sub_info in _typed_dict_fields(typed):
                yield _row(f"{dotted}[].{sub}", annotation, sub_info, _NO_DEFAULT)


def render_config_doc(root: type[BaseModel] = RootConfig) -> str:
    """``docs/config.md``: one reference table per section of ``root``."""
    defaults = root().model_dump(mode="python")
    top = {k: v for k, v in root.model_fields.items() if _section_model(v) is None}
    shared = ", ".join(f"`{key}`" for key in FitConfig.model_fields)
    header = _DOC_HEADER.replace("{shared}", shared)
    lines = [header.rstrip("\n"), "", "## Top level", "", *_TABLE_HEAD]
    for key, info in top.items():
        lines.append(_row(key, info.annotation, info, defaults[key]))
        typed = _typed_dict_items(info.annotation)
        if typed is not None:
            for sub, annotation, sub_info in _typed_dict_fields(typed):
                lines.append(_row(f"{key}[].{sub}", annotation, sub_info, _NO_DEFAULT))
    for name, info in root.model_fields.items():
        section = _section_model(info)
        if section is None:
            continue
        lines += ["", f"## `{name}`", "", _prose(_description(info, name)), "", *_TABLE_HEAD]
        lines += _rows(section, defaults[name], f"{name}.")
    lines += ["", "## Renamed keys", ""]
    if RENAMED_KEYS:
        lines += [
            "A config that still names an old key is refused with its new name; runs "
            "recorded with it are read with the new one.",
            "",
        ]
        lines += ["| Old key | New key |", "|---|---|"]
        lines += [f"| `{old}` | `{new}` |" for old, new in RENAMED_KEYS.items()]
    else:
        lines.append("None yet.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# Writing and checking
# --------------------------------------------------------------------------------------


def generated_files(repo: Path) -> dict[Path, str]:
    """Each generated file under ``repo`` and the text it must hold."""
    return {repo / DEFAULT_YAML: render_default_yaml(), repo / CONFIG_DOC: render_config_doc()}


def _stale(repo: Path) -> dict[Path, str]:
    return {
        path: text
        for path, text in generated_files(repo).items()
        if not path.is_file() or path.read_text() != text
    }


def stale_files(repo: Path) -> list[Path]:
    """The generated files under ``repo`` that are missing or differ from the schema."""
    return list(_stale(repo))


def write_config_docs(repo: Path) -> list[Path]:
    """Rewrite the stale generated files under ``repo`` (atomically); returns them."""
    written = []
    for path, text in _stale(repo).items():
        written.append(write_text(path, text))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.core.config_docs [--check] [--repo DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list stale files; exit 1")
    parser.add_argument(
        "--repo", type=Path, default=Path(__file__).resolve().parents[2], help="repository root"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.repo)
        for path in stale:
            print(f"stale: {path} (run `{REGENERATE}`)")
        return 1 if stale else 0
    for path in write_config_docs(args.repo):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
