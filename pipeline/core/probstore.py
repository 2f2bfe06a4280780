"""Compact, streamable store of per-image class probabilities (out-of-fold or test).

A store is a directory of three files:

- ``probs.u8``: every image's probabilities quantised to uint8, ``q = round(p * 255)``,
  laid out class-major (C, H, W) so one class of one image is contiguous, the images
  concatenated in the order they were added. It can be memory-mapped.
- ``index.csv``: ``image_id, offset, height, width`` (offset in bytes into probs.u8);
  images may have different sizes.
- ``meta.json``: ``classes``, ``dtype`` ("uint8"), ``layout`` ("CHW"),
  ``quantisation`` (255).

``ProbWriter`` builds the store under ``<directory>.tmp`` and renames it into place
only on ``close``, so a store that exists is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from pipeline.core.atomic import replace_directory

logger = logging.getLogger(__name__)

QUANTISATION = 255
DATA_FILE = "probs.u8"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
INDEX_COLUMNS = ["image_id", "offset", "height", "width"]
# Read size of ``iter``. Under glibc's largest dynamic mmap threshold (32 MB), freed
# chunks are reused from the heap; 64 MB chunks were fresh mmaps each time, whose page
# faults made iterating a warm store 4-6x slower than reading it.
DEFAULT_BATCH_BYTES = 4 * 2**20


def quantise_prob(prob: np.ndarray) -> np.ndarray:
    """Quantise a prob array (any shape, float in [0, 1]) to uint8 ``round(p * 255)``.

    The error is at most 0.5 / 255 (plus float32 rounding, ~1e-7). Values outside
    [0, 1] or NaN are an error: they mean an upstream bug, not a probability.
    """
    if prob.size:
        # NaN fails both comparisons, so one check covers it.
        lo, hi = float(prob.min()), float(prob.max())
        if not (lo >= 0.0 and hi <= 1.0):
            raise ValueError(f"prob must lie in [0, 1] with no NaN; got min {lo}, max {hi}")
    return np.rint(prob.astype(np.float32) * np.float32(QUANTISATION)).astype(np.uint8)


def dequantise_prob(q: np.ndarray) -> np.ndarray:
    """Map quantised probs (any shape, uint8) back to float32 ``q / 255``."""
    return q.astype(np.float32) / np.float32(QUANTISATION)


def _tmp_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tmp")


class ProbWriter:
    """Stream (H, W, C) probs of many images into a new store at ``directory``.

    Each ``add`` writes straight to the open data file; only the index rows stay in
    memory. ``close`` (or leaving the ``with`` block without an exception) publishes
    the store; an exception inside the block discards it. An existing store at
    ``directory`` is an error unless ``overwrite``.
    """

    def __init__(
        self, directory: str | Path, classes: Sequence[str], overwrite: bool = False
    ) -> None:
        self.directory = Path(directory)
        self.classes = list(classes)
        self.overwrite = overwrite
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be non-empty and unique; got {self.classes}")
        if self.directory.exists() and not overwrite:
            raise FileExistsError(
                f"prob store {self.directory} already exists; pass overwrite=True to replace it"
            )
        self._tmp = _tmp_dir(self.directory)
        if self._tmp.exists():
            logger.warning("removing unfinished prob store %s", self._tmp)
            shutil.rmtree(self._tmp)
        self._tmp.mkdir(parents=True)
        self._file: BinaryIO | None = open(self._tmp / DATA_FILE, "wb")  # noqa: SIM115
        self._rows: list[tuple[str, int, int, int]] = []
        self._ids: set[str] = set()
        self._offset = 0

    def add(self, image_id: str, prob: np.ndarray) -> None:
        """Append one image: ``prob`` (H, W, C) float in [0, 1], or uint8 already quantised."""
        if self._file is None:
            raise ValueError(f"prob store {self.directory} is closed; cannot add {image_id!r}")
        if image_id in self._ids:
            raise ValueError(f"image_id {image_id!r} was already added to {self.directory}")
        if prob.ndim != 3 or prob.shape[2] != len(self.classes):
            raise ValueError(
                f"prob for {image_id!r} must be (H, W, {len(self.classes)}); got {prob.shape}"
            )
        q = prob if prob.dtype == np.uint8 else quantise_prob(prob)
        chw = np.ascontiguousarray(q.transpose(2, 0, 1))
        self._file.write(chw.tobytes())
        self._ids.add(image_id)
        self._rows.append((image_id, self._offset, prob.shape[0], prob.shape[1]))
        self._offset += chw.nbytes

    def close(self) -> None:
        """Write index and meta, then publish the store under ``directory`` atomically."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        pd.DataFrame(self._rows, columns=INDEX_COLUMNS).to_csv(self._tmp / INDEX_FILE, index=False)
        meta = {
            "classes": self.classes,
            "dtype": "uint8",
            "layout": "CHW",
            "quantisation": QUANTISATION,
        }
        (self._tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        replace_directory(self._tmp, self.directory)
        logger.info("wrote %d images to prob store %s", len(self._rows), self.directory)

    def discard(self) -> None:
        """Drop everything written so far; nothing is published."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ProbWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.discard()


class ProbReader:
    """Read a published store: random access by ``image_id`` or sequential streaming."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        for name in (META_FILE, INDEX_FILE, DATA_FILE):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(
                    f"prob store {self.directory} is missing {name} (not written, or not closed)"
                )
        self.classes: list[str] = _read_meta(self.directory / META_FILE)
        self._index = _read_index(self.directory / INDEX_FILE, len(self.classes))
        self._data_path = self.directory / DATA_FILE
        self._offsets = self._index["offset"].to_numpy()
        self._ends = self._index["end"].to_numpy()
        self._heights = self._index["height"].to_numpy()
        self._widths = self._index["width"].to_numpy()
        size = self._data_path.stat().st_size
        expected = int(self._ends[-1]) if len(self._ends) else 0
        if size != expected:
            raise ValueError(
                f"{self._data_path} must hold {expected} bytes as {INDEX_FILE} says; got {size}"
            )
        self._data = (
            np.memmap(self._data_path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        )
        self._image_ids: list[str] = [str(image_id) for image_id in self._index["image_id"]]
        self._row = {image_id: i for i, image_id in enumerate(self._image_ids)}

    @property
    def image_ids(self) -> list[str]:
        """Image ids in storage order."""
        return list(self._image_ids)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row

    def shape(self, image_id: str) -> tuple[int, int, int]:
        """(C, H, W) of one image's stored probs."""
        i = self._lookup(image_id)
        return len(self.classes), int(self._heights[i]), int(self._widths[i])

    def get(self, image_id: str) -> np.ndarray:
        """One image's quantised probs: uint8 (C, H, W), a read-only view of the memmap."""
        i = self._lookup(image_id)
        shape = (len(self.classes), int(self._heights[i]), int(self._widths[i]))
        return self._data[int(self._offsets[i]) : int(self._ends[i])].reshape(shape)

    def iter(self, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(image_id, uint8 (C, H, W))`` in storage order, reading sequentially.

        Reads about ``batch_bytes`` at a time (at least one image), so memory stays
        bounded whatever the file size. Each yielded array views its own chunk buffer.
        """
        if batch_bytes < 1:
            raise ValueError(f"batch_bytes must be >= 1; got {batch_bytes}")
        ids, offsets, ends = self._image_ids, self._offsets.tolist(), self._ends.tolist()
        heights, widths = self._heights.tolist(), self._widths.tolist()
        c = len(self.classes)
        with open(self._data_path, "rb") as f:
            if hasattr(os, "posix_fadvise"):  # a larger kernel read-ahead on cold files
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            start = 0
            while start < len(ids):
                stop = start + 1
                while stop < len(ids) and ends[stop] - offsets[start] <= batch_bytes:
                    stop += 1
                chunk = np.empty(ends[stop - 1] - offsets[start], dtype=np.uint8)
                if f.readinto(chunk.data) != chunk.nbytes:
                    raise ValueError(
                        f"{self._data_path} ended early while reading image {ids[start]!r}"
                    )
                for i in range(start, stop):
                    part = chunk[offsets[i] - offsets[start] : ends[i] - offsets[start]]
                    yield ids[i], part.reshape(c, heights[i], widths[i])
                start = stop

    to_prob = staticmethod(dequantise_prob)

    def _lookup(self, image_id: str) -> int:
        if image_id not in self._row:
            raise KeyError(f"image_id {image_id!r} is not in prob store {self.directory}")
        return self._row[image_id]


def _read_meta(path: Path) -> list[str]:
    try:
        meta: Any = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    expected = {"dtype": "uint8", "layout": "CHW", "quantisation": QUANTISATION}
    if not isinstance(meta, dict) or set(meta) != {"classes", *expected}:
        keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} must have keys {sorted({'classes', *expected})}; got {keys}")
    for key, value in expected.items():
        if meta[key] != value:
            raise ValueError(f"{path}: {key} must be {value!r}; got {meta[key]!r}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: classes must be a non-empty list of names; got {classes!r}")
    return classes


def _read_index(path: Path, n_classes: int) -> pd.DataFrame:
    index = pd.read_csv(path, dtype={"image_id": str}, keep_default_na=False)
    if list(index.columns) != INDEX_COLUMNS:
        raise ValueError(f"{path} must have columns {INDEX_COLUMNS}; got {list(index.columns)}")
    for column in INDEX_COLUMNS[1:]:
        if len(index) and not pd.api.types.is_integer_dtype(index[column]):
            raise ValueError(
                f"{path}: column {column} must hold integers; got {index[column].dtype}"
            )
        index[column] = index[column].astype(np.int64)
    duplicated = index["image_id"][index["image_id"].duplicated()]
    if len(duplicated):
        raise ValueError(f"{path}: image_id {duplicated.iloc[0]!r} appears more than once")
    index["end"] = index["offset"] + n_classes * index["height"] * index["width"]
    expected_offset = np.zeros(len(index), dtype=np.int64)
    expected_offset[1:] = index["end"].to_numpy()[:-1]
    bad = np.flatnonzero(
        (index["offset"].to_numpy() != expected_offset)
        | (index["height"] < 1)
        | (index["width"] < 1)
    )
    if len(bad):
        row = index.iloc[bad[0]]
        raise ValueError(
            f"{path}: row {bad[0]} (image_id {row['image_id']!r}) must start at byte "
            f"{expected_offset[bad[0]]} with positive height and width; got offset "
            f"{row['offset']}, height {row['height']}, width {row['width']}"
        )
    return index


class MultiReader:
    """Several stores read as one (e.g. the out-of-fold stores of all folds), in order."""

    def __init__(self, directories: Sequence[str | Path]) -> None:
        if not directories:
            raise ValueError("directories must name at least one prob store; got none")
        self.readers = [ProbReader(d) for d in directories]
        self.classes = self.readers[0].classes
        self._owner: dict[str, ProbReader] = {}
        for reader in self.readers:
            if reader.classes != self.classes:
                raise ValueError(
                    f"prob store {reader.directory} must have classes {self.classes}; "
                    f"got {reader.classes}"
                )
            for image_id in reader.image_ids:
                if image_id in self._owner:
                    raise ValueError(
                        f"image_id {image_id!r} is in both {self._owner[image_id].directory} "
                        f"and {reader.directory}"
                    )
                self._owner[image_id] = reader

    @property
    def image_ids(self) -> list[str]:
        """Image ids in storage order, store after store."""
        return list(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._owner

    def get(self, image_id: str) -> np.ndarray:
        """One image's quantised probs: uint8 (C, H, W), a read-only memmap view."""
        if image_id not in self._owner:
            stores = [str(reader.directory) for reader in self.readers]
            raise KeyError(f"image_id {image_id!r} is in none of the prob stores {stores}")
        return self._owner[image_id].get(image_id)

    def iter(self, batch_bytes: int = DEFAULT_BATCH_BYTES) -> Iterator[tuple[str, np.ndarray]]:
        """Yield ``(image_id, uint8 (C, H, W))`` store after store, each sequentially."""
        for reader in self.readers:
            yield from reader.iter(batch_bytes)

    to_prob = staticmethod(dequantise_prob)


def merge_stores(
    directories: Sequence[str | Path], out_dir: str | Path, batch_bytes: int = DEFAULT_BATCH_BYTES
) -> None:
    """Concatenate stores (same classes, disjoint image ids) into one new store at ``out_dir``."""
    source = MultiReader(directories)
    with ProbWriter(out_dir, source.classes) as writer:
        for image_id, q in source.iter(batch_bytes):
            writer.add(image_id, q.transpose(1, 2, 0))
