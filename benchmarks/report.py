"""Learning curves of finished or running workdirs, from their
metrics.jsonl: every loss of the training rows and every metric of the
evaluation rows, one panel each, the workdirs overlaid.

  python -m benchmarks.report runs/a [runs/b ...] --out curves

A viewer of workdirs, not an experiment: it writes only `<out>.png` (no
artifact, no provenance), so it is not run through benchmarks/harness.py and
sits at the top of benchmarks/.
"""

from __future__ import annotations

import json
import os

from matplotlib.lines import Line2D

from benchmarks import plots


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `<workdir>/metrics.jsonl` (unreadable lines skipped)."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        continue
  return rows


def metric_dirs(workdir: str) -> list[str]:
  """The run directories of a workdir: itself when it holds metrics.jsonl,
  else its stages that do (User-LLM writes one per stage: lm, encoder, ...)."""
  if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return [workdir]
  stages = sorted(os.path.join(workdir, d) for d in os.listdir(workdir)
                  if os.path.exists(os.path.join(workdir, d, "metrics.jsonl")))
  if not stages:
    raise SystemExit(f"{workdir}: no metrics.jsonl in it or in its stages")
  return stages


def curves(workdirs: list[str], out: str, max_panels: int = 12) -> str:
  """Learning curves of one or more workdirs (or their stages), overlaid:
  every loss of the training rows and every metric of the evaluation rows,
  one panel each (up to `max_panels`, two to a row); writes `<out>.png`."""
  workdirs = [d for w in workdirs for d in metric_dirs(w)]
  series: dict[str, dict[str, tuple[list, list]]] = {}
  for workdir in workdirs:
    for row in read_metrics(workdir):
      split = row["split"]
      for name, value in row.items():
        if name in ("step", "split"):
          continue
        is_eval = split not in ("train", "federated")
        if not (is_eval or "loss" in name):
          continue
        xs, ys = series.setdefault(f"{split}/{name}", {}).setdefault(workdir, ([], []))
        xs.append(row["step"])
        ys.append(value)
  names = sorted(series, key=lambda n: ("loss" not in n, n))[:max_panels]
  if not names:
    raise SystemExit(f"no losses or evaluation metrics in {workdirs}")
  fig, axes = plots.panels(len(names), width=5.0, height=3.2)
  for ax, name in zip(axes, names):
    for workdir, (xs, ys) in series[name].items():
      ax.plot(xs, ys, "o-" if len(xs) < 20 else "-", ms=3,
              color=f"C{workdirs.index(workdir) % 10}",  # one colour per workdir
              label=_label(workdir))
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
  handles = {_label(w): Line2D([], [], color=f"C{i % 10}")
             for i, w in enumerate(workdirs)}
  axes[0].legend(handles.values(), handles.keys(), fontsize=7)
  return plots.save(fig, out)


def _label(run_dir: str) -> str:
  """The last two path parts of a run directory (workdir/stage)."""
  parts = os.path.normpath(run_dir).split(os.sep)
  return "/".join(parts[-2:])


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(
      description="Learning curves of workdirs from their metrics.jsonl: "
                  "python -m benchmarks.report runs/a [runs/b ...] --out curves")
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", default="", help="default <first workdir>/curves")
  args = parser.parse_args()
  print(curves(args.workdirs, args.out or os.path.join(args.workdirs[0], "curves")))
