"""The layer rule, checked on the code's own imports (function-level imports included).

Layers, lowest first; a module may import modules of its own layer or lower ones, never a
higher one, and the imports between modules form no cycle (README, "Design"):

    0  errors                          one error base
    1  config, models.specs            the typed config; the plain-data model/weights catalogue
    2  storage                         URIs, leases
    3  cluster                         starting/joining Ray, CPU shares, stall watch
    4  data, engine                    catalog/decode/cache/pipelines/contract; pure-torch loops, precision
    5  analysis, models                metrics, calibration, drift, cues; networks, registry, wrappers
    6  checkpoint                      the checkpoint format and loader
    7  inference                       the one predictor, the ONNX Runtime model
    8  training                        Ray Train / Ray Tune wiring, progress
    9  apps                            jobs and workflows (evaluate, score, explain, export, ...)
    10 cli                             argparse and printing
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cxr_ray"

# The most specific prefix wins (models.specs sits below the rest of models: config checks it).
LAYERS = {
    "cxr_ray": 0, "cxr_ray.errors": 0,
    "cxr_ray.config": 1, "cxr_ray.models.specs": 1,
    "cxr_ray.storage": 2,
    "cxr_ray.cluster": 3,
    "cxr_ray.data": 4, "cxr_ray.engine": 4,
    "cxr_ray.analysis": 5, "cxr_ray.models": 5,
    "cxr_ray.checkpoint": 6,
    "cxr_ray.inference": 7,
    "cxr_ray.training": 8,
    "cxr_ray.apps": 9,
    "cxr_ray.cli": 10,
}
# function-level imports of cxr_ray modules allowed outside cli.py, each with its reason
_ACTOR_ONLY = ("the read + decode tasks import score.stages too; the model stack (torch models, sklearn, "
               "the ONNX export) loads only in the scoring actors' __init__")
DEFERRED_OK: dict[str, str] = {f"cxr_ray.apps.score.stages -> {t}": _ACTOR_ONLY for t in (
    "cxr_ray.analysis.metrics", "cxr_ray.apps.export", "cxr_ray.checkpoint", "cxr_ray.engine.loop",
    "cxr_ray.engine.precision", "cxr_ray.inference.onnx", "cxr_ray.inference.predictor")}
DEFERRED_OK["cxr_ray.apps.score.stages -> cxr_ray.data.device_decode"] = (
    "torch and torchvision: only the scoring actors decode on a device; the read tasks start without torch")
DEFERRED_OK["cxr_ray.apps.score.job -> cxr_ray.apps.export"] = "the ONNX exporter loads only when score uses it"


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The layer of ``module``: its most specific prefix in :data:`LAYERS`."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and README's design section)")


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE) -> list[tuple[str, int, bool]]:
    """``(imported cxr_ray module, line, at function level)`` for every import in ``path``."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                stem = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(stem + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("cxr_ray"):
                found.append((t, node.lineno, id(node) not in top))
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, list[tuple[str, int, bool]]]:
    """Every module of the package under ``root`` -> the cxr_ray modules it imports."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, modules, root) for f in files}


def find_cycle(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t, _, _ in graph.get(m, []):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def upward_arrows(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str]:
    """Imports from a lower layer to a higher one, as ``module:line -> module``."""
    return [f"{m}:{line} (layer {layer_of(m)}) -> {t} (layer {layer_of(t)})"
            for m, edges in graph.items() for t, line, _ in edges
            if not m.startswith("cxr_ray.__") and layer_of(t) > layer_of(m)]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    assert upward_arrows(import_graph()) == []


def test_every_module_has_a_layer():
    for m in import_graph():
        layer_of(m)


def test_function_level_imports_of_cxr_ray_have_a_stated_reason():
    """Outside cli.py (which imports each command's modules when the command runs, to start
    fast) a cxr_ray import inside a function hides an arrow; the few allowed say why."""
    deferred = [f"{m}:{line} -> {t}" for m, edges in import_graph().items() if m != "cxr_ray.cli"
                for t, line, inside in edges if inside and f"{m} -> {t}" not in DEFERRED_OK]
    assert deferred == []


@pytest.mark.parametrize("bad", ["cycle", "upward"])
def test_the_checks_fail_on_a_reintroduced_cycle_or_upward_arrow(tmp_path, bad):
    """The checks above can fail: a copy of the package with a cycle (checkpoint.format importing
    apps.tta, which imports the checkpoint package) or an upward arrow (config importing cli)."""
    import shutil

    copy = tmp_path / "cxr_ray"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    if bad == "cycle":
        f = copy / "checkpoint" / "format.py"
        f.write_text(f.read_text() + "\n\ndef _bad():\n    from cxr_ray.apps.tta import fit_tta_decisions\n")
        graph = import_graph(copy)
        cycle = find_cycle(graph)
        assert cycle is not None and "cxr_ray.checkpoint.format" in cycle
    else:
        f = copy / "config.py"
        f.write_text(f.read_text() + "\nfrom cxr_ray import cli  # noqa\n")
        assert any(a.startswith("cxr_ray.config:") and "cxr_ray.cli" in a for a in upward_arrows(import_graph(copy)))


def test_the_scoring_read_tasks_do_not_load_the_model_stack():
    """Ray Data's read + decode tasks import ``apps.score.stages`` (and so its package); the
    models, checkpoints and torchvision load only in the scoring actors and the driver."""
    import subprocess
    import sys

    code = ("import sys, cxr_ray.apps.score.stages; "
            "print(sorted(m for m in ('torchvision', 'cxr_ray.checkpoint', 'cxr_ray.models.backbones', "
            "'cxr_ray.apps.export', 'sklearn') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
