"""The teaching notebooks run top to bottom, are committed without outputs, and match their sources.

Each notebook's source is a jupytext percent-format script, ``notebooks/NAME.py``, paired with
``notebooks/NAME.ipynb`` (``formats: ipynb,py:percent`` in both); the two must hold the same cells
(types and sources), so that an edit to one without ``jupytext --sync`` fails here.

Each notebook is executed with nbclient in a fresh kernel of *this* interpreter (``sys.executable``,
pinned by a kernelspec written to a temporary directory, so a user's or the system's "python3"
kernel cannot substitute another Python), with a temporary working directory so that the reports
the notebooks write do not land in the repository. A failing cell fails the test with its source
and traceback.
"""

import ast
import json
import re
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


PAIRED_FORMATS = "ipynb,py:percent"
SYNC_HINT = "edit the .py and run `jupytext --sync notebooks/*.py` (see README, Notebooks)"


def _cells(nb) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def _first_difference(a: str, b: str) -> str:
    """The first line where two cell sources differ, as 'line N: A | B' (<end> past the last line)."""
    la, lb = a.splitlines(), b.splitlines()
    n = next((i for i, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y), min(len(la), len(lb)))

    def line(lines):
        return repr(lines[n]) if n < len(lines) else "<end>"

    return f"line {n + 1}: {line(la)} | {line(lb)}"


def _pairing_differences(ipynb: Path, py: Path) -> list[str]:
    """How a notebook and its jupytext percent-format source differ; empty when they are in sync.

    Compares the cells (type and source, in order) as jupytext reads the .py and nbformat the
    .ipynb, and the pairing (``jupytext.formats``) recorded in both.
    """
    import jupytext
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    source = jupytext.read(py, fmt="py:percent")
    diffs = []
    for doc, kind in ((nb, ".ipynb"), (source, ".py")):
        formats = doc.metadata.get("jupytext", {}).get("formats")
        if formats != PAIRED_FORMATS:
            diffs.append(f"the {kind} pairs formats {formats!r}, expected {PAIRED_FORMATS!r}")
    cells_nb, cells_py = _cells(nb), _cells(source)
    for i, ((type_nb, src_nb), (type_py, src_py)) in enumerate(zip(cells_nb, cells_py, strict=False)):
        if type_nb != type_py:
            diffs.append(f"cell {i} is {type_nb} in the .ipynb, {type_py} in the .py")
        elif src_nb != src_py:
            diffs.append(f"cell {i} ({type_nb}) differs, .ipynb | .py at {_first_difference(src_nb, src_py)}")
    if len(cells_nb) != len(cells_py):
        diffs.append(f"{len(cells_nb)} cells in the .ipynb, {len(cells_py)} in the .py")
    return diffs


def test_there_are_four_notebooks_each_with_its_source():
    assert NOTEBOOKS == ["01_routing.ipynb", "02_load_balancing.ipynb", "03_parity.ipynb", "04_training.ipynb"]
    sources = sorted(p.name for p in NOTEBOOK_DIR.glob("*.py"))
    assert sources == [name.removesuffix(".ipynb") + ".py" for name in NOTEBOOKS]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name):
    nb = json.loads((NOTEBOOK_DIR / name).read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{name} cell {i} has outputs: clear them, then save"
            assert cell["execution_count"] is None, f"{name} cell {i} has an execution count"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_in_sync_with_its_percent_source(name):
    pytest.importorskip("jupytext")
    pytest.importorskip("nbformat")
    py = NOTEBOOK_DIR / name.replace(".ipynb", ".py")
    ast.parse(py.read_text(encoding="utf-8"), filename=str(py))  # a script that reads as Python
    diffs = _pairing_differences(NOTEBOOK_DIR / name, py)
    assert not diffs, f"{name} and {py.name} are out of sync ({SYNC_HINT}):\n" + "\n".join(diffs)


def _edit_py_code(ipynb: Path, py: Path) -> None:
    text = py.read_text(encoding="utf-8")
    assert "torch.set_num_threads(1)" in text
    py.write_text(text.replace("torch.set_num_threads(1)", "torch.set_num_threads(2)", 1), encoding="utf-8")


def _edit_ipynb_markdown(ipynb: Path, py: Path) -> None:
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    assert nb["cells"][0]["cell_type"] == "markdown"
    nb["cells"][0]["source"][0] = "# 1. Routing, edited in Jupyter only\n"
    ipynb.write_text(json.dumps(nb, indent=1), encoding="utf-8")


def _drop_last_py_cell(ipynb: Path, py: Path) -> None:
    text = py.read_text(encoding="utf-8")
    py.write_text(text[:text.rindex("\n# %%")] + "\n", encoding="utf-8")


def _turn_py_markdown_into_code(ipynb: Path, py: Path) -> None:
    text = py.read_text(encoding="utf-8")
    py.write_text(text.replace("# %% [markdown]\n", "# %%\n", 1), encoding="utf-8")


def _unpair_ipynb(ipynb: Path, py: Path) -> None:
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    del nb["metadata"]["jupytext"]
    ipynb.write_text(json.dumps(nb, indent=1), encoding="utf-8")


@pytest.mark.parametrize("edit, expected", [
    (_edit_py_code, "cell 1 (code) differs"),
    (_edit_ipynb_markdown, "cell 0 (markdown) differs"),
    (_drop_last_py_cell, "13 cells in the .ipynb, 12 in the .py"),
    (_turn_py_markdown_into_code, "cell 0 is markdown in the .ipynb, code in the .py"),
    (_unpair_ipynb, "the .ipynb pairs formats None"),
])
def test_sync_check_fails_when_one_side_is_edited(edit, expected, tmp_path):
    pytest.importorskip("jupytext")
    pytest.importorskip("nbformat")
    ipynb, py = tmp_path / "01_routing.ipynb", tmp_path / "01_routing.py"
    ipynb.write_bytes((NOTEBOOK_DIR / ipynb.name).read_bytes())
    py.write_bytes((NOTEBOOK_DIR / py.name).read_bytes())
    assert _pairing_differences(ipynb, py) == []
    edit(ipynb, py)
    diffs = _pairing_differences(ipynb, py)
    assert any(expected in d for d in diffs), diffs


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
