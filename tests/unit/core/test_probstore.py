import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.core.probstore import (
    MultiReader,
    ProbReader,
    ProbWriter,
    dequantise_prob,
    merge_stores,
    quantise_prob,
)

CLASSES = ["Fish", "Flower", "Gravel"]
SIZES = [(5, 7), (8, 8), (1, 3), (11, 4), (6, 9)]


def _probs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"img{seed}_{i}": rng.random((h, w, 3), dtype=np.float32) for i, (h, w) in enumerate(SIZES)
    }


def _write(directory: Path, probs: dict[str, np.ndarray]) -> None:
    with ProbWriter(directory, CLASSES) as writer:
        for image_id, prob in probs.items():
            writer.add(image_id, prob)


def test_round_trip_mixed_sizes(tmp_path: Path) -> None:
    probs = _probs()
    _write(tmp_path / "oof", probs)
    reader = ProbReader(tmp_path / "oof")
    assert reader.classes == CLASSES and len(reader) == len(probs)
    assert reader.image_ids == list(probs)
    for image_id, prob in probs.items():
        q = reader.get(image_id)
        assert q.dtype == np.uint8 and q.shape == (3, *prob.shape[:2])
        assert reader.shape(image_id) == q.shape
        # Quantisation error is at most half a level.
        err = np.abs(reader.to_prob(q) - prob.transpose(2, 0, 1))
        assert err.max() <= 0.5 / 255 + 1e-6
    index = pd.read_csv(tmp_path / "oof" / "index.csv")
    assert list(index.columns) == ["image_id", "offset", "height", "width"]
    meta = json.loads((tmp_path / "oof" / "meta.json").read_text())
    assert meta == {"classes": CLASSES, "dtype": "uint8", "layout": "CHW", "quantisation": 255}


def test_layout_is_class_major_and_get_is_a_view(tmp_path: Path) -> None:
    prob = np.zeros((2, 3, 3), dtype=np.float32)
    prob[..., 1] = 1.0
    prob[0, 2, 2] = 0.5
    _write(tmp_path / "s", {"a": prob})
    raw = np.fromfile(tmp_path / "s" / "probs.u8", dtype=np.uint8)
    assert raw.tolist() == [0] * 6 + [255] * 6 + [0, 0, 128, 0, 0, 0]
    q = ProbReader(tmp_path / "s").get("a")
    assert isinstance(q.base, np.memmap) or isinstance(q, np.memmap)
    assert not q.flags.writeable


def test_quantise_hand_checked() -> None:
    q = quantise_prob(np.array([0.0, 0.5 / 255, 0.4, 0.5, 1.0], dtype=np.float32))
    assert q.tolist() == [0, 0, 102, 128, 255]
    assert dequantise_prob(np.array([0, 255], dtype=np.uint8)).tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"prob must lie in \[0, 1\] with no NaN; got min -0.1"):
        quantise_prob(np.array([-0.1, 0.5]))
    with pytest.raises(ValueError, match="no NaN; got min nan"):
        quantise_prob(np.array([np.nan, 0.5]))


@pytest.mark.parametrize("batch_bytes", [1, 100, 300, 10**9])
def test_iter_streams_in_storage_order(tmp_path: Path, batch_bytes: int) -> None:
    probs = _probs()
    _write(tmp_path / "s", probs)
    reader = ProbReader(tmp_path / "s")
    seen = list(reader.iter(batch_bytes=batch_bytes))
    assert [image_id for image_id, _ in seen] == list(probs)
    for image_id, q in seen:
        np.testing.assert_array_equal(q, reader.get(image_id))


def test_uint8_input_is_stored_as_is(tmp_path: Path) -> None:
    q = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    _write(tmp_path / "s", {"a": q})
    np.testing.assert_array_equal(ProbReader(tmp_path / "s").get("a"), q.transpose(2, 0, 1))


def test_unclosed_writer_leaves_no_readable_store(tmp_path: Path) -> None:
    writer = ProbWriter(tmp_path / "s", CLASSES)
    writer.add("a", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match=r"is missing meta\.json"):
        ProbReader(tmp_path / "s")
    writer.close()
    assert len(ProbReader(tmp_path / "s")) == 1
    assert not (tmp_path / "s.tmp").exists()


def test_exception_in_with_block_discards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ProbWriter(tmp_path / "s", CLASSES) as writer:
        writer.add("a", np.zeros((2, 2, 3), dtype=np.float32))
        raise RuntimeError("crash")
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.tmp").exists()


