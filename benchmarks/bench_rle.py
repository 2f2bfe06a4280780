"""RLE codec benchmark: encode/decode throughput and a Clouds-size submission round trip.

Usage: ``python benchmarks/bench_rle.py [--quick] [--no-record]``

Masks are 350x525 (the Clouds submission size) with a few boxes and ellipses covering
20-40% of the image, or empty. Every time is reported next to a reference measured in
the same run: a plain numpy copy of the same mask bytes. Each figure is the best of a
few repeats, the least disturbed by other processes on a shared machine. The last line
printed is one JSON object, which is also appended to ``benchmarks/results.jsonl``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, record
from pipeline.core import rle

HEIGHT, WIDTH = 350, 525
CLOUDS_MASKS = 14_792  # 3,698 test images x 4 classes


def make_mask(rng: np.random.Generator) -> np.ndarray:
    """A (350, 525) uint8 {0,1} mask of boxes and ellipses covering 20-40%."""
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    target = rng.uniform(0.2, 0.4)
    while mask.mean() < target:
        x, y = int(rng.integers(0, WIDTH)), int(rng.integers(0, HEIGHT))
        if rng.random() < 0.5:
            axes = (int(rng.integers(20, 160)), int(rng.integers(15, 110)))
            cv2.ellipse(mask, (x, y), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        else:
            mask[y : y + int(rng.integers(30, 200)), x : x + int(rng.integers(50, 300))] = 1
    return mask


def best_time(function: Callable[[], object], repeats: int) -> float:
    """Fastest of several runs, in seconds; the minimum is least disturbed by noise."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def round_trip(rles: list[str]) -> list[str]:
    """Decode every RLE at 350x525 and encode it again, one mask alive at a time."""
    return [rle.encode(rle.decode(text, (HEIGHT, WIDTH))) for text in rles]


def copy_masks(masks: list[np.ndarray], total: int) -> None:
    """The reference for the round trip: copy as many mask bytes, one at a time."""
    for index in range(total):
        masks[index % len(masks)].copy()


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/10 of the work, a smoke run")
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to benchmarks/results.jsonl"
    )
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    repeats = 2 if args.quick else 3
    rng = np.random.default_rng(12345)

    # A pool of distinct masks, one in eight empty; the submission reuses the pool
    # because 14,792 masks at once would take 2.7 GB.
    pool = [
        make_mask(rng) if index % 8 else np.zeros((HEIGHT, WIDTH), np.uint8)
        for index in range(400 // scale)
    ]
    pool_rles = [rle.encode(mask) for mask in pool]
    megapixels = len(pool) * HEIGHT * WIDTH / 1e6
    coverage = float(np.mean([mask.mean() for mask in pool if mask.any()]))
    runs_per_mask = float(np.mean([len(text.split()) // 2 for text in pool_rles]))

    # Results are dropped as they come, as a submission writer would: keeping them all
    # would measure fresh-memory page faults rather than the codec.
    copy_s = best_time(lambda: all(mask.copy() is not None for mask in pool), repeats)
    encode_s = best_time(lambda: [rle.encode(mask) for mask in pool], repeats)
    decode_s = best_time(
        lambda: all(rle.decode(t, (HEIGHT, WIDTH)) is not None for t in pool_rles), repeats
    )

    n_masks = CLOUDS_MASKS // scale
    # About half of a Clouds submission is empty after the classifier gate.
    submission = [
        pool_rles[int(rng.integers(len(pool)))] if rng.random() < 0.5 else ""
        for _ in range(n_masks)
    ]
    if round_trip(submission) != submission:
        raise AssertionError("round trip changed the submission")
    round_trip_s = best_time(lambda: round_trip(submission), repeats)
    copy_submission_s = best_time(lambda: copy_masks(pool, n_masks), repeats)

    result: dict[str, object] = {
        "benchmark": "rle",
        "machine": describe_machine(),
        "quick": args.quick,
        "mask_shape": [HEIGHT, WIDTH],
        "pool_masks": len(pool),
        "mean_coverage_nonempty": round(coverage, 3),
        "mean_runs_per_mask": round(runs_per_mask, 1),
        "copy_mpix_s": round(megapixels / copy_s, 1),
        "encode_mpix_s": round(megapixels / encode_s, 1),
        "decode_mpix_s": round(megapixels / decode_s, 1),
        "encode_vs_copy": round(encode_s / copy_s, 2),
        "decode_vs_copy": round(decode_s / copy_s, 2),
        "roundtrip_masks": n_masks,
        "roundtrip_14792_s": round(round_trip_s * scale, 3),
        "roundtrip_vs_copy": round(round_trip_s / copy_submission_s, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    print(f"masks: {len(pool)} distinct of {HEIGHT}x{WIDTH}, {coverage:.0%} mean coverage")
    print(f"  {runs_per_mask:.0f} runs per mask on average (empty ones included)")
    print(f"copy (reference) {megapixels / copy_s:>9.1f} Mpix/s")
    for name, seconds in (("encode", encode_s), ("decode", decode_s)):
        print(
            f"{name:<16} {megapixels / seconds:>9.1f} Mpix/s, "
            f"{seconds / copy_s:.1f}x the time of the copy"
        )
    scaled = "" if scale == 1 else f" (measured on {n_masks}, scaled x{scale})"
    print(
        f"decode + re-encode {CLOUDS_MASKS} masks, half empty: {round_trip_s * scale:.2f} s"
        f"{scaled}; {round_trip_s / copy_submission_s:.1f}x the time to copy as many masks"
    )
    print(f"load average (1 min) during the run: {result['load_average_1min']}")
    record(result, keep=not args.no_record)
    return result


if __name__ == "__main__":
    main()
