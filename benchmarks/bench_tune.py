"""Post-processing tuning benchmark: ``pipeline.tune`` on a Clouds-size out-of-fold set.

Usage: ``python benchmarks/bench_tune.py [--quick] [--workdir DIR] [--keep] [--no-record]``

Writes a fake experiment into a temporary directory: 5,546 training images x 4 classes
(the Clouds training set), truth as box-like RLE masks at 1400x2100 (about half of the
masks empty), out-of-fold probs at 350x525 in three fold stores (4.08 GB), classifier
out-of-fold probs and the image cache index. Then it measures, in this order:

- the reference: one plain sequential read of the three stores' ``probs.u8``;
- ``pipeline.tune.tune(config)`` in a fresh subprocess (the real code path, from the
  training CSV to ``postprocess.json``): its wall and CPU time, and its peak RSS
  (``VmHWM``) next to that of a subprocess that only imports the same modules;

each once with the page cache dropped (``/proc/sys/vm/drop_caches``, when writable)
and once warm. ``--quick`` uses a tenth of the images. The synthetic files are deleted
at the end unless ``--keep``. The last line printed is one JSON object, which is also
appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import describe_machine, record  # noqa: E402
from pipeline.core.config import DEFAULT_CONFIG, load_config  # noqa: E402
from pipeline.core.images import cache_path  # noqa: E402
from pipeline.core.layout import CLASSIFIER_STAGE  # noqa: E402
from pipeline.core.layout import FOLD_METRICS as SEGMENTATION_METRICS  # noqa: E402
from pipeline.core.layout import OOF as SEGMENTATION_OOF  # noqa: E402
from pipeline.core.layout import OOF_CLS as CLASSIFIER_OOF  # noqa: E402
from pipeline.core.probstore import DATA_FILE, ProbWriter  # noqa: E402
from pipeline.core.truth import decode_truth  # noqa: E402
from pipeline.run.experiment import open_experiment  # noqa: E402
from pipeline.run.json_files import write_json  # noqa: E402

CLASSES = ["Fish", "Flower", "Gravel", "Sugar"]
N_IMAGES = 5_546
ORIGINAL = (1400, 2100)
SIZE = (350, 525)
IMAGE_SIZE = (384, 576)
N_FOLDS = 3
READ_CHUNK = 64 * 2**20

# Run in a fresh interpreter: tune, then report its time, CPU time and peak RSS. The
# peak is VmHWM, reset by exec; ru_maxrss would carry the benchmark's own over the fork.
CHILD = """
import json, resource, sys, time
from pathlib import Path
from pipeline.core.config import load_config
from pipeline.tune import tune
config = load_config(sys.argv[1])
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
start, cpu_start = time.perf_counter(), cpu()
output = tune(config)
status = Path("/proc/self/status").read_text()
print(json.dumps({
    "tune_s": time.perf_counter() - start,
    "cpu_s": cpu() - cpu_start,
    "search_s": output.search_seconds,
    "peak_rss_gb": int(status.split("VmHWM:")[1].split()[0]) / 2**20,
    "score": output.result.score,
    "plain": output.result.plain_score,
    "no_gate": output.result.no_gate_score,
    "gates": {c: p.gate for c, p in output.result.params_by_class().items()},
}))
"""
BASELINE_CHILD = """
from pathlib import Path
import pipeline.core.config, pipeline.tune
status = Path("/proc/self/status").read_text()
print('{"peak_rss_gb": %f}' % (int(status.split("VmHWM:")[1].split()[0]) / 2**20))
"""


def box_rle(rng: np.random.Generator) -> str:
    """A Kaggle RLE of one or two boxes at ORIGINAL size, in disjoint column ranges."""
    height, width = ORIGINAL
    parts = []
    n_boxes = int(rng.integers(1, 3))
    span = width // n_boxes
    for b in range(n_boxes):
        c0 = b * span + int(rng.integers(0, span // 3))
        c1 = min(c0 + int(rng.integers(span // 4, span * 2 // 3)), (b + 1) * span)
        r0 = int(rng.integers(0, height // 2))
        r1 = min(r0 + int(rng.integers(height // 5, height // 2)), height)
        cols = np.arange(c0, c1, dtype=np.int64)
        pairs = np.empty((cols.size, 2), dtype=np.int64)
        pairs[:, 0] = cols * height + r0 + 1
        pairs[:, 1] = r1 - r0
        parts.append(pairs.ravel())
    return " ".join(map(str, np.concatenate(parts).tolist()))


def make_experiment(root: Path, n_images: int, seed: int = 12345) -> tuple[Path, list[Path]]:
    """Write the fake experiment; returns (config path, the stores' data files)."""
    rng = np.random.default_rng(seed)
    image_ids = [f"{i:07x}.jpg" for i in range(n_images)]
    rles = [[box_rle(rng) if rng.random() < 0.5 else "" for _ in CLASSES] for _ in image_ids]
    # The data set is the image folder: every image named in the CSV must be on disk.
    # Tuning never reads their pixels, so each is one small blank JPEG at the size the
    # cache index gives (the same bytes every time).
    train_images = root / "train_images"
    train_images.mkdir()
    blank = cv2.imencode(".jpg", np.zeros((*ORIGINAL, 3), np.uint8))[1].tobytes()
    for image_id in image_ids:
        (train_images / image_id).write_bytes(blank)
    train_csv = root / "train.csv"
    pd.DataFrame(
        {
            "Image_Label": [f"{i}_{c}" for i in image_ids for c in CLASSES],
            "EncodedPixels": [text for row in rles for text in row],
        }
    ).to_csv(train_csv, index=False)
    config_path = root / "bench.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "base": str(DEFAULT_CONFIG),
                "experiment": "bench_tune",
                "runs_dir": str(root / "runs"),
                "data": {
                    "train_csv": str(train_csv),
                    "train_images": str(train_images),
                    "image_size": list(IMAGE_SIZE),
                    "submission_size": list(SIZE),
                },
                "folds": {"n_splits": N_FOLDS},
            }
        )
    )
    config = load_config(config_path)
    exp = open_experiment(config)
    cache = cache_path(exp.cache_dir, "train", IMAGE_SIZE)
    cache.mkdir(parents=True)
    pd.DataFrame({"image_id": image_ids, "height": ORIGINAL[0], "width": ORIGINAL[1]}).to_csv(
        cache / "index.csv", index=False
    )
    rle_of = dict(zip(image_ids, rles, strict=True))
    noise = [rng.integers(-60, 60, size=(len(CLASSES), *SIZE), dtype=np.int16) for _ in range(8)]
    data_files = []
    for fold in range(N_FOLDS):
        val_ids = exp.members(fold)[1]
        fold_dir = config.fold_dir(fold)
        clf_rows = []
        with ProbWriter(fold_dir / SEGMENTATION_OOF, CLASSES) as writer:
            for image_id in val_ids:
                truth = decode_truth(rle_of[image_id], ORIGINAL, SIZE)
                present = truth.reshape(len(CLASSES), -1).any(axis=1)
                # Confident inside the truth, a false-positive blob on some empty classes.
                level = np.where(truth, rng.integers(120, 230), 40).astype(np.int16)
                for c in np.flatnonzero(~present & (rng.random(len(CLASSES)) < 0.4)):
                    r, w = int(rng.integers(0, SIZE[0] - 100)), int(rng.integers(0, SIZE[1] - 150))
                    level[c, r : r + 100, w : w + 150] = int(rng.integers(100, 200))
                q = np.clip(level + noise[int(rng.integers(len(noise)))], 0, 255).astype(np.uint8)
                writer.add(image_id, q.transpose(1, 2, 0))
                clf = np.clip(present * 0.6 + 0.2 + rng.normal(0, 0.2, len(CLASSES)), 0, 1)
                clf_rows.append([image_id, *clf.round(4).tolist()])
        write_json(fold_dir / SEGMENTATION_METRICS, {"fold": fold, "synthetic": True})
        clf_path = config.fold_dir(fold, CLASSIFIER_STAGE) / CLASSIFIER_OOF
        clf_path.parent.mkdir(parents=True)
        pd.DataFrame(clf_rows, columns=["image_id", *CLASSES]).to_csv(clf_path, index=False)
        data_files.append(fold_dir / SEGMENTATION_OOF / DATA_FILE)
    return config_path, data_files


