"""The code's shape stays as designed: short functions, a docstring at the top of every module,
and imports that flow one way (kernels <- model <- attacks <- training / evaluation <- CLI)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastmoe_adv"
MAX_FUNCTION_LINES = 80

# Layer of each module (by its first path component inside the package); a module may import
# only from its own layer or lower ones.
LAYERS = {
    "constants": 0, "errors": 0, "reporting": 0, "kernels": 0,
    "checks": 1, "resnet": 1, "gate": 1, "grouped": 1, "autotune": 1, "moe": 1, "fold": 1, "distributed": 1,
    "checkpoint": 1, "data": 1, "graphs": 1,
    "attacks": 2, "apgd": 2, "square": 2, "presets": 2,
    "evaluate": 3, "plots": 3,
    "train": 4, "recipes": 4,
    "experiments": 5, "demo": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _first_component(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imported(path: Path, tree) -> set:
    """First package components this module imports from (relative and absolute imports)."""
    rel_parts = path.relative_to(PACKAGE).parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(rel_parts[:-1])[: len(rel_parts) - node.level]
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif node.module and node.module.startswith("fastmoe_adv."):
                names = [node.module.split(".")[1]]
            elif node.module == "fastmoe_adv":
                names = [a.name for a in node.names]
            else:
                continue
            out.update(names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fastmoe_adv."))
    return out


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_module_says_what_it_is_for():
    missing = [str(p.relative_to(ROOT)) for p in _modules()
               if p.name != "__main__.py" and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    me = _first_component(path)
    assert me in LAYERS, f"{me}: add the new module to LAYERS in this test"
    upward = sorted(m for m in _imported(path, ast.parse(path.read_text()))
                    if m in LAYERS and m != me and LAYERS[m] > LAYERS[me])
    assert not upward, f"{path.relative_to(ROOT)} (layer {LAYERS[me]}) imports from higher layers: {upward}"


def test_kernels_import_nothing_of_the_package_above_them():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        tree = ast.parse(path.read_text())
        bad = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and ((isinstance(n, ast.ImportFrom) and (n.level > 1 or (n.module or "").startswith("fastmoe_adv")))
                    or (isinstance(n, ast.Import) and any(a.name.startswith("fastmoe_adv") for a in n.names)))]
        assert not bad, f"{path.name}: {bad}"


def test_the_layer_check_catches_an_upward_import(tmp_path):
    tree = ast.parse("from ..train import TrainConfig\nfrom .. import cli\nfrom . import common\n")
    assert _imported(PACKAGE / "evaluate" / "x.py", tree) == {"train", "cli", "evaluate"}


def test_the_fused_mix_limits_have_one_value():
    import importlib

    from fastmoe_adv import constants
    gated_mix = importlib.import_module("fastmoe_adv.kernels.gated_mix")
    assert (constants.MAX_EXPERTS, constants.MAX_CLASSES) == (gated_mix.MAX_EXPERTS, gated_mix.MAX_CLASSES)
