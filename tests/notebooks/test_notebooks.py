"""Every notebook in notebooks/ executes headless, top to bottom, in a fresh kernel.

A notebook states its key claim in an `assert` cell, so a silently wrong result fails here. It
runs with a temporary folder as its working directory and must write nothing elsewhere. The
notebooks are kept in git with their outputs stripped; `test_outputs_stripped` checks that.
"""

from __future__ import annotations

import pathlib
import time

import nbclient
import nbformat
import pytest

from tests.devices import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # a generous ceiling for a loaded CI machine; they take well under a minute


def test_notebooks_exist():
  assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_outputs_stripped(path: pathlib.Path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: code cell {i} has outputs; strip them before committing "
          "(jupyter nbconvert --clear-output --inplace)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: pathlib.Path, tmp_path: pathlib.Path):
  nb = nbformat.read(path, as_version=4)
  before = _tree_snapshot(ROOT / "notebooks")
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  start = time.time()
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as error:
    pytest.fail(f"{path.name} failed:\n{error}")
  print(f"{path.name}: executed in {time.time() - start:.1f} s")
  asserts = [c for c in nb.cells if c.cell_type == "code" and "assert " in c.source]
  assert asserts, f"{path.name} has no cell asserting its claim"
  assert _tree_snapshot(ROOT / "notebooks") == before, f"{path.name} wrote into notebooks/"


def _tree_snapshot(folder: pathlib.Path) -> set[str]:
  return {str(p.relative_to(folder)) for p in folder.rglob("*")}
