"""Typed experiment configuration: YAML with ``base:`` inheritance, ``--set`` overrides.

``configs/default.yaml`` holds every key; its values define each key's type. A key may
also be null where ``NULLABLE`` says so (the key tables: ``core.config_keys``). Unknown
keys, wrong types and values outside ``CHOICES`` are errors that name the key, what was
expected and what was received.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.core import layout
from pipeline.core.atomic import write_text
from pipeline.core.config_keys import (
    AT_LEAST_TWO_KEYS,
    BELOW_ONE_KEYS,
    BOOL_OR_CHOICE,
    CHOICES,
    FLOAT_OR_AUTO,
    INT_LIST_KEYS,
    LIST_CHOICES,
    NON_NEGATIVE_KEYS,
    NULL_DEFAULT_TYPES,
    NULLABLE,
    POSITIVE_INT_KEYS,
    POSITIVE_KEYS,
    SCHEDULE_KEYS,
    SIZE_KEYS,
    TRANSFORM_LIST_KEYS,
)

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


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


class Section(Mapping[str, Any]):
    """Read-only view of one config mapping; attribute access, strict on unknown keys."""

    def __init__(self, data: Mapping[str, Any], path: str = "") -> None:
        self._data = data
        self._path = path

    def __getattr__(self, key: str) -> Any:
        if key.startswith("_"):
            raise AttributeError(key)
        return self[key]

    def __getitem__(self, key: str) -> Any:
        if key not in self._data:
            where = self._path or "the config"
            raise KeyError(
                f"unknown config key {self._dotted(key)!r}; valid keys of {where}: "
                f"{', '.join(sorted(self._data))}"
            )
        value = self._data[key]
        if isinstance(value, Mapping):
            return Section(value, self._dotted(key))
        return copy.deepcopy(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def _dotted(self, key: str) -> str:
        return f"{self._path}.{key}" if self._path else key

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the underlying plain dict."""
        return copy.deepcopy(dict(self._data))


class Config(Section):
    """The merged, validated configuration of one experiment."""

    def __init__(self, data: Mapping[str, Any], source: str = "") -> None:
        super().__init__(data)
        self.source = source

    @property
    def run_dir(self) -> Path:
        """``<runs_dir>/<experiment>``: every stage reads and writes there."""
        return Path(self["runs_dir"]) / self["experiment"]

    def fold_dir(self, fold: int, stage: str = "") -> Path:
        """``run_dir/[stage/]fold_<k>``: one fold's outputs (stage e.g. ``classifier``)."""
        return layout.fold_dir(self.run_dir, fold, stage)

    def with_overrides(self, overrides: Sequence[str]) -> Config:
        """A new config with ``key.path=value`` overrides applied and validated."""
        data = self.to_dict()
        for item in overrides:
            apply_override(data, item)
        return Config(validate(data), self.source)


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
    """Load ``path`` (default ``configs/default.yaml``) over the defaults, apply overrides.

    Every config is checked against ``configs/default.yaml``: a key it lacks is unknown.
    """
    defaults = load_yaml(DEFAULT_CONFIG)
    path = Path(path) if path is not None else DEFAULT_CONFIG
    data = merge(defaults, _resolve_bases(path))
    for item in overrides:
        apply_override(data, item)
    return Config(validate(data), str(path))


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
        _unknown(dotted, node)
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc


def _unknown(dotted: str, siblings: Mapping[str, Any]) -> None:
    raise ConfigError(
        f"unknown config key {dotted!r}; valid keys here: {', '.join(sorted(siblings))}"
    )


def validate(data: dict[str, Any]) -> dict[str, Any]:
    """Check ``data`` against the defaults' keys and types; return it with coerced values."""
    defaults = load_yaml(DEFAULT_CONFIG)
    return _check(data, defaults, "")