def test_stale_tmp_is_replaced_and_existing_store_protected(tmp_path: Path) -> None:
    (tmp_path / "s.tmp").mkdir()
    (tmp_path / "s.tmp" / "junk").write_text("x")
    _write(tmp_path / "s", {"a": np.zeros((2, 2, 3), dtype=np.float32)})
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        ProbWriter(tmp_path / "s", CLASSES)
    with ProbWriter(tmp_path / "s", CLASSES, overwrite=True) as writer:
        writer.add("b", np.ones((1, 1, 3), dtype=np.float32))
    assert ProbReader(tmp_path / "s").image_ids == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_writer_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="classes must be non-empty and unique"):
        ProbWriter(tmp_path / "x", ["a", "a"])
    writer = ProbWriter(tmp_path / "s", CLASSES)
    writer.add("a", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="image_id 'a' was already added"):
        writer.add("a", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"prob for 'b' must be \(H, W, 3\); got \(2, 2, 2\)"):
        writer.add("b", np.zeros((2, 2, 2), dtype=np.float32))
    writer.close()
    with pytest.raises(ValueError, match="is closed; cannot add 'c'"):
        writer.add("c", np.zeros((2, 2, 3), dtype=np.float32))


def test_empty_store(tmp_path: Path) -> None:
    _write(tmp_path / "s", {})
    reader = ProbReader(tmp_path / "s")
    assert len(reader) == 0 and list(reader.iter()) == []


def test_reader_errors_name_the_file(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _write(store, _probs())
    reader = ProbReader(store)
    with pytest.raises(KeyError, match="'nope' is not in prob store"):
        reader.get("nope")
    with pytest.raises(ValueError, match="batch_bytes must be >= 1"):
        list(reader.iter(batch_bytes=0))

    data = (store / "probs.u8").read_bytes()
    (store / "probs.u8").write_bytes(data[:-1])
    with pytest.raises(ValueError, match=r"probs.u8 must hold \d+ bytes as index.csv says; got"):
        ProbReader(store)
    (store / "probs.u8").write_bytes(data)

    index = pd.read_csv(store / "index.csv")
    bad = index.copy()
    bad.loc[2, "offset"] += 5
    bad.to_csv(store / "index.csv", index=False)
    with pytest.raises(ValueError, match=r"index.csv: row 2 \(image_id 'img0_2'\) must start at"):
        ProbReader(store)
    bad = pd.concat([index, index.iloc[[0]]])
    bad.to_csv(store / "index.csv", index=False)
    with pytest.raises(ValueError, match="image_id 'img0_0' appears more than once"):
        ProbReader(store)
    index.to_csv(store / "index.csv", index=False)

    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "layout": "HWC"}))
    with pytest.raises(ValueError, match=r"meta\.json: layout must be 'CHW'; got 'HWC'"):
        ProbReader(store)
    (store / "meta.json").write_text(json.dumps({**meta, "extra": 1}))
    with pytest.raises(ValueError, match=r"meta\.json must have keys"):
        ProbReader(store)
    (store / "meta.json").write_text("{")
    with pytest.raises(ValueError, match=r"meta\.json is not valid JSON"):
        ProbReader(store)
    with pytest.raises(FileNotFoundError, match=r"missing meta\.json"):
        ProbReader(tmp_path / "absent")


def test_multireader_and_merge(tmp_path: Path) -> None:
    fold0, fold1 = _probs(0), _probs(1)
    _write(tmp_path / "f0", fold0)
    _write(tmp_path / "f1", fold1)
    multi = MultiReader([tmp_path / "f0", tmp_path / "f1"])
    assert multi.image_ids == list(fold0) + list(fold1) and len(multi) == 10
    assert [image_id for image_id, _ in multi.iter(batch_bytes=50)] == multi.image_ids
    merge_stores([tmp_path / "f0", tmp_path / "f1"], tmp_path / "all")
    merged = ProbReader(tmp_path / "all")
    assert merged.image_ids == multi.image_ids
    for image_id in merged.image_ids:
        np.testing.assert_array_equal(merged.get(image_id), multi.get(image_id))
    with pytest.raises(KeyError, match="'x' is in none of the prob stores"):
        multi.get("x")


def test_multireader_errors(tmp_path: Path) -> None:
    _write(tmp_path / "f0", _probs(0))
    _write(tmp_path / "dup", _probs(0))
    with pytest.raises(ValueError, match="image_id 'img0_0' is in both"):
        MultiReader([tmp_path / "f0", tmp_path / "dup"])
    with ProbWriter(tmp_path / "other", ["a"]) as writer:
        writer.add("z", np.zeros((1, 1, 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"must have classes \['Fish'"):
        MultiReader([tmp_path / "f0", tmp_path / "other"])
    with pytest.raises(ValueError, match="at least one prob store"):
        MultiReader([])
