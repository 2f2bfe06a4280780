"""Atomic writes: every file the project writes appears whole or not at all (pure layer).

A writer writes a temporary sibling and renames it over the target (``os.replace``, atomic
on one file system), so an interrupted or failed write leaves the previous file (or none)
and no half-written one; a reader never sees a partial file. The temporary name carries
this process's id, so two processes writing the same file do not share it, and ends in
``.tmp``, so no listing of images or CSVs mistakes it for one. This module is the one
place that renames into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False, suffix: str = "") -> Iterator[Path]:
    """A temporary path to write ``path``'s content to; renamed over ``path`` when the block
    ends without an error, removed when it raises.

    ``keep_suffix``: the temporary name ends in ``path``'s extension (``x.123.tmp.png``)
    for writers that infer the format from it (matplotlib, Keras); ``suffix`` is appended
    after everything (Keras 3 weights need ``.weights.h5``). The parent folder is made.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if keep_suffix:
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}{suffix}")
    else:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, ``\\n`` line ends as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        handle.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON atomically; numpy scalars are written as floats."""
    return write_text(path, json.dumps(data, indent=indent, default=float))


def write_csv(path: str | Path, frame: pd.DataFrame, **to_csv: Any) -> Path:
    """Write ``frame`` as CSV atomically (no index, ``\\n`` line ends unless ``to_csv``
    says otherwise)."""
    options: dict[str, Any] = {"index": False, "lineterminator": "\n", **to_csv}
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **options)
    return Path(path)


def publish_directory(built: Path, directory: Path) -> None:
    """Rename the finished folder ``built`` to ``directory``, which must not exist yet (or be
    empty); OSError when another process published it first."""
    os.replace(built, directory)


def replace_directory(built: Path, directory: Path) -> None:
    """Put the finished folder ``built`` in place of ``directory``.

    An existing ``directory`` is first renamed aside (``<name>.old``) and removed after,
    so at every moment ``directory`` is either the old whole folder or the new one.
    """
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if directory.exists():
        os.replace(directory, old)
    os.replace(built, directory)
    if old.exists():
        shutil.rmtree(old)
