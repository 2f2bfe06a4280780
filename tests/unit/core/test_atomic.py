"""Atomic writes: a file appears whole or not at all, and only core.atomic renames."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core import atomic
from tests.conftest import REPO


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "table.csv"
    atomic.write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]


def test_the_temporary_name_is_this_process_and_no_listed_extension(tmp_path: Path) -> None:
    with atomic.atomic_path(tmp_path / "a.jpg") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".tmp" and str(tmp).count(".jpg.")
        tmp.write_bytes(b"x")
    with atomic.atomic_path(tmp_path / "f.png", keep_suffix=True, suffix=".h5") as tmp:
        assert tmp.name.endswith(".tmp.png.h5")
        tmp.write_bytes(b"y")
    assert (tmp_path / "a.jpg").read_bytes() == b"x" and (tmp_path / "f.png").read_bytes() == b"y"


def test_csv_and_json_round_trip(tmp_path: Path) -> None:
    frame = pd.DataFrame({"image_id": ["0012", "NA"], "score": [0.5, 1.0]})
    atomic.write_csv(tmp_path / "t.csv", frame)
    assert (tmp_path / "t.csv").read_bytes() == b"image_id,score\n0012,0.5\nNA,1.0\n"
    atomic.write_json(tmp_path / "t.json", {"a": 1})
    assert (tmp_path / "t.json").read_text() == '{\n "a": 1\n}'


def test_a_directory_is_replaced_whole(tmp_path: Path) -> None:
    final = tmp_path / "store"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    built = tmp_path / "store.build"
    built.mkdir()
    (built / "new.bin").write_bytes(b"new")
    atomic.replace_directory(built, final)
    assert [p.name for p in final.iterdir()] == ["new.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_only_the_atomic_module_renames_files_into_place() -> None:
    renames = re.compile(r"\bos\.replace\(|\.replace\(out\)|mkstemp\(")
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("pipeline", "benchmarks")
        for path in sorted((REPO / folder).rglob("*.py"))
        if path.name != "atomic.py" and renames.search(path.read_text())
    ]
    assert offenders == []
