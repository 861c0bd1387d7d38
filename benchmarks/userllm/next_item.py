"""The next-item transformer against popularity, on each data set's default
config: the README's first table.

  python -m benchmarks.userllm.next_item

Trains `configs/default.py` (synthetic) and `configs/movielens_100k.py`
(MovieLens-100K from `--movielens_dir`) through the next_item workflow and
reports, on the test users (each user's last event, full ranking over every
item with the user's rated items excluded), the model's and popularity's
Recall@10 and NDCG@10 with their standard errors over users, and the wall
time. Nothing is chosen: both configs are run as they are.
"""

from __future__ import annotations

import os
import time

from benchmarks import harness, plots
from infra import results

DATASETS = {"synthetic": "configs.default", "movielens": "configs.movielens_100k"}
METRICS = ("recall@10", "ndcg@10")
FLAGS = (
    harness.Flag("datasets", list(DATASETS), "Which data sets (synthetic, movielens)."),
    harness.Flag("movielens_dir", "../shared/data/movielens-100k",
                 "The MovieLens-100K folder."),
    harness.Flag("runs_dir", "", "Runs go under here (default runs/<out's name>)."),
    harness.Flag("tiny", False, "The :tiny configs (for tests)."),
)


def config_of(dataset: str, args):
  import importlib
  if dataset not in DATASETS:
    raise ValueError(f"--datasets: {dataset!r} is not one of {tuple(DATASETS)}")
  config = importlib.import_module(DATASETS[dataset]).get_config(
      "tiny" if args.tiny else "")
  if dataset == "movielens":
    config.data.dir = args.movielens_dir
  return config


def measure(run: harness.Run) -> dict:
  from infra import mesh as mesh_lib
  from userllm import next_item_workflow
  rows = {}
  root = run.args.runs_dir or os.path.join("runs", os.path.basename(run.out))
  for dataset in run.args.datasets:
    config = config_of(dataset, run.args)
    began = time.time()
    metrics = next_item_workflow.run(config, os.path.join(root, dataset),
                                     mesh_lib.make_mesh(config.mesh))
    rows[dataset] = {
        "users": metrics["num_test_users"], "steps": metrics["steps"],
        "wall_seconds": time.time() - began,
        **{f"{scorer}/{m}{suffix}": metrics[f"test/{scorer}/next_item/{m}{suffix}"]
           for scorer in ("model", "popularity") for m in METRICS
           for suffix in ("", "_stderr")}}
  return {"rows": rows}


def present(payload: dict):
  def cell(row, scorer, metric):
    return f"{row[f'{scorer}/{metric}']:.3f} ± {row[f'{scorer}/{metric}_stderr']:.3f}"
  lines = ["Test users' last events, full ranking over every item (a user's "
           "rated items excluded); popularity ranks by training counts on the "
           "same events; ± one standard error over users.", ""]
  lines += results.markdown_table(
      ["data", "test users", "model Recall@10", "popularity Recall@10",
       "model NDCG@10", "popularity NDCG@10", "steps", "wall time"],
      [[name, int(r["users"]), cell(r, "model", "recall@10"),
        cell(r, "popularity", "recall@10"), cell(r, "model", "ndcg@10"),
        cell(r, "popularity", "ndcg@10"), int(r["steps"]),
        f"{r['wall_seconds']:.0f} s"] for name, r in payload["rows"].items()])
  fig, (ax,) = plots.panels(1, width=6.0)
  names = list(payload["rows"])
  for i, scorer in enumerate(("model", "popularity")):
    values = [payload["rows"][n][f"{scorer}/recall@10"] for n in names]
    errors = [payload["rows"][n][f"{scorer}/recall@10_stderr"] for n in names]
    ax.bar([j + 0.4 * i for j in range(len(names))], values, 0.4, yerr=errors,
           label=scorer)
  ax.set_xticks([j + 0.2 for j in range(len(names))], names)
  ax.set(ylabel="test Recall@10", title="next-item transformer against popularity")
  ax.legend()
  return lines, fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
