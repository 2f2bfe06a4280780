"""The layering rules, checked on the package tree itself (no hand-kept lists).

- ``pipeline.core`` and ``pipeline.run`` never import TensorFlow (in a fresh interpreter);
- a layer imports only layers below it: core < run < nn < stages;
- no stage imports another stage's module (``workflow``, the one composition of every
  stage, and ``demo``, its earlier name, are the exceptions);
- no module imports a module that imports it, directly or through others (no circles);
- only the named doors (``DOORS``) import a framework: ``nn.keras_backend`` for the Keras
  layer, ``run.savedmodel_engine`` for an exported SavedModel (lazily, so the bundle
  runner stays framework-free for OpenVINO and ONNX bundles).
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pipeline

PACKAGE = Path(pipeline.__file__).parent
LAYERS = ("core", "run", "nn")
RANK = {"core": 0, "run": 1, "nn": 2, "stage": 3}
COMPOSITION = {"workflow", "demo"}
FRAMEWORKS = ("tensorflow", "keras", "tf_keras", "segmentation_models", "segmodels_keras")
# The modules that may import a framework, each the one door of its room.
DOORS = {"pipeline.nn.keras_backend", "pipeline.run.savedmodel_engine"}


def modules_of(layer: str) -> list[str]:
    return sorted(
        f"pipeline.{layer}.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / layer)])
    )


def stages() -> list[str]:
    return sorted(
        m.name for m in pkgutil.iter_modules([str(PACKAGE)]) if m.name not in (*LAYERS, "configs")
    )


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "stage"


def imports_of(path: Path) -> set[str]:
    """Every ``pipeline`` module a file imports (at any depth, TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            if node.module in ("pipeline", *(f"pipeline.{layer}" for layer in LAYERS)):
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline."))
    return found


def all_modules() -> dict[str, Path]:
    out = {f"pipeline.{name}": PACKAGE / f"{name}.py" for name in stages()}
    for layer in LAYERS:
        for module in modules_of(layer):
            out[module] = PACKAGE / layer / f"{module.rsplit('.', 1)[1]}.py"
    return out


def test_the_tree_has_the_layers_and_the_stages():
    assert all((PACKAGE / layer / "__init__.py").is_file() for layer in LAYERS)
    assert {"train", "train_classifier", "predict", "tune", "evaluate"} <= set(stages())
    assert len(modules_of("core")) >= 10


def test_pure_layers_do_not_import_tensorflow():
    pure = modules_of("core") + modules_of("run")
    code = (
        "import importlib, sys\n"
        f"for name in {pure!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tf_keras', 'keras', 'segmentation_models'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"pure layer imported: {out.stdout.strip()}"


def frameworks_imported(path: Path) -> set[str]:
    """The frameworks a file imports (at any depth, inside functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in FRAMEWORKS)
    return found


def test_frameworks_are_imported_only_through_the_named_doors():
    assert {"tensorflow", "keras"} <= frameworks_imported(PACKAGE / "nn" / "keras_backend.py")
    assert frameworks_imported(PACKAGE / "run" / "savedmodel_engine.py") == {"tensorflow"}
    through_other_doors = sorted(
        f"{module} imports {sorted(found)}"
        for module, path in all_modules().items()
        if module not in DOORS and (found := frameworks_imported(path))
    )
    assert through_other_doors == []


def test_layers_depend_downward_only():
    upward = []
    for module, path in all_modules().items():
        for target in imports_of(path):
            if RANK[layer_of(target)] > RANK[layer_of(module)]:
                upward.append(f"{module} imports {target}")
    assert upward == []


def test_no_stage_imports_another_stage():
    crossing = []
    for module, path in all_modules().items():
        if layer_of(module) != "stage" or module.split(".")[1] in COMPOSITION:
            continue
        crossing += [
            f"{module} imports {t}"
            for t in imports_of(path)
            if layer_of(t) == "stage" and t != module
        ]
    assert crossing == []


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of an import graph: its strongly connected components of more than one
    module, and modules that import themselves (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_import_circles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_circles(graph) == [["a", "b", "c"], ["e"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it():
    modules = all_modules()
    graph = {
        module: {target for target in imports_of(path) if target in modules}
        for module, path in modules.items()
    }
    assert import_circles(graph) == []
