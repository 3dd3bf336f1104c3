"""Every notebook in notebooks/ runs as stored: each code cell in order, in one fresh
namespace, with the Agg backend and a temporary working directory (no Jupyter kernel).

Notebooks are stored with their outputs cleared (checked here too), so a diff shows only
code and text. A notebook that needs an optional model names its fixture in NEEDS.
"""

import json
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

#: notebooks whose cells need optional packages -> the fixture that provides (or skips) them
NEEDS = {"05_real_models.ipynb": "minilm"}


def _cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    return nb["cells"]


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names[:5] == ["01_quickstart.ipynb", "02_layerwise_accumulation.ipynb",
                         "03_mlp_vs_attention.ipynb", "04_budgets_and_allocation.ipynb",
                         "05_real_models.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_stored_without_outputs(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name}: store notebooks with outputs cleared (python notebooks/build.py)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, request, tmp_path, monkeypatch):
    if path.name in NEEDS:
        request.getfixturevalue(NEEDS[path.name])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    try:
        for i, cell in enumerate(_cells(path)):
            if cell["cell_type"] != "code":
                continue
            source = "".join(cell["source"])
            exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # noqa: S102
    finally:
        plt.close("all")


def test_notebooks_match_build_script():
    import runpy

    build = runpy.run_path(str(ROOT / "notebooks" / "build.py"))
    for name, cells in build["NOTEBOOKS"].items():
        stored = json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))
        assert stored == build["notebook"](cells), (
            f"notebooks/{name} differs from notebooks/build.py: edit the cells in build.py "
            f"and run `python notebooks/build.py`")
