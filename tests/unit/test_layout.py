"""Every path of a run is defined once, in ``pipeline.core.layout``."""

import ast
from pathlib import Path

import pipeline
from pipeline.core import layout

PACKAGE = Path(pipeline.__file__).parent
NAMES = {
    value
    for key, value in vars(layout).items()
    if key.isupper() and isinstance(value, str) and value
}
FILE_NAMES = {name for name in NAMES if "." in name}  # best_weights.h5, .lock, ...
DIR_NAMES = NAMES - FILE_NAMES  # oof, checkpoint, classifier, report, ...


def literals_outside_layout(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == Path(layout.__file__):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and node.value in FILE_NAMES
            ):
                found.append(f"{where}:{node.lineno} {node.value!r}")
            # A directory name used as a path part: `something / "oof"`.
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and isinstance(node.right, ast.Constant)
                and node.right.value in DIR_NAMES
            ):
                found.append(f"{where}:{node.lineno} / {node.right.value!r}")
            # A fold directory built by hand: `run_dir / f"fold_{k}"`.
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and isinstance(node.right, ast.JoinedStr)
            ):
                parts = node.right.values
                text = "".join(v.value for v in parts if isinstance(v, ast.Constant))
                if text.startswith(layout.FOLD_PREFIX):
                    found.append(f"{where}:{node.lineno} / f{text!r}...")
    return found


def test_no_artifact_name_is_written_outside_layout():
    assert literals_outside_layout() == []


def test_the_check_finds_a_literal(tmp_path):
    (tmp_path / "stage.py").write_text(
        '"""Writes metrics.json."""\nPATH = "metrics.json"\nDIR = lambda d: d / "oof"\n'
        'FOLD = lambda d, k: d / f"fold_{k}"\nCOLUMN = lambda k: f"fold_{k}"\n'
    )
    found = literals_outside_layout(tmp_path)
    assert (
        len(found) == 3
        and any("fold_" in f for f in found)
        and any("'metrics.json'" in f for f in found)
        and any("'oof'" in f for f in found)
    )


def test_fold_dir_is_the_layout_one():
    assert layout.fold_dir(Path("r"), 2) == Path("r/fold_2")
    assert layout.fold_dir(Path("r"), 0, layout.CLASSIFIER_STAGE) == Path("r/classifier/fold_0")
