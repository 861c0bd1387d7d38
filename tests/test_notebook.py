"""notebooks/quickstart.ipynb runs top to bottom on CPU: its code cells in
order, in one namespace, from the repository root, with the shell and magic
lines (Colab's clone and install) left out."""

import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      lines = [line for line in "".join(cell["source"]).splitlines()
               if not line.lstrip().startswith(("!", "%"))]
      yield "\n".join(lines)


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch,
                                                    capsys):
  """Every workflow's tiny config through main.py, its progress printed as it
  runs, a use mode, the plots; the Colab cell skipped (main.py is here) and
  refusing the placeholder URL in one line instead of cloning nothing."""
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("NOTEBOOK_RUNS", str(tmp_path))
  namespace = {"__name__": "__notebook__"}
  cells = list(code_cells(os.path.join(REPO, "notebooks", "quickstart.ipynb")))
  assert len(cells) >= 9
  for number, source in enumerate(cells):
    try:
      exec(compile(source, f"cell {number}", "exec"), namespace)
    except Exception as e:  # name the cell that broke
      pytest.fail(f"cell {number} raised {e!r}")
  out = capsys.readouterr().out
  assert "[train] step" in out and "[rlpf]" in out  # progress, live
  for name in ("participation_gap", "retrieval", "curves"):
    assert (tmp_path / f"{name}.png").stat().st_size > 0
  assert 0 <= namespace["fed"]["out_of_sample/model/next_item/recall@10_mean"] <= 1
  assert {"next_item", "federated", "dp_fedavg", "retrieval", "user_llm", "multitask",
          "rlpf", "federated_llm"} <= {d.name for d in tmp_path.iterdir()}
  assert len(namespace["recommended"]["users"]) == 2
  with pytest.raises(ValueError, match="set REPO_URL"):
    namespace["setup_colab"](namespace["REPO_URL"])
