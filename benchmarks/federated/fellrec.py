"""FELLRec's dynamic balance against FedAvg: the spread of per-client
Recall@10, client by client, and what each client holds and sends.

  python -m benchmarks.federated.fellrec --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/fellrec_ml100k

Clients are groups of users (FELLRec's setting: a few clients with many users
each): `--config` (configs/fedavg.py) with the `dirichlet` partition (label
skew on favourite genre) into `--clients` clients, all participating clients
in every round, plain FedAvg on the server (learning rate 1). The same run
with `personalisation=fellrec` gives every client its own model
(federated/personalisation.py). Both are scored on the participating clients'
held-out events, each client with the model it would serve (FedAvg: the
server's; FELLRec: its own), and compared client by client (paired).
Client cost: parameters stored and bytes sent per round, and with split
storage (federated/split.py) per cut k.

No setting is chosen: both runs are reported as run.
"""

from __future__ import annotations

import copy
import os

import jax
import numpy as np

from benchmarks import harness, plots
from federated import evaluation, split, workflow
from infra import results

FLAGS = (
    harness.Flag("clients", 20, "Clients the users are grouped into."),
    harness.Flag("partition", "dirichlet", "dirichlet | semantic"),
)
METRIC = "recall@10"


def configs(base, args) -> dict:
  """{"fedavg": config, "fellrec": config} for the grouped clients."""
  out = {}
  for name in ("fedavg", "fellrec"):
    c = copy.deepcopy(base)
    fed = c.federated
    fed.update(partition=args.partition, num_clients=args.clients,
               algorithm="fedavg", server_learning_rate=1.0,
               personalisation="fellrec" if name == "fellrec" else "none")
    participating = max(1, int(round(fed.participating_fraction * fed.num_clients)))
    fed.clients_per_round = participating
    out[name] = c
  return out


