"""examples/quickstart.ipynb runs top to bottom on the CPU (nbclient, a fresh kernel of this environment): train,
evaluate, predict, look, export; its own cells assert that the Python API's mask equals dgss-predict's and that the
ONNX file runs."""

import json
from pathlib import Path

import nbformat
from helpers.limits import HANG_GUARD_S
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=HANG_GUARD_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = {i: "".join(o.get("text", "") + json.dumps(o.get("data", {})) for o in c.get("outputs", []))
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}  # fmt: skip
    text = "\n".join(outputs.values())
    assert "the same mask as dgss-predict's: True" in text
    diff = float(text.split("largest difference to PyTorch:")[1].split()[0])
    assert diff <= 1e-4
    assert "image/png" in text  # the overlays are shown
    assert (tmp_path / "quickstart" / "export" / "model.onnx").is_file()
