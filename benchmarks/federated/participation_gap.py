"""The participation gap (Yuan et al. 2022) of federated next-item training,
with FedAdam and FedAvg, on synthetic data and MovieLens-100K, with natural
clients or clients built to differ.

  python -m benchmarks.federated.participation_gap \
      --out benchmarks/results/participation_gap
  python -m benchmarks.federated.participation_gap --partition=dirichlet \
      --algorithms=fedadam --clients_per_round=16 \
      --out benchmarks/results/participation_gap_dirichlet

Trains `configs/fedavg.py` (one client per user, FedAdam by default) once per
data set and algorithm and reports its three evaluations of the same model,
each a mean over clients with its standard error: in-sample (participating
clients, events they trained on), out-of-sample (their later events) and
non-participating clients (the same later events of clients that never
trained); the out-of-sample gap (paired over the participating clients) and
the participation gap (two disjoint sets of clients), and popularity on the
same events. `--partition=dirichlet` synthesises `--num_clients` clients
from users with label skew on their favourite genre (small
`--dirichlet_alpha`: each genre's users in few clients), so clients that
never train hold tastes the trained ones rarely do: a partition built to
have a gap. Nothing is chosen: each algorithm runs at configs/fedavg.py's
settings (its server learning rate the algorithm's default)."""

from __future__ import annotations

import os

from benchmarks import harness, plots
from infra import results

ALGORITHMS = ("fedadam", "fedavg")
SPLITS = ("in_sample", "out_of_sample", "non_participating")
GAPS = ("out_of_sample_gap", "participation_gap")
FLAGS = (
    harness.Flag("datasets", ["synthetic", "movielens"], "Which data sets."),
    harness.Flag("algorithms", list(ALGORITHMS), "Server algorithms to compare."),
    harness.Flag("movielens_dir", "../shared/data/movielens-100k",
                 "The MovieLens-100K folder."),
    harness.Flag("rounds", 0, "Rounds of each run (0: configs/fedavg.py's)."),
    harness.Flag("partition", "natural", "Who the clients are: natural (one per "
                 "user), or dirichlet / semantic clients synthesised from users "
                 "(partitions built to differ), or modulo (user i in client i mod "
                 "num_clients: with --communities=num_clients each client is one "
                 "synthetic community).",
                 choices=("natural", "dirichlet", "semantic", "modulo")),
    harness.Flag("num_clients", 100, "Synthesised clients (dirichlet / semantic / "
                 "modulo)."),
    harness.Flag("communities", 0, "Synthetic data: communities with their own "
                 "related-items maps (data/synthetic.py; 0: one shared map)."),
    harness.Flag("dirichlet_alpha", 0.1, "Label skew of the dirichlet partition."),
    harness.Flag("clients_per_round", 0, "The cohort (0: configs/fedavg.py's)."),
    harness.Flag("num_users", 0, "Synthetic users (0: configs/fedavg.py's)."),
    harness.Flag("eval_clients", 0, "Clients scored per split (0: every one)."),
    harness.Flag("runs_dir", "", "Runs go under here (default runs/<out's name>)."),
    harness.Flag("tiny", False, "configs/fedavg.py:tiny (for tests)."),
)
METRIC = "recall@10"


def config_of(dataset: str, algorithm: str, args):
  from configs import fedavg
  config = fedavg.get_config("tiny" if args.tiny else "")
  if dataset == "movielens":
    config.data.source, config.data.dir = "movielens", args.movielens_dir
  elif dataset != "synthetic":
    raise ValueError(f"--datasets: {dataset!r} is not synthetic or movielens")
  config.federated.algorithm = algorithm
  config.federated.server_learning_rate = 0.0  # the algorithm's default
  config.federated.update(partition=args.partition, eval_clients=args.eval_clients)
  if args.partition != "natural":
    config.federated.update(num_clients=args.num_clients,
                            dirichlet_alpha=args.dirichlet_alpha)
  if args.clients_per_round:
    config.federated.clients_per_round = args.clients_per_round
  if args.num_users and dataset == "synthetic":
    config.data.synthetic.num_users = args.num_users
  if args.communities and dataset == "synthetic":
    config.data.synthetic.communities = args.communities
  if args.rounds:
    config.train.num_steps = args.rounds
  return config


