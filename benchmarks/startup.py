"""Start-up time of each workflow: what a run pays before its first step.

  python -m benchmarks.startup --out benchmarks/results/startup

For every workflow of `configs.common.WORKFLOWS`, a fresh interpreter imports
what `main.py` imports at its top (absl, ml_collections' config flags), the
workflow module and the metric writer, and initialises JAX's backend:
everything `main.py` loads before it reads data. Wall time from the parent (interpreter
start included), the median of `--repeats` runs, with and without an extra
`import tensorflow`; the latter is what every run paid before the metric writer
dropped `clu` (whose writers import TensorFlow), so the two columns are the
before and after of that change. Also records whether importing the workflow
loads TensorFlow (none does: the User-LLM workflow loads it only on its
opt-in seqio input path, `userllm.input_pipeline=seqio`) and how many lines
the run wrote to stderr (TensorFlow's cuInit and oneDNN notices). It sits at
the top of benchmarks/, not in a package's folder: it measures main.py's
start-up for every workflow at once.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from benchmarks import harness, plots
from infra import results

FLAGS = (harness.Flag("repeats", 5, "Fresh interpreters per cell."),)

# The child: what main.py imports before the workflow reads its data.
_CHILD = """
import importlib, sys
from absl import app, flags
from ml_collections import config_flags
from configs.common import WORKFLOWS
importlib.import_module(WORKFLOWS[sys.argv[1]])
from infra import metric_writer
import jax
jax.devices()
own = "tensorflow" in sys.modules
if sys.argv[2] == "1":
  import tensorflow
print(int(own))
"""


def measure_once(repo: str, workflow: str, with_tensorflow: bool) -> dict:
  """One fresh interpreter: wall seconds, whether the workflow loaded TF itself,
  and its stderr line count."""
  env = {**os.environ, "PYTHONPATH": repo}
  began = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", _CHILD, workflow,
                        str(int(with_tensorflow))], capture_output=True,
                       text=True, cwd=repo, env=env)
  seconds = time.perf_counter() - began
  if out.returncode:
    raise RuntimeError(f"{workflow}: {out.stderr[-2000:]}")
  return {"seconds": seconds, "workflow_imports_tensorflow": bool(int(
      out.stdout.strip().splitlines()[-1])),
          "stderr_lines": len(out.stderr.strip().splitlines())}


def measure(run: harness.Run) -> dict:
  from configs.common import WORKFLOWS
  rows = []
  for workflow in WORKFLOWS:
    cell = {"workflow": workflow}
    for label, with_tf in (("after", False), ("before", True)):
      runs = [measure_once(harness.REPO, workflow, with_tf)
              for _ in range(run.args.repeats)]
      times = [r["seconds"] for r in runs]
      cell[f"{label}_seconds"] = statistics.median(times)
      cell[f"{label}_seconds_all"] = times
      cell[f"{label}_stderr_lines"] = runs[-1]["stderr_lines"]
      cell["workflow_imports_tensorflow"] = runs[-1]["workflow_imports_tensorflow"]
    print(cell, flush=True)
    rows.append(cell)
  return {"repeats": run.args.repeats, "cpu_count": os.cpu_count(), "rows": rows}


def present(payload: dict):
  rows = payload["rows"]
  repeats = payload.get("repeats", len(rows[0]["after_seconds_all"]))
  cores = payload.get("cpu_count", "?")
  lines = [f"Start-up of each workflow (median of {repeats} fresh interpreters, "
           f"seconds; {cores} CPU cores).", ""] + results.markdown_table(
      ["workflow", "imports TensorFlow itself", "with TensorFlow (before)",
       "without (after)", "saved", "stderr lines before / after"],
      [[r["workflow"], "yes" if r["workflow_imports_tensorflow"] else "no",
        f"{r['before_seconds']:.2f}", f"{r['after_seconds']:.2f}",
        f"{r['before_seconds'] - r['after_seconds']:.2f}",
        f"{r['before_stderr_lines']} / {r['after_stderr_lines']}"] for r in rows])
  return lines, plot(rows)


def plot(rows: list[dict]):
  fig, (ax,) = plots.panels(1)
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r["before_seconds"] for r in rows], 0.4,
         label="with TensorFlow (before)")
  ax.bar([i + 0.2 for i in x], [r["after_seconds"] for r in rows], 0.4,
         label="without (after)")
  ax.set_xticks(list(x), [r["workflow"] for r in rows])
  ax.set(ylabel="start-up seconds", title="workflow start-up")
  ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
