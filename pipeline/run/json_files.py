"""JSON files of a run: written atomically (temporary name, then rename), read with a
clear error naming a damaged file and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core import atomic


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (``core.atomic``)."""
    return atomic.write_json(path, data)


def read_json(path: Path, hint: str = "") -> dict[str, Any]:
    """Read a JSON file a previous stage wrote; FileNotFoundError says which stage, and
    a damaged file (not JSON, or not an object) is a ValueError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found{'; ' + hint if hint else ''}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(
            f"{path} is damaged (not valid JSON: {exc}); remake it{': ' + hint if hint else ''}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got {type(data).__name__}")
    return data
