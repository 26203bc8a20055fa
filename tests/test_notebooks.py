"""The notebooks: stored without outputs, every code cell compiles, and each executes top to
bottom (slow suite) — the corpus notebook on a small corpus, the samples and latent-cache
notebooks on shrunk `demo` and `demo_ntp` runs."""

import os
import time
from pathlib import Path

import nbformat
import pytest

from experiments import pipeline
from experiments.config import load_config
from tests.test_pipeline import tiny_overrides

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
REPO = Path(__file__).resolve().parents[1]


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"explore_corpus.ipynb", "explore_samples.ipynb", "explore_latent_cache.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_compile_and_are_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert code
    for i, cell in enumerate(code):
        compile(cell.source, f"{path.name}[cell {i}]", "exec")
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name} cell {i} is stored with outputs"


def execute(name: str, env: dict[str, str], monkeypatch) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook top to bottom in a fresh kernel; -> (executed notebook, seconds)."""
    from nbclient import NotebookClient

    for key, value in {**env, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    seconds = time.perf_counter() - start
    print(f"{name} executed in {seconds:.1f} s")
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return notebook, seconds


def text_of(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def images_in(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


def audio_players_in(notebook: nbformat.NotebookNode) -> int:
    return sum("<audio" in o.get("data", {}).get("text/html", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.slow
def test_corpus_notebook_executes(tmp_path, monkeypatch):
    notebook, _ = execute("explore_corpus.ipynb", {"CORPUS_DIR": str(tmp_path / "corpus"), "CORPUS_NUM_TRAIN": "8"}, monkeypatch)
    assert images_in(notebook) >= 6 and audio_players_in(notebook) >= 6


@pytest.fixture(scope="module")
def shrunk_runs(tmp_path_factory):
    """A shrunk `demo` (MNTP) and `demo_ntp` run sharing one corpus, VAE and cache."""
    root = tmp_path_factory.mktemp("notebook_runs")
    for experiment in ("demo", "demo_ntp"):
        pipeline.run_task(load_config(experiment, tiny_overrides(root)))
    return root


@pytest.mark.slow
def test_samples_notebook_executes_on_shrunk_mntp_and_ntp_checkpoints(shrunk_runs, monkeypatch):
    clip = next(iter(sorted((shrunk_runs / "data" / "synthetic" / "audio").glob("test_*.wav"))))
    notebook, _ = execute("explore_samples.ipynb", {"RUNS_DIR": str(shrunk_runs / "runs"), "EXPERIMENT": "demo",
                                                    "AUDIO_PROMPT": str(clip), "SECONDS_TO_GENERATE": "0.8"}, monkeypatch)
    text = text_of(notebook)
    assert "demo_ntp (mask ratio none)" in text and "demo (mask ratio mixture)" in text  # the comparison ran
    assert text.count("CFG 3, temperature 0.8") == 1 and "chunk 1:" in text
    # 2 training samples + 3 prompts + the sweep grid + the NTP/MNTP grid + original and 2 continuations
    assert images_in(notebook) >= 2 + 3 + 1 + 1 + 3
    assert audio_players_in(notebook) >= 2 + 3 + 6 + 6 + 3 + 1


@pytest.mark.slow
def test_latent_cache_notebook_executes(shrunk_runs, monkeypatch):
    notebook, _ = execute("explore_latent_cache.ipynb", {"RUNS_DIR": str(shrunk_runs / "runs"), "EXPERIMENT": "demo"}, monkeypatch)
    text = text_of(notebook)
    assert "'train': 32" in text and "token dim 64" in text and "lag-1 correlation" in text
    assert images_in(notebook) == 1 + 1 + 3 and audio_players_in(notebook) == 2 * 3  # stats, PCA; 3 clips × (picture, 2 players)
