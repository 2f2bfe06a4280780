"""A regular (non-editable) install carries the configs: default.yaml loads from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_installed_package_loads_its_bundled_configs(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pipeline", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert sorted(p.name for p in (target / "pipeline" / "configs").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "configs").glob("*.yaml")
    )
    code = (
        "from pipeline.core.config import CONFIG_DIR, DEFAULT_CONFIG, load_config\n"
        "import pipeline\n"
        "assert CONFIG_DIR.parent == __import__('pathlib').Path(pipeline.__file__).parent\n"
        "print(load_config(DEFAULT_CONFIG).model.backbone, "
        "load_config(CONFIG_DIR / 'demo.yaml').experiment)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["efficientnetb2", "demo"]
    assert list(target.glob("foldseg-*.dist-info/licenses/LICENSE"))  # setup.cfg license_files
