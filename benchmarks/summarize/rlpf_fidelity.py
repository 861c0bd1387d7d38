"""How faithfully RLPF's initial policy copies titles over its warm-up.

  python -m benchmarks.summarize.rlpf_fidelity --runs=synthetic=runs/rlpf_syn \\
      --out benchmarks/results/rlpf_fidelity

Reads the `[policy]` warm-up's valid rows of each workdir (only its policy
stage need be done): the share of the valid users' greedy and sampled titles
not in their histories, and of summaries whose `recent` part starts with the
latest title, over warm-up steps (summarize.evaluation.title_fidelity). No
setting is chosen.
"""

from __future__ import annotations

import os

from benchmarks import harness, plots, report
from benchmarks.summarize import rlpf_runs
from infra import results
from infra.errors import DataError


def measure(run: harness.Run) -> dict:
  from summarize import evaluation
  runs = {}
  for name, workdir in rlpf_runs.workdirs(run.args.runs).items():
    runs[name] = evaluation.fidelity_curve(report.read_metrics(
        os.path.join(workdir, "policy")))
    if not runs[name]:
      raise DataError(f"{workdir}/policy/metrics.jsonl: no valid rows with title "
                      "fidelity (a run from before it was reported?)")
  return {"runs": runs}


def present(payload: dict):
  from summarize import evaluation
  lines = ["How faithfully the initial policy's summaries copy titles over its "
           "warm-up: the run's valid users, greedy and sampled at the RL "
           "temperature (summarize.evaluation.title_fidelity).", ""]
  for name, curve in payload["runs"].items():
    lines += [f"### {name}", ""] + results.markdown_table(
        ["step"] + [label for _, label in evaluation.FIDELITY],
        [[r["step"]] + ["-" if r[k] is None else f"{r[k]:.3f}" for k, _ in evaluation.FIDELITY]
         for r in curve]) + [""]
  return lines, plot(payload["runs"])


def plot(runs: dict):
  fig, (unsupported_ax, latest_ax) = plots.panels(2, width=5.0)
  for i, (name, curve) in enumerate(runs.items()):
    for ax, key in ((unsupported_ax, "titles_unsupported"), (latest_ax, "latest_copied")):
      for mode, style in (("greedy", "o-"), ("sampled", "s--")):
        points = [(r["step"], r[f"{mode}_{key}"]) for r in curve
                  if r[f"{mode}_{key}"] is not None]
        if points:
          ax.plot(*zip(*points), style, color=f"C{i}", label=f"{name} {mode}")
  unsupported_ax.set_ylabel("share of titles not in the history")
  latest_ax.set_ylabel("summaries whose recent part starts\nwith the latest title")
  for ax in (unsupported_ax, latest_ax):
    ax.set_xlabel("policy warm-up step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=(rlpf_runs.RUNS,))

if __name__ == "__main__":
  harness.main(EXPERIMENT)
