"""Both notebooks execute top to bottom on a tiny faked run, stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pipeline import tune
from pipeline.core.config import load_config
from tests.conftest import REPO
from tests.integration.test_evaluate import make_fake_run

pytestmark = pytest.mark.slow

NOTEBOOKS = REPO / "notebooks"
NAMES = ["01_explore_data.ipynb", "02_inspect_results.ipynb"]


@pytest.fixture
def python3_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the ``python3`` kernel at this interpreter, whatever kernels are installed."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (tests)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))


def with_parameters(path: Path, config: Path) -> nbformat.NotebookNode:
    """The notebook with its ``parameters`` cell pointed at ``config``."""
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} must have exactly one cell tagged 'parameters'"
    assert (
        'CONFIG = "configs/demo.yaml"' in tagged[0].source and "OVERRIDES = []" in tagged[0].source
    )
    tagged[0].source = f"CONFIG = {str(config)!r}\nOVERRIDES = []"
    return nb


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebooks_run_on_a_tiny_run(tmp_path, tiny_data, python3_kernel):
    config = make_fake_run(tmp_path, tiny_data)
    tune.tune(load_config(config, []))
    for name in NAMES:
        nb = with_parameters(NOTEBOOKS / name, config)
        client = NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        client.execute()  # raises CellExecutionError, naming the cell, if one fails
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"]
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) >= 3, f"{name} drew {len(images)} figures"
    # The results notebook made the report it loads.
    assert (tmp_path / "runs" / "tiny" / "report" / "metrics.json").is_file()
