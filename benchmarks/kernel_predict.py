"""A kernel-style prediction script: what a Kaggle notebook does with trained folds.

Usage: ``python benchmarks/kernel_predict.py CONFIG OUT.csv``

For every test image (the sample submission's): read it with cv2, resize it to the
network's input, and for each fold and each flip run the Keras model on a batch of one
(``model.predict_on_batch``), flip back and average; threshold at 0.5, resize each
class to the submission size, RLE-encode and write the CSV with pandas. The fold's
weights are loaded into one model in turn, images outer, as such scripts do when the
folds fit in memory: one model per fold, built once. Only the network builder (the
same network as the pipeline's) and the RLE encoder are the pipeline's.

The last line printed is ``forward_s <seconds>``: the time inside the network calls.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.core.config import load_config
from pipeline.core.rle import encode
from pipeline.nn.engines import build_prediction_model
from pipeline.nn.weights import load_best_weights

FLIPS = {"identity": (), "hflip": (2,), "vflip": (1,), "hvflip": (1, 2)}


def main(config_path: str, out: str) -> None:
    config = load_config(config_path)
    sample = pd.read_csv(str(config.data.sample_submission))
    classes = ["Fish", "Flower", "Gravel", "Sugar"]
    images = sorted({label.rsplit("_", 1)[0] for label in sample["Image_Label"]})
    height, width = config.data.image_size
    out_h, out_w = config.data.submission_size or (350, 525)
    models = []
    for fold in range(config.folds.n_splits):
        model = build_prediction_model(config, len(classes))
        load_best_weights(model, config.fold_dir(fold) / "best_weights.h5")
        models.append(model)
    forward = 0.0
    rows = []
    for name in images:
        bgr = cv2.imread(str(Path(config.data.test_images) / name))
        assert bgr is not None, name
        image = bgr[:, :, ::-1]
        x = cv2.resize(image, (width, height)).astype(np.float32)[None]
        total = np.zeros((height, width, len(classes)), dtype=np.float32)
        for model in models:
            for axes in FLIPS.values():
                view = np.flip(x, axis=axes) if axes else x
                started = time.perf_counter()
                pred = model.predict_on_batch(view)
                forward += time.perf_counter() - started
                pred = np.asarray(pred[0] if isinstance(pred, list) else pred)
                total += (np.flip(pred, axis=axes) if axes else pred)[0]
        probs = total / (len(models) * len(FLIPS))
        for k, label in enumerate(classes):
            mask = (cv2.resize(probs[:, :, k], (out_w, out_h)) >= 0.5).astype(np.uint8)
            rows.append((f"{name}_{label}", encode(mask)))
    pd.DataFrame(rows, columns=["Image_Label", "EncodedPixels"]).to_csv(out, index=False)
    print(f"forward_s {forward:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
