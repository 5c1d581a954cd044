"""The package is a stack: each module imports only from its own layer or the layers below it.

LAYERS lists the layers bottom first. The package root (``minivit/__init__.py``) gathers the public names and
is exempt.
"""

import ast
import pathlib

import pytest

import minivit

LAYERS = [
    ["devices", "parallel", "allocator", "rng", "kernels"],          # arrays and devices, threads, memory, seeds
    ["tensor", "function", "autograd", "ops"],                       # the engine: tensors, ops, the graph walk
    ["functional", "composed", "gradcheck", "profile", "gan", "amp"],  # what users call on the engine
    ["nn", "optim"],                                                 # layers, models, optimizers
    ["checkpoint", "rundir", "data", "viz", "trace", "testing", "art", "gan_metrics",   # tools around models
     "distributed"],
    ["train", "vae_train", "gan_train", "painters", "cli", "__main__", "launch"],   # the applications
    ["lessons"],                                                     # the lessons' checks (lessons/exercises.py)
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}
ROOT = pathlib.Path(minivit.__file__).parent


def _top(module_name):
    """'minivit.ops.norm' -> 'ops'."""
    return module_name.split(".")[1]


def _imports(path):
    """The minivit modules a file imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minivit"):
            names = [f"minivit.{a.name}" for a in node.names] if node.module == "minivit" else [node.module]
            found |= {n for n in names if n.count(".") >= 1}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("minivit.")}
    return {_top(n) for n in found}


MODULES = sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py")


def _own_layer(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return parts[0]


def test_every_module_has_a_layer():
    missing = sorted({_own_layer(p) for p in MODULES} - set(LEVEL))
    assert not missing, f"modules with no layer in tests/test_layers.py: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_from_a_higher_layer(path):
    own = _own_layer(path)
    upward = sorted(name for name in _imports(path) if LEVEL.get(name, -1) > LEVEL[own])
    assert not upward, (f"{path.relative_to(ROOT)} (layer {LEVEL[own]}: {own}) imports from higher layers: "
                        + ", ".join(f"{n} (layer {LEVEL[n]})" for n in upward))


def test_the_check_itself_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from minivit.nn import Module\n    from minivit import train\n")
    assert _imports(bad) == {"nn", "train"}
