"""Start-up time of each workflow: what a run pays before its first step.

  python -m benchmarks.startup --out benchmarks/startup

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
the run wrote to stderr (TensorFlow's cuInit and oneDNN notices). Writes
`<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "benchmarks/startup", "Path prefix of the outputs.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Fresh interpreters per cell.")

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


def measure(repo: str, workflow: str, with_tensorflow: bool) -> dict:
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


def main(argv) -> None:
  del argv
  from configs.common import WORKFLOWS
  from infra import results as results_lib
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  rows = []
  for workflow in WORKFLOWS:
    cell = {"workflow": workflow}
    for label, with_tf in (("after", False), ("before", True)):
      runs = [measure(repo, workflow, with_tf) for _ in range(_REPEATS.value)]
      times = [r["seconds"] for r in runs]
      cell[f"{label}_seconds"] = statistics.median(times)
      cell[f"{label}_seconds_all"] = times
      cell[f"{label}_stderr_lines"] = runs[-1]["stderr_lines"]
      cell["workflow_imports_tensorflow"] = runs[-1]["workflow_imports_tensorflow"]
    print(json.dumps(cell), flush=True)
    rows.append(cell)
  command = f"python -m benchmarks.startup --out {_OUT.value}"
  lines = [f"Start-up of each workflow (median of {_REPEATS.value} fresh "
           f"interpreters, seconds; {os.cpu_count()} CPU cores). Command: "
           f"`{command}`.", ""] + results_lib.markdown_table(
      ["workflow", "imports TensorFlow itself", "with TensorFlow (before)",
       "without (after)", "saved", "stderr lines before / after"],
      [[r["workflow"], "yes" if r["workflow_imports_tensorflow"] else "no",
        f"{r['before_seconds']:.2f}", f"{r['after_seconds']:.2f}",
        f"{r['before_seconds'] - r['after_seconds']:.2f}",
        f"{r['before_stderr_lines']} / {r['after_stderr_lines']}"] for r in rows])
  results_lib.write_report(_OUT.value, {"command": command, "rows": rows}, lines)
  plot(_OUT.value, rows)
  print("\n".join(lines))


def plot(out: str, rows: list[dict]) -> None:
  from benchmarks import report
  fig, (ax,) = report.figure(1)
  x = range(len(rows))
  ax.bar([i - 0.2 for i in x], [r["before_seconds"] for r in rows], 0.4,
         label="with TensorFlow (before)")
  ax.bar([i + 0.2 for i in x], [r["after_seconds"] for r in rows], 0.4,
         label="without (after)")
  ax.set_xticks(list(x), [r["workflow"] for r in rows])
  ax.set(ylabel="start-up seconds", title="workflow start-up")
  ax.legend(fontsize=8)
  report.save(fig, out)


if __name__ == "__main__":
  app.run(main)
