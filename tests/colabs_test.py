"""The notebooks in colabs/ run top to bottom (their code cells, in order, in one namespace)."""

import glob
import json
import os

import matplotlib
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colabs", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, shapes_tiny_config, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(ROOT)
  monkeypatch.setenv("CMHN_DATA_DIR", shapes_tiny_config.data_dir)
  with open(path) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  namespace = {"__name__": "__main__"}
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    exec(compile(source, f"{os.path.basename(path)}[cell {i}]", "exec"), namespace)  # pylint: disable=exec-used
  # The last recall ran on the trained memory: its energy trace never rises from step 1 on,
  # and the run left its report behind.
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert np.all(np.diff(np.asarray(namespace["r"].energies[1:]), axis=0) <= 1e-5)
  assert os.path.exists(os.path.join(namespace["workdir"], "report", "metrics.json"))
