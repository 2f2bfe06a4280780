"""The pure layer must never import TensorFlow (checked in a fresh interpreter)."""

import subprocess
import sys

PURE = [
    "config",
    "rle",
    "formats",
    "images",
    "folds",
    "metrics",
    "tta",
    "postprocess",
    "submission",
    "probstore",
    "threshold_search",
    "masks",
    "curves",
    "make_demo_data",
    "sample_order",
    "run_lock",
    "experiment",
]


def test_pure_modules_do_not_import_tensorflow():
    code = (
        "import importlib, importlib.util, sys\n"
        f"for name in {PURE!r}:\n"
        "    if importlib.util.find_spec('pipeline.' + name) is not None:\n"
        "        importlib.import_module('pipeline.' + name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tf_keras', 'keras', 'segmentation_models'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure layer imported: {out.stdout.strip()}"
