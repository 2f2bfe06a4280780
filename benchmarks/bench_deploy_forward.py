"""Forward time per image of one fold: TensorFlow batch 1 per view (a kernel), TensorFlow
with the views batched (``pipeline.predict``), OpenVINO and onnxruntime (the bundle's
engines).

Usage: ``python benchmarks/bench_deploy_forward.py --config C [--ir fold0.xml]
[--onnx fold0.onnx] [--random-weights] [--n N]``

``C`` is a config whose fold 0 has ``best_weights.h5`` (``bench_deploy.py`` writes one:
``/tmp/bench_deploy/bench_deploy.yaml``; ``--random-weights`` writes random ones when
there are none: the forward time does not depend on the values). ``fold0.xml`` and
``fold0.onnx`` are that fold as OpenVINO IR and ONNX (``pipeline.export`` writes them);
without them the fold is converted here (``nn.export.converted_folds``, cached under the
run). The same ``N`` random images of the config's input size go through each, 4 flip
views per image, after one warm-up image; the order is reversed in the second of two
rounds so that a change in the machine's load favours none. Precision:
``predict.precision: auto`` for OpenVINO and the batched TensorFlow (bfloat16 where the
CPU computes it natively), float32 for the kernel and onnxruntime.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, record
from pipeline.core.config import load_config
from pipeline.core.precision import choose_precision, cpu_flags
from pipeline.core.tta import stack_views
from pipeline.nn.devices import precision_policy
from pipeline.nn.engines import build_prediction_model
from pipeline.nn.export import converted_folds
from pipeline.nn.weights import load_best_weights, save_weights_atomic
from pipeline.run.runtime_engines import OnnxNetworks, OpenVinoNetworks

VIEWS = ["identity", "hflip", "vflip", "hvflip"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--ir", type=Path, help="fold 0 as OpenVINO IR (default: convert)")
    parser.add_argument("--onnx", type=Path, help="fold 0 as ONNX (default: convert)")
    parser.add_argument("--random-weights", action="store_true", help="when fold 0 has none")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    weights = config.fold_dir(0) / "best_weights.h5"
    precision = choose_precision("auto", cpu_flags())
    kernel_model = build_prediction_model(config, 4)
    if args.random_weights and not weights.is_file():
        save_weights_atomic(kernel_model, weights)
    load_best_weights(kernel_model, weights)
    cache = config.run_dir / "bench_deploy_forward"
    ir = args.ir or converted_folds(kernel_model, [weights], cache, network_format="openvino")[0]
    onnx = args.onnx or converted_folds(kernel_model, [weights], cache, network_format="onnx")[0]
    with precision_policy(precision):
        batched_model = build_prediction_model(config, 4)
    batched_model.set_weights(kernel_model.get_weights())
    engine = OpenVinoNetworks([ir], precision)
    onnx_engine = OnnxNetworks([onnx])
    height, width = (int(v) for v in config.data.image_size)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n + 1, height, width, 3), dtype=np.uint8)

    def kernel(image: np.ndarray) -> None:
        for view in VIEWS:
            kernel_model.predict_on_batch(stack_views(image[None], [view]).astype(np.float32))

    def batched(image: np.ndarray) -> None:
        batched_model.predict_on_batch(stack_views(image[None], VIEWS).astype(np.float32))

    def openvino(image: np.ndarray) -> None:
        engine.forward(stack_views(image[None], VIEWS).astype(np.float32))

    def onnxruntime(image: np.ndarray) -> None:
        onnx_engine.forward(stack_views(image[None], VIEWS).astype(np.float32))

    runs = {
        "tf_kernel_batch1": kernel,
        "tf_views_batched": batched,
        "openvino": openvino,
        "onnxruntime": onnxruntime,
    }
    for run in runs.values():
        run(images[0])  # warm-up: traces, compiles
    seconds = dict.fromkeys(runs, 0.0)
    order = list(runs)
    for round_ in range(2):
        names = order if round_ == 0 else order[::-1]
        half = images[1:][round_::2]
        for name in names:
            started = time.perf_counter()
            for image in half:
                runs[name](image)
            seconds[name] += time.perf_counter() - started
    per_image = {name: s / args.n for name, s in seconds.items()}
    figures: dict[str, Any] = {
        "benchmark": "deploy_forward",
        "machine": describe_machine(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "n_images": args.n,
        "views": len(VIEWS),
        "folds": 1,
        "image_size": [height, width],
        "backbone": config.model.backbone,
        "precision": precision,
        "forward_s_per_image_fold": {k: round(v, 4) for k, v in per_image.items()},
        "openvino_speedup_vs_kernel": round(
            per_image["tf_kernel_batch1"] / per_image["openvino"], 2
        ),
        "openvino_speedup_vs_batched": round(
            per_image["tf_views_batched"] / per_image["openvino"], 2
        ),
        "onnxruntime_speedup_vs_kernel": round(
            per_image["tf_kernel_batch1"] / per_image["onnxruntime"], 2
        ),
        "onnxruntime_speedup_vs_openvino": round(
            per_image["openvino"] / per_image["onnxruntime"], 2
        ),
    }
    print(figures)
    record(figures, keep=not args.no_record)
    return figures


if __name__ == "__main__":
    main()