def _check(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping; got {value!r}")
        for name in value:
            if name not in default:
                where = f"under {key!r}" if key else "at top level"
                raise ConfigError(
                    f"unknown config key {_join(key, name)!r}; valid keys {where}: "
                    f"{', '.join(sorted(default))}"
                )
        missing = [name for name in default if name not in value]
        if missing:
            raise ConfigError(f"config is missing keys {missing} under {key or 'top level'!r}")
        return {name: _check(value[name], default[name], _join(key, name)) for name in default}
    if value is None:
        if key in NULLABLE:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    if key in TRANSFORM_LIST_KEYS:
        return _check_transforms(value, key)
    if key in FLOAT_OR_AUTO and value == "auto":
        return value
    if key in BOOL_OR_CHOICE and not isinstance(value, bool):
        if value not in BOOL_OR_CHOICE[key]:
            words = ", ".join(BOOL_OR_CHOICE[key])
            raise ConfigError(f"config key {key!r} must be true, false or {words}; got {value!r}")
        return value
    if key in SCHEDULE_KEYS:
        return _check_schedule(value, key)
    if key in INT_LIST_KEYS:
        return _check_int_list(value, key, INT_LIST_KEYS[key])
    if key in CHOICES and value not in CHOICES[key]:
        # Before the type check: YAML reads yes/no/on/off as booleans.
        raise ConfigError(f"config key {key!r} must be one of {list(CHOICES[key])}; got {value!r}")
    value = _coerce(value, default, key)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number; got {value!r}")
    if key in LIST_CHOICES:
        bad = [v for v in value if not isinstance(v, str) or v not in LIST_CHOICES[key]]
        if bad or not value:
            raise ConfigError(
                f"config key {key!r} must be a non-empty list of {list(LIST_CHOICES[key])}; "
                f"got {value!r}"
            )
    if key in SIZE_KEYS:
        _check_size(value, key)
    if key in POSITIVE_INT_KEYS and value < 1:
        raise ConfigError(f"config key {key!r} must be an integer >= 1; got {value!r}")
    if key in NON_NEGATIVE_KEYS and value < 0:
        raise ConfigError(f"config key {key!r} must be a number >= 0; got {value!r}")
    if key in POSITIVE_KEYS and value <= 0:
        raise ConfigError(f"config key {key!r} must be a number > 0; got {value!r}")
    if key in BELOW_ONE_KEYS and value >= 1:
        raise ConfigError(f"config key {key!r} must be below 1; got {value!r}")
    if key in AT_LEAST_TWO_KEYS and value < 2:
        raise ConfigError(f"config key {key!r} must be an integer >= 2; got {value!r}")
    return value


def _coerce(value: Any, default: Any, key: str) -> Any:
    if default is None:
        return _check_null_default(value, key)
    expected = type(default)
    if expected is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-3 as a string; accept it as a float
        except ValueError:
            pass
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be true or false; got {value!r}")
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(
            f"config key {key!r} must be {expected.__name__}; got {type(value).__name__} {value!r}"
        )
    if expected is list and default and all(isinstance(v, float) for v in default):
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"config key {key!r} must be a list of numbers; got {value!r}"
            ) from exc
    return value


def _check_null_default(value: Any, key: str) -> Any:
    """A value of a key whose default is null, checked against ``NULL_DEFAULT_TYPES``."""
    if key not in NULL_DEFAULT_TYPES:
        return value
    expected, above = NULL_DEFAULT_TYPES[key]
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)
    too_small = above is not None and isinstance(value, float) and value <= above
    if not isinstance(value, expected) or too_small:
        what = "a number" if expected is float else expected.__name__
        bound = f" > {above:g}" if above is not None else ""
        raise ConfigError(f"config key {key!r} must be null or {what}{bound}; got {value!r}")
    return value


def _is_positive_ints(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def _check_int_list(value: Any, key: str, length: int) -> list[int]:
    if not _is_positive_ints(value, length):
        raise ConfigError(f"config key {key!r} must be {length} positive integers; got {value!r}")
    return value


def _check_size(value: Any, key: str) -> None:
    if not _is_positive_ints(value, 2):
        raise ConfigError(f"config key {key!r} must be [H, W] positive integers; got {value!r}")


def _check_transforms(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(f"config key {key!r} must be a list of transforms; got {value!r}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or set(item) - {"name", "params"} or "name" not in item:
            raise ConfigError(
                f"config key {key}[{i}] must be {{name: <Transform>, params: {{...}}}}; "
                f"got {item!r}"
            )
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"config key {key}[{i}].params must be a mapping; got {params!r}")
        out.append({"name": str(item["name"]), "params": params})
    return out


def _check_schedule(value: Any, key: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ConfigError(f"config key {key!r} must be a list of stages; got {value!r}")
    out: list[dict[str, Any]] = []
    for i, stage in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(stage, dict) or set(stage) - {"epoch", "fraction", "lr"}:
            raise ConfigError(
                f"config key {where} must be {{epoch: int, fraction: float, lr: float|null}}; "
                f"got {stage!r}"
            )
        epoch, fraction, lr = stage.get("epoch"), stage.get("fraction"), stage.get("lr")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ConfigError(f"config key {where}.epoch must be an integer >= 0; got {epoch!r}")
        if not isinstance(fraction, (int, float)) or not 0 < float(fraction) <= 1:
            raise ConfigError(f"config key {where}.fraction must be in (0, 1]; got {fraction!r}")
        if lr is not None:
            try:
                lr = float(lr)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"config key {where}.lr must be a number; got {lr!r}") from exc
        if out and epoch <= out[-1]["epoch"]:
            raise ConfigError(f"config key {where}.epoch must increase; got {epoch}")
        out.append({"epoch": epoch, "fraction": float(fraction), "lr": lr})
    return out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def save_config(config: Config, path: str | Path) -> Path:
    """Write the merged config as YAML atomically (temporary name, then rename)."""
    return write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
