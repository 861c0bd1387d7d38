"""notebooks/quickstart.ipynb runs top to bottom on CPU: its code cells in
order, in one namespace, from the repository root, with the shell and magic
lines (Colab's clone and install) left out.

The cells run in a child process, as in a fresh kernel on a laptop: one CPU
device (the test process has 8 fake ones, which only add collectives on 2
cores), the suite's XLA flags and compilation cache inherited."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def code_cells(path):
  with open(path) as f:
    notebook = json.load(f)
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      lines = [line for line in "".join(cell["source"]).splitlines()
               if not line.lstrip().startswith(("!", "%"))]
      yield "\n".join(lines)


def run_cells(out_path):
  """The kernel's side: every code cell in order in one namespace, then what
  the test asserts on as JSON at `out_path` (a failing cell: its number)."""
  namespace = {"__name__": "__notebook__"}
  cells = list(code_cells(NOTEBOOK))
  for number, source in enumerate(cells):
    try:
      exec(compile(source, f"cell {number}", "exec"), namespace)
    except Exception as e:  # name the cell that broke
      raise SystemExit(f"cell {number} raised {e!r}")
  try:
    namespace["setup_colab"](namespace["REPO_URL"])
    colab_error = ""
  except ValueError as e:
    colab_error = str(e)
  with open(out_path, "w") as f:
    json.dump({"cells": len(cells), "fed": namespace["fed"],
               "recommended_users": len(namespace["recommended"]["users"]),
               "colab_error": colab_error}, f)


def test_the_quickstart_notebook_runs_top_to_bottom(tmp_path):
  """Every workflow's tiny config through main.py, its progress printed as it
  runs, a use mode, the plots; the Colab cell skipped (main.py is here) and
  refusing the placeholder URL in one line instead of cloning nothing."""
  runs, out = tmp_path / "runs", tmp_path / "kernel.json"
  flags = os.environ["XLA_FLAGS"].replace(
      "--xla_force_host_platform_device_count=8", "")
  env = dict(os.environ, NOTEBOOK_RUNS=str(runs), XLA_FLAGS=flags,
             PYTHONPATH=REPO)
  kernel = subprocess.run([sys.executable, __file__, str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
  assert kernel.returncode == 0, (kernel.stdout[-2000:], kernel.stderr[-3000:])
  seen = json.loads(out.read_text())
  assert seen["cells"] >= 9
  assert "[train] step" in kernel.stdout and "[rlpf]" in kernel.stdout  # progress
  assert "over 1 cpu device(s)" in kernel.stdout
  for name in ("participation_gap", "retrieval", "curves"):
    assert (runs / f"{name}.png").stat().st_size > 0
  assert 0 <= seen["fed"]["out_of_sample/model/next_item/recall@10_mean"] <= 1
  assert {"next_item", "federated", "dp_fedavg", "retrieval", "user_llm", "multitask",
          "rlpf", "federated_llm"} <= {d.name for d in runs.iterdir()}
  assert seen["recommended_users"] == 2
  assert "set REPO_URL" in seen["colab_error"]


if __name__ == "__main__":
  run_cells(sys.argv[1])
