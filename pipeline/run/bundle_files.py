"""The members of a bundle that are not networks (pure run layer): the TensorFlow-free
runner's own copy with its ``requirements.txt``, and the package versions.

``write_runner`` copies the foldseg modules that ``run.bundle_run`` imports (found in a
fresh interpreter, which also proves that none of them imports TensorFlow) into
``<bundle>/runner/``, with ``run_bundle.py``, an entry that puts that copy first on the
path, and the pinned ``requirements.txt`` of its third-party packages: the bundle then
runs where foldseg is not installed (an offline Kaggle notebook, docs/deploy.md).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pipeline
from pipeline.core.atomic import write_text
from pipeline.core.bundle import ONNX, OPENVINO, REQUIREMENTS

# The runner's third-party packages, beside its engine's.
RUNNER_PACKAGES = ("numpy", "opencv-python-headless", "pandas")
# The runtime each framework-free network format needs (a SavedModel: TensorFlow, which
# the runner's requirements leave out: it is the framework the bundle is free of).
ENGINE_PACKAGES = {OPENVINO: "openvino", ONNX: "onnxruntime"}
FRAMEWORK_MODULES = ("tensorflow", "keras", "tf_keras")
RUNNER_ENTRY = '''"""Run this bundle without foldseg or TensorFlow (docs/deploy.md):

    pip install -r runner/requirements.txt
    python runner/run_bundle.py --bundle . --images test_images --out submission.csv
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.run.bundle_run import main  # noqa: E402

sys.exit(main())
'''


def package_version(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def runner_modules() -> list[str]:
    """The foldseg modules the runner imports, as POSIX paths relative to the package's
    parent; RuntimeError when one of them imports TensorFlow or Keras."""
    code = (
        "import sys, pipeline.run.bundle_run\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORK_MODULES!r})\n"
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items()\n"
        "    if n.split('.')[0] == 'pipeline' and getattr(m, '__file__', None))))\n"
        "sys.exit(f'the runner imports {bad}' if bad else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the bundle runner cannot be copied: {done.stderr.strip()[-500:]}")
    root = Path(pipeline.__file__).resolve().parent.parent
    return sorted(Path(path).resolve().relative_to(root).as_posix() for path in done.stdout.split())


def write_runner(folder: Path, network_formats: Sequence[str]) -> None:
    """Write the runner's copy, entry and ``requirements.txt`` into ``folder``."""
    root = Path(pipeline.__file__).resolve().parent.parent
    for module in runner_modules():
        target = folder / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / module, target)
    write_text(folder / "run_bundle.py", RUNNER_ENTRY)
    engines = [ENGINE_PACKAGES[f] for f in network_formats if f in ENGINE_PACKAGES]
    packages = [*RUNNER_PACKAGES, *engines]
    lines = [f"{name}=={package_version(name)}" for name in packages]
    write_text(folder / REQUIREMENTS, "\n".join(lines) + "\n")
