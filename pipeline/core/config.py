"""Experiment configuration: YAML with ``base:`` inheritance and ``--set`` overrides,
validated by the typed schema (``core.schema``).

Every key, its type, bounds, choices, default and meaning is declared once in the
schema; a file holds only what it changes. Unknown keys, wrong types and values outside
their bounds or choices are ``ConfigError``s that name the key, what it must be and what
it got (``core.config_errors``). Configs that runs recorded by earlier versions are read
with ``read_run_config``, which renames the keys renamed since (``schema.RENAMED_KEYS``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import PrivateAttr, ValidationError

from pipeline.core import layout
from pipeline.core.atomic import write_text
from pipeline.core.config_errors import ConfigError, config_error
from pipeline.core.schema import RENAMED_KEYS, RootConfig

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "Config",
    "ConfigError",
    "apply_override",
    "config_from_dict",
    "default_dict",
    "load_config",
    "load_yaml",
    "merge",
    "migrate_run_config",
    "read_run_config",
    "save_config",
]

# The repository's configs/ (a source checkout or an editable install); a regular
# install carries the same files as pipeline/configs/ (setup.cfg's package_dir).
_PACKAGE = Path(__file__).resolve().parents[1]
_INSTALLED_CONFIGS = _PACKAGE / "configs"
CONFIG_DIR = (
    _INSTALLED_CONFIGS
    if (_INSTALLED_CONFIGS / "default.yaml").is_file()
    else _PACKAGE.parent / "configs"
)
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class Config(RootConfig):
    """The merged, validated configuration of one experiment: typed, frozen sections
    (``config.train.lr``), the file it came from and where its run lives."""

    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """The config file this was loaded from ("" when built from a dict)."""
        return self._source

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<experiment>``: every stage reads and writes there."""
        return Path(self.runs_dir) / self.experiment

    def fold_dir(self, fold: int, stage: str = "") -> Path:
        """``run_dir/[stage/]fold_<k>``: one fold's outputs (stage e.g. ``classifier``)."""
        return layout.fold_dir(self.run_dir, fold, stage)

    def with_overrides(self, overrides: Sequence[str]) -> Config:
        """A new config with ``key.path=value`` overrides applied and validated."""
        data = self.to_dict()
        for item in overrides:
            apply_override(data, item)
        return config_from_dict(data, self.source)


@functools.cache
def _defaults() -> dict[str, Any]:
    return RootConfig().to_dict()


def default_dict() -> dict[str, Any]:
    """Every key with its default (the reference recipe), as a plain nested dict."""
    return copy.deepcopy(_defaults())


def load_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML mapping; a clear error names the file on failure."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at top level; got {type(data).__name__}")
    return data


def _resolve_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config inheritance cycle: {chain}")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name; got {base!r}")
    parent = _resolve_bases(path.parent / base, (*seen, path))
    return merge(parent, data)


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``; lists and scalars are replaced."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (default ``configs/default.yaml``) over the schema's defaults, apply
    ``key.path=value`` overrides and validate.

    Raises:
        FileNotFoundError: a config file (or a ``base:`` it names) does not exist.
        ConfigError: bad YAML, an unknown or renamed key, or a wrong value.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = merge(default_dict(), _resolve_bases(path))
    for old, new in RENAMED_KEYS.items():
        if _find(data, old)[0]:
            raise ConfigError(
                f"config key {old!r} is now {new!r} (it takes the same values); rename it "
                f"in {path} or the config it names as base"
            )
    for item in overrides:
        apply_override(data, item)
    return config_from_dict(data, str(path))


def config_from_dict(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a complete config dict (every section; e.g. ``default_dict()`` merged
    with a file) against the schema; ``source`` names the file it came from."""
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, Config, data) from None
    config._source = source
    return config


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``a.b=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override must look like key.path=value; got {item!r}")
    dotted, raw = item.split("=", 1)
    keys = dotted.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys[:-1]):
        if key not in node:
            _unknown(".".join(keys[: depth + 1]), node)
        if not isinstance(node[key], dict):
            section = ".".join(keys[: depth + 1])
            raise ConfigError(
                f"config key {section!r} must be a mapping (a section); got "
                f"{node[key]!r}, so {dotted!r} cannot be set"
            )
        node = node[key]
    if keys[-1] not in node:
        _unknown(".".join(keys), node)
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc


def _unknown(dotted: str, siblings: Mapping[str, Any]) -> None:
    if dotted in RENAMED_KEYS:
        raise ConfigError(
            f"config key {dotted!r} is now {RENAMED_KEYS[dotted]!r} (it takes the same "
            "values); set that instead"
        )
    raise ConfigError(
        f"unknown config key {dotted!r}; valid keys here: {', '.join(sorted(siblings))}"
    )


def _find(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """``(found, value)`` of a dotted key in a nested dict."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def migrate_run_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config a run recorded, its keys renamed since (``RENAMED_KEYS``) given their
    new names; keys added since are left out (they take their defaults)."""
    out = copy.deepcopy(dict(data))
    for old, new in RENAMED_KEYS.items():
        found, value = _find(out, old)
        if not found:
            continue
        *parents, name = old.split(".")
        node = out
        for part in parents:
            node = node[part]
        del node[name]
        if not _find(out, new)[0]:
            *parents, name = new.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[name] = value
    return out


def read_run_config(path: str | Path) -> Config:
    """The config a run recorded (``save_config``: ``config.yaml`` of a run or a fold),
    written by this version or an earlier one: renamed keys are migrated, keys added
    since take their defaults.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: the file is not a config this version can read (an unknown key or
            a value it refuses), with what to do.
    """
    path = Path(path)
    data = migrate_run_config(load_yaml(path))
    try:
        return config_from_dict(merge(default_dict(), data), str(path))
    except ConfigError as err:
        raise ConfigError(
            f"{path} was recorded by a foldseg version whose config this one cannot read: "
            f"{err}. Retrain with --force to record it again, or use the version that "
            "wrote it"
        ) from None


def save_config(config: Config, path: str | Path) -> Path:
    """Write the merged config as YAML atomically (temporary name, then rename)."""
    return write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