def measure(run: harness.Run) -> dict:
  from federated import workflow
  from infra import mesh as mesh_lib
  root = run.args.runs_dir or os.path.join("runs", os.path.basename(run.out))
  rows = {}
  for dataset in run.args.datasets:
    for algorithm in run.args.algorithms:
      config = config_of(dataset, algorithm, run.args)
      metrics = workflow.run(config, os.path.join(root, f"{dataset}_{algorithm}"),
                             mesh_lib.make_mesh(config.mesh))
      row = {"rounds": metrics["rounds"]}
      for split in SPLITS:
        for scorer in ("model", "popularity"):
          for stat in ("mean", "stderr", "p10", "p90"):
            key = f"{split}/{scorer}/next_item/{METRIC}_{stat}"
            if key in metrics:
              row[f"{split}/{scorer}/{stat}"] = metrics[key]
        row[f"{split}/clients"] = metrics.get(f"{split}/model/next_item/clients", 0.0)
      for gap in GAPS:
        row[gap] = metrics[f"{gap}/model/next_item/{METRIC}"]
        row[f"{gap}_stderr"] = metrics[f"{gap}/model/next_item/{METRIC}_stderr"]
      rows[f"{dataset} / {algorithm}"] = row
  partition = run.args.partition + (
      f" ({run.args.num_clients} clients, alpha {run.args.dirichlet_alpha})"
      if run.args.partition == "dirichlet" else
      f" ({run.args.num_clients} clients, {run.args.communities} synthetic "
      "communities)" if run.args.partition == "modulo" else
      f" ({run.args.num_clients} clients)" if run.args.partition != "natural" else "")
  return {"metric": METRIC, "partition": partition, "rows": rows}


def present(payload: dict):
  rows = payload["rows"]
  def cell(row, split, scorer="model"):
    return (f"{row[f'{split}/{scorer}/mean']:.3f} ± "
            f"{row[f'{split}/{scorer}/stderr']:.3f}")
  lines = [f"Clients: {payload.get('partition', 'natural')}. "
           f"Per-client {payload['metric']} (a client's mean over its held-out "
           "events), mean over clients ± its standard error; the out-of-sample "
           "gap is paired over the participating clients, the participation "
           "gap compares two disjoint sets of clients.", ""]
  lines += results.markdown_table(
      ["data / algorithm", "rounds", "in-sample", "out-of-sample",
       "non-participating", "out-of-sample gap", "participation gap",
       "popularity (out-of-sample)"],
      [[name, int(r["rounds"]), cell(r, "in_sample"), cell(r, "out_of_sample"),
        cell(r, "non_participating"),
        f"{r['out_of_sample_gap']:+.3f} ± {r['out_of_sample_gap_stderr']:.3f}",
        f"{r['participation_gap']:+.3f} ± {r['participation_gap_stderr']:.3f}",
        cell(r, "out_of_sample", "popularity")] for name, r in rows.items()])
  fig, (ax,) = plots.panels(1, width=7.0)
  names = list(rows)
  for i, split in enumerate(SPLITS):
    ax.errorbar([j + 0.15 * (i - 1) for j in range(len(names))],
                [rows[n][f"{split}/model/mean"] for n in names],
                yerr=[rows[n][f"{split}/model/stderr"] for n in names],
                fmt="o", capsize=3, label=split)
  ax.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=8)
  ax.set(ylabel=f"per-client {payload['metric']}", title="the participation gap")
  ax.legend(fontsize=8)
  return lines, fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
