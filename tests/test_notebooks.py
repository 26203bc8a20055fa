"""The notebooks: every code cell compiles; the corpus notebook runs top to bottom."""

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"explore_corpus.ipynb", "explore_samples.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_compile(path):
    notebook = nbformat.read(path, as_version=4)
    code = [c.source for c in notebook.cells if c.cell_type == "code"]
    assert code
    for i, source in enumerate(code):
        compile(source, f"{path.name}[cell {i}]", "exec")


@pytest.mark.slow
def test_corpus_notebook_executes(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    path = next(p for p in NOTEBOOKS if p.name == "explore_corpus.ipynb")
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "corpus"))
    monkeypatch.setenv("CORPUS_NUM_TRAIN", "8")
    monkeypatch.setenv("PYTHONPATH", str(path.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
