"""What every benchmark writes besides its JSON and markdown: a PNG figure
(matplotlib, headless), and the one-line description of the machine."""

from __future__ import annotations

import json
import os
import platform

import jax
import matplotlib

matplotlib.use("Agg")  # no display on CI or TPU VMs
from matplotlib import pyplot as plt  # noqa: E402


def device() -> str:
  """e.g. "cpu (x86_64, 2 cores), jax 0.10.2"."""
  return (f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind}; "
          f"{platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}")


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
  """(fig, axes list) of one row of `ncols` panels."""
  fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
  return fig, list(axes[0])


def save(fig, out: str) -> str:
  """Writes `<out>.png` (atomically) and closes the figure; returns its path."""
  path = out + ".png"
  fig.tight_layout()
  fig.savefig(path + ".tmp.png", dpi=120)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)
  return path


def with_overrides(config, overrides: dict):
  """A deep copy of `config` with {"section.field": value} set (what the
  settings of a benchmark change)."""
  import copy
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def centralised(epochs: int) -> dict:
  """Overrides that make the federated workflow train centrally: every
  example pooled into one client, one client a round, the server copying it
  (FedAvg at rate 1), Adam at 3e-3 inside the client; a round is an epoch."""
  return {"federated.pooling": "central", "federated.clients_per_round": 1,
          "federated.max_examples_per_client": 0, "federated.algorithm": "fedavg",
          "federated.server_learning_rate": 1.0, "federated.client_optimizer": "adam",
          "federated.client_learning_rate": 3e-3, "train.num_steps": epochs}


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
  one panel each (up to `max_panels`); writes `<out>.png`."""
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
  fig, axes = figure(min(len(names), 4), width=4.0, height=3.0)
  if len(names) > 4:
    plt.close(fig)
    rows = -(-len(names) // 4)
    fig, grid = plt.subplots(rows, 4, figsize=(16, 3 * rows), squeeze=False)
    axes = list(grid.ravel())
    for ax in axes[len(names):]:
      ax.axis("off")
  for ax, name in zip(axes, names):
    for workdir, (xs, ys) in series[name].items():
      ax.plot(xs, ys, "o-" if len(xs) < 20 else "-", ms=3,
              color=f"C{workdirs.index(workdir) % 10}",  # one colour per workdir
              label=_label(workdir))
    ax.set_title(name, fontsize=8)
    ax.set_xlabel("step", fontsize=8)
  handles = {_label(w): plt.Line2D([], [], color=f"C{i % 10}")
             for i, w in enumerate(workdirs)}
  axes[0].legend(handles.values(), handles.keys(), fontsize=7)
  return save(fig, out)


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