def train_and_score(name: str, config, workdir: str, mesh) -> dict:
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name), mesh, f)
  evaluator = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh)
  personal = workflow.personal_models(state, f.dataset)
  clients, scores = evaluator.client_scores("out_of_sample", state.params, personal)
  _, nonpart = evaluator.client_scores("non_participating", state.params, personal)
  per_client = scores[METRIC]
  if not np.isfinite(per_client).all():
    raise FloatingPointError(f"{name}: a per-client score is not finite")
  params = jax.device_get(state.params)
  layers = f.task.model.config.num_layers
  steps = -(-int(f.dataset.examples.shape[1]) // config.federated.client_batch_size)
  costs = [split.client_cost(params, layers, k, config.federated.client_batch_size,
                             config.data.max_len, f.task.model.config.embed_dim,
                             steps * config.federated.local_epochs)
           for k in range(layers + 1)]
  counts = np.bincount(np.searchsorted(clients, evaluator.row_clients[
      "out_of_sample"]), minlength=len(clients))
  return {"name": name, "clients": clients.tolist(), "per_client": per_client.tolist(),
          "events_per_client": counts.tolist(),
          "nonparticipating_mean": float(nonpart[METRIC].mean()),
          **evaluation.summarize(per_client), "std": float(per_client.std()),
          "spread_p90_p10": float(np.percentile(per_client, 90)
                                  - np.percentile(per_client, 10)),
          "split_costs": costs}


def excess_std(run: dict) -> float:
  """The spread over clients beyond sampling noise: sqrt(max(0, variance of
  the per-client means - the mean binomial variance p (1 - p) / n_events))."""
  p = np.asarray(run["per_client"])
  n = np.asarray(run["events_per_client"])
  noise = np.mean(p * (1 - p) / np.maximum(n, 1))
  return float(np.sqrt(max(p.var(ddof=1) - noise, 0.0)))


def paired(a: dict, b: dict) -> dict[str, float]:
  """Client-by-client difference b - a: mean and its standard error, and the
  worst quarter's mean of each."""
  if a["clients"] != b["clients"]:
    raise ValueError("the two runs scored different clients")
  x, y = np.asarray(a["per_client"]), np.asarray(b["per_client"])
  diff = y - x
  worst = np.argsort(x)[:max(1, len(x) // 4)]  # FedAvg's worst quarter
  return {"mean_diff": float(diff.mean()),
          "mean_diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
          "worst_quarter_fedavg": float(x[worst].mean()),
          "worst_quarter_fellrec": float(y[worst].mean()),
          "clients_better": int((diff > 0).sum()), "clients": len(diff)}


def measure(run: harness.Run) -> dict:
  by_name = configs(run.config, run.args)
  runs = {name: train_and_score(name, config, run.workdir, run.mesh())
          for name, config in by_name.items()}
  fed = by_name["fellrec"].federated
  meta = {"data": run.config.data.source, "rounds": run.config.train.num_steps,
          "clients": fed.num_clients, "participating": fed.clients_per_round,
          "partition": fed.partition, "fellrec": fed.fellrec.to_dict()}
  return {"meta": meta, "runs": runs, "paired": paired(runs["fedavg"], runs["fellrec"])}


def present(payload: dict):
  meta, runs, c = payload["meta"], payload["runs"], payload["paired"]
  header = ["method", "mean", "p10", "p50", "p90", "p90 - p10", "std over clients",
            "std beyond sampling noise", "non-participating mean"]
  cells = [[r["name"], *(f"{r[k]:.3f}" for k in ("mean", "p10", "p50", "p90",
                                                  "spread_p90_p10", "std")),
            f"{excess_std(r):.3f}", f"{r['nonparticipating_mean']:.3f}"]
           for r in runs.values()]
  events = np.asarray(runs["fedavg"]["events_per_client"])
  lines = [f"FELLRec's dynamic balance vs FedAvg, {meta['data']}, "
           f"{meta['clients']} {meta['partition']} clients "
           f"({meta['participating']} participating, all in every round), "
           f"{meta['rounds']} rounds.", "",
           "Per-client out-of-sample Recall@10 (each client scored with the model "
           "it would serve):", ""] + results.markdown_table(header, cells)
  lines += ["", f"Client by client (paired): FELLRec - FedAvg = "
            f"{c['mean_diff']:+.3f} +- {c['mean_diff_se']:.3f} (one standard error); "
            f"{c['clients_better']} of {c['clients']} clients better. FedAvg's worst "
            f"quarter of clients: {c['worst_quarter_fedavg']:.3f} under FedAvg, "
            f"{c['worst_quarter_fellrec']:.3f} under FELLRec. Each client has "
            f"{events.min()}-{events.max()} held-out events (a client's Recall@10 "
            f"has a binomial standard error up to "
            f"{(0.25 / max(events.min(), 1)) ** 0.5:.3f}).", ""]
  lines += ["Client cost per round (FedAvg and FELLRec alike: one model down, one "
            "update up; with split storage the client keeps the embeddings, final "
            "norm and first k blocks and exchanges activations instead):", ""]
  lines += results.markdown_table(
      ["k", "client params (KiB)", "share of the model", "bytes per round (KiB)"],
      [[r["k"], f"{r['client_param_bytes'] / 1024:.0f}", f"{r['client_share']:.2f}",
        f"{r['round_bytes'] / 1024:.0f}"] for r in runs["fellrec"]["split_costs"]])
  return lines, plot(runs)


def plot(runs: dict):
  fig, (spread_ax, paired_ax) = plots.panels(2)
  names = list(runs)
  spread_ax.boxplot([runs[n]["per_client"] for n in names], tick_labels=names)
  spread_ax.set(ylabel="per-client Recall@10", title="per-client distribution")
  x, y = (np.asarray(runs[n]["per_client"]) for n in ("fedavg", "fellrec"))
  paired_ax.scatter(x, y, s=14)
  top = max(x.max(), y.max()) * 1.05
  paired_ax.plot([0, top], [0, top], color="gray", ls="--")
  paired_ax.set(xlabel="FedAvg", ylabel="FELLRec", title="client by client")
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/fedavg.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
