"""Every lesson notebook runs top to bottom, as shipped (exercises not attempted) and with the shipped solutions
(checks in strict mode, so a solution that does not pass fails the run). MINIVIT_FAST=1 shrinks data and steps."""

import ast
import os
import pathlib

import nbformat
import pytest

LESSONS = pathlib.Path(__file__).resolve().parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def exercise_name(cell):
    first = cell.source.splitlines()[0] if cell.source else ""
    return first.split(":", 1)[1].strip() if first.startswith("# EXERCISE:") else None


def solution_source(notebook_path, name):
    """The solution function `name` from lessons/solutions/<lesson>.py, with that file's imports."""
    path = LESSONS / "solutions" / (notebook_path.stem + ".py")
    text = path.read_text()
    tree = ast.parse(text)
    imports = [ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return "\n".join(imports + ["", ast.get_source_segment(text, node)])
    raise AssertionError(f"{path.name} has no solution for exercise {name!r}")


def execute(nb, workdir, strict):
    from nbclient import NotebookClient
    env = {"MINIVIT_FAST": "1", "TQDM_DISABLE": "1", "MINIVIT_STRICT_CHECKS": "1" if strict else "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


LEAK_CHECK = """
import inspect as _inspect
import numpy as _np
from minivit import Tensor as _Tensor


def _arrays_in_namespace(namespace):
    found = []
    for key, value in list(namespace.items()):
        if key.startswith("_"):
            continue
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, _Tensor):
                found += [_np.asarray(item.data)] + ([_np.asarray(item.grad)] if item.grad is not None else [])
            elif isinstance(item, _np.ndarray) and item.dtype.kind == "f":
                found.append(item)
    return found


_namespace = dict(globals())                 # a solution may use the lesson's own helpers (lesson 16's forward)
exec({source!r}, _namespace)
_solution = _namespace[{name!r}]
_params = list(_inspect.signature(_solution).parameters)
if all(p in globals() for p in _params):
    _inputs = [globals()[p] for p in _params]
    _answer = _solution(*_inputs)
    _answer = list(_answer.values()) if isinstance(_answer, dict) else \
        list(_answer) if isinstance(_answer, tuple) else [_answer]
    _answer = [_np.asarray(a) for a in _answer]

    def _same(a, b):
        return _np.shape(a) == _np.shape(b) and _np.allclose(a, b)
    # an answer equal to one of its own inputs (dm = dy in lesson 16) gives nothing away
    _leaks = [i for i, a in enumerate(_answer) if a.size > 1 and a.dtype.kind == "f"
              and not any(_same(a, x) for x in _inputs if isinstance(x, _np.ndarray))
              for b in _arrays_in_namespace(globals()) if _same(a, b)]
    print("LEAKCHECK {name}:", f"LEAK in output {{sorted(set(_leaks))}}" if _leaks else "clean")
else:
    print("LEAKCHECK {name}: not callable from the lesson's variables")
"""

# Exercises whose arguments are named like variables of their lesson, so that the leak check really runs:
# the solution applied to the lesson's own data must give numbers that no variable of the lesson holds.
LEAK_CHECKED = {"06_layer_norm": {"rms_norm_backward"}, "09_attention": {"causal_attention_backward"},
                "10_multi_head_block": {"split_heads"}, "13_looking_inside": {"attention_rollout"},
                "16_backprop_ninja": {"block_backward"}, "23_vae": {"gaussian_kl"},
                "24_style_transfer": {"gram_backward"}, "25_reading_paintings": {"stitch_tiles"}}


def add_leak_checks(nb, path):
    """After each exercise's check, a cell that runs the solution on the lesson's variables of the same names and
    reports whether any variable defined so far already holds its answer."""
    names = [exercise_name(c) for c in nb.cells if c.cell_type == "code" and exercise_name(c)]
    for name in names:
        at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f"check_{name}(" in c.source)
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(LEAK_CHECK.format(source=solution_source(path, name),
                                                                            name=name)))
    return nb


def outputs_text(nb):
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_there_are_at_least_14_lessons_each_with_exercises_and_solutions():
    assert len(NOTEBOOKS) >= 14
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        names = [exercise_name(c) for c in nb.cells if c.cell_type == "code" and exercise_name(c)]
        assert names, f"{path.name} has no exercise"
        for name in names:
            assert f"check_{name}" in "".join(c.source for c in nb.cells), f"{path.name}: {name} is never checked"
            solution_source(path, name)


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


def images(nb):
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs_unsolved(path, tmp_path):
    nb = execute(add_leak_checks(nbformat.read(path, as_version=4), path), tmp_path, strict=False)
    text = outputs_text(nb)
    assert "[NOT ATTEMPTED]" in text
    assert "[FAILED]" not in text
    assert "LEAK in" not in text, f"{path.name}: a variable of the lesson holds an exercise's answer:\n" + "\n".join(
        line for line in text.splitlines() if line.startswith("LEAKCHECK"))
    for name in LEAK_CHECKED.get(path.stem, ()):
        assert f"LEAKCHECK {name}: clean" in text, f"{path.name}: the leak check of {name} did not run"
    figures = sum(c.source.count("viz.") + c.source.count(".plot(") for c in nb.cells if c.cell_type == "code")
    if figures:
        assert images(nb) > 0, f"{path.name} draws figures but none was shown as an image"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lesson_runs_with_the_solutions(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        name = cell.cell_type == "code" and exercise_name(cell)
        if name:
            cell.source = f"# EXERCISE: {name}\n" + solution_source(path, name)
    text = outputs_text(execute(nb, tmp_path, strict=True))
    assert "[PASSED]" in text and "[NOT ATTEMPTED]" not in text


def test_the_leak_check_finds_an_answer_computed_in_the_lesson(tmp_path):
    """A lesson that works out exactly what its exercise asks for is caught."""
    nb = nbformat.read(LESSONS / "09_attention.ipynb", as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith("# EXERCISE:"))
    nb.cells.insert(at, nbformat.v4.new_code_cell(
        "worked = causal_attention_backward_by_hand = None\n"
        "s = np.where(np.tril(np.ones((3, 3), dtype=bool)), q @ k.T / math.sqrt(2), -np.inf)\n"
        "pc = np.exp(s - s.max(1, keepdims=True)); pc /= pc.sum(1, keepdims=True)\n"
        "dv_causal = pc.T @ dy"))
    nb.cells = nb.cells[:at + 3]                              # up to the exercise's check
    text = outputs_text(execute(add_leak_checks(nb, LESSONS / "09_attention.ipynb"), tmp_path, strict=False))
    assert "LEAKCHECK causal_attention_backward: LEAK in output [2]" in text