def drop_caches() -> bool:
    """Flush and drop the page cache; False where that is not allowed (not root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def read_files(paths: list[Path]) -> float:
    """Seconds for one plain sequential read of ``paths`` in 64 MB chunks."""
    buffer = bytearray(READ_CHUNK)
    start = time.perf_counter()
    for path in paths:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def run_child(code: str, *args: str) -> tuple[dict[str, Any], float]:
    """Run Python ``code`` in a fresh interpreter: (its last stdout line as JSON, wall s)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"child exited with {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the images")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files")
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/results.jsonl"
    )
    args = parser.parse_args(argv)
    n_images = N_IMAGES // 10 if args.quick else N_IMAGES
    oof_bytes = n_images * len(CLASSES) * SIZE[0] * SIZE[1]
    parent = Path(args.workdir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 1.5 * oof_bytes:
        raise SystemExit(
            f"need {1.5 * oof_bytes / 1e9:.1f} GB free in {parent}; got {free / 1e9:.1f}"
        )
    root = Path(tempfile.mkdtemp(prefix="bench_tune_", dir=parent))
    try:
        start = time.perf_counter()
        config_path, data_files = make_experiment(root, n_images)
        make_s = time.perf_counter() - start
        oof_gb = sum(path.stat().st_size for path in data_files) / 1e9
        csv_mb = (root / "train.csv").stat().st_size / 1e6
        print(
            f"wrote {n_images} images x {len(CLASSES)} classes at {SIZE[0]}x{SIZE[1]}: "
            f"{oof_gb:.2f} GB of OOF probs, a {csv_mb:.0f} MB train.csv, in {make_s:.0f} s "
            f"({root})"
        )

        baseline, _ = run_child(BASELINE_CHILD)
        dropped = drop_caches()
        read_cold_s = read_files(data_files)
        read_warm_s = read_files(data_files)
        drop_caches()
        cold, tune_cold_wall = run_child(CHILD, str(config_path))
        warm, _ = run_child(CHILD, str(config_path))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    peak_rss = max(float(cold["peak_rss_gb"]), float(warm["peak_rss_gb"]))
    baseline_rss = float(baseline["peak_rss_gb"])
    result: dict[str, object] = {
        "benchmark": "tune",
        "machine": describe_machine(),
        "quick": args.quick,
        "n_images": n_images,
        "classes": len(CLASSES),
        "size": list(SIZE),
        "original_size": list(ORIGINAL),
        "oof_gb": round(oof_gb, 3),
        "train_csv_mb": round(csv_mb, 1),
        "caches_dropped": dropped,
        "read_s": round(read_cold_s, 2),
        "read_warm_s": round(read_warm_s, 2),
        "tune_s": round(cold["tune_s"], 2),
        "tune_warm_s": round(warm["tune_s"], 2),
        "tune_vs_read": round(cold["tune_s"] / read_cold_s, 2),
        "tune_vs_read_warm": round(warm["tune_s"] / read_warm_s, 2),
        "tune_cpu_s": round(cold["cpu_s"], 2),
        # Load-independent: the tuner's CPU time against the cold read's wall time.
        "tune_cpu_vs_read": round(cold["cpu_s"] / read_cold_s, 2),
        "tune_cpu_warm_s": round(warm["cpu_s"], 2),
        "search_s": round(cold["search_s"], 2),
        "search_warm_s": round(warm["search_s"], 2),
        "search_ms_per_image": round(1e3 * warm["search_s"] / n_images, 2),
        "search_vs_read": round(cold["search_s"] / read_cold_s, 2),
        "process_wall_s": round(tune_cold_wall, 2),
        "peak_rss_gb": round(peak_rss, 3),
        "baseline_rss_gb": round(baseline_rss, 3),
        "peak_rss_delta_gb": round(peak_rss - baseline_rss, 3),
        "score_plain": round(cold["plain"], 4),
        "score_no_gate": round(cold["no_gate"], 4),
        "score_tuned": round(cold["score"], 4),
        "gates_won": cold["gates"],
        "load_average_1min": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    cache_note = "page cache dropped" if dropped else "page cache NOT dropped (not root)"
    print(
        f"plain read of the stores: {read_cold_s:.2f} s cold ({cache_note}), "
        f"{read_warm_s:.2f} s warm ({oof_gb / read_warm_s:.2f} GB/s)"
    )
    print(
        f"tune: {cold['tune_s']:.2f} s cold, {warm['tune_s']:.2f} s warm; "
        f"{result['tune_vs_read']}x the cold read, {result['tune_vs_read_warm']}x the warm read"
    )
    print(
        f"  of which the streaming pass: {cold['search_s']:.2f} s cold, {warm['search_s']:.2f} s "
        f"warm ({result['search_ms_per_image']} ms per image), the rest reading the training "
        "CSV, the split and writing the results"
    )
    print(
        f"  CPU time of the tuning process: {cold['cpu_s']:.2f} s cold, {warm['cpu_s']:.2f} s warm "
        f"(wall/CPU shows how much other processes took; load average below)"
    )
    print(
        f"peak RSS of the tuning process: {peak_rss:.3f} GB "
        f"({peak_rss - baseline_rss:.3f} GB over the {baseline_rss:.3f} GB of its imports)"
    )
    print(
        f"OOF Kaggle Dice: plain 0.5 {cold['plain']:.4f}, thr+area {cold['no_gate']:.4f}, "
        f"with gate {cold['score']:.4f}; gates won {cold['gates']}"
    )
    print(f"load average (1 min) during the run: {result['load_average_1min']}")
    record(result, keep=not args.no_record)
    return result


if __name__ == "__main__":
    main()
