"""The teaching notebooks (notebooks/*.ipynb) run top to bottom, and are committed without outputs.

Each notebook is executed with nbclient in a fresh kernel of *this* interpreter (``sys.executable``,
pinned by a kernelspec written to a temporary directory, so a user's or the system's "python3"
kernel cannot substitute another Python), with a temporary working directory so that the reports
the notebooks write do not land in the repository. A failing cell fails the test with its source
and traceback.
"""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOK_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_three_notebooks():
    assert NOTEBOOKS == ["01_routing.ipynb", "02_load_balancing.ipynb", "03_parity.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nb = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name} cell {i} has outputs: strip them"
            assert cell["execution_count"] is None, f"{name} cell {i} has an execution count"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


def test_notebooks_match_their_generator():
    pytest.importorskip("nbformat")
    gen = _generator()
    for name, cells in gen.NOTEBOOKS.items():
        text = (NOTEBOOK_DIR / name).read_text(encoding="utf-8")
        assert text == gen.render(cells), f"{name} differs from notebooks/make_notebooks.py: rerun it"


def _kernel_manager(tmp_path: Path):
    """An nbclient kernel manager whose "python3" kernel is this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    kernels = tmp_path / "kernels"
    (kernels / "python3").mkdir(parents=True)
    (kernels / "python3" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (moe-parity tests)",
        "language": "python",
    }))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ksm)


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path):
    for module in ("nbclient", "nbformat", "ipykernel", "torch", "jax", "flax", "optax", "moe_torch", "moe_jax"):
        pytest.importorskip(module)
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(workdir)}})
    error = None
    try:
        client.execute(cleanup_kc=True)
    except CellExecutionError as exc:
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the failing cell's source and traceback
    if error is not None:
        executed = tmp_path / name
        nbformat.write(nb, executed)
        pytest.fail(f"{name} failed (executed notebook kept at {executed}):\n{error}", pytrace=False)
    # every code cell ran, and the figures reached the reader
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells)
    images = sum("image/png" in o.get("data", {}) for c in code_cells for o in c.outputs)
    assert images >= 2, f"{name} displayed {images} figure(s)"
