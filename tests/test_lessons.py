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
    nb = execute(nbformat.read(path, as_version=4), tmp_path, strict=False)
    text = outputs_text(nb)
    assert "[NOT ATTEMPTED]" in text
    assert "[FAILED]" not in text
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
