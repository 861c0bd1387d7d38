"""FELLRec's dynamic balance against FedAvg: the spread of per-client
Recall@10, client by client, and what each client holds and sends.

  python -m benchmarks.fellrec --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --out benchmarks/fellrec_ml100k

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

Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import report
from federated import evaluation, split, workflow
from infra import mesh as mesh_lib
from infra import results as results_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fedavg.py",
                                          "The federated experiment config.")
_OUT = flags.DEFINE_string("out", "benchmarks/fellrec", "Output path prefix.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Runs go here (default runs/<out name>).")
_CLIENTS = flags.DEFINE_integer("clients", 20, "Clients the users are grouped into.")
_RENDER = flags.DEFINE_bool("render", False, "Only re-write the markdown and the "
                            "plot from <out>.json.")
_PARTITION = flags.DEFINE_string("partition", "dirichlet", "dirichlet | semantic")

METRIC = "recall@10"


def configs(base) -> dict:
  """{"fedavg": config, "fellrec": config} for the grouped clients."""
  out = {}
  for name in ("fedavg", "fellrec"):
    c = copy.deepcopy(base)
    fed = c.federated
    fed.update(partition=_PARTITION.value, num_clients=_CLIENTS.value,
               algorithm="fedavg", server_learning_rate=1.0,
               personalisation="fellrec" if name == "fellrec" else "none")
    participating = max(1, int(round(fed.participating_fraction * fed.num_clients)))
    fed.clients_per_round = participating
    out[name] = c
  return out


def run(name: str, config, workdir: str, mesh) -> dict:
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


def write(out: str, runs: dict, comparison: dict, meta: dict) -> None:
  header = ["method", "mean", "p10", "p50", "p90", "p90 - p10", "std over clients",
            "std beyond sampling noise", "non-participating mean"]
  cells = [[r["name"], *(f"{r[k]:.3f}" for k in ("mean", "p10", "p50", "p90",
                                                  "spread_p90_p10", "std")),
            f"{excess_std(r):.3f}", f"{r['nonparticipating_mean']:.3f}"]
           for r in runs.values()]
  c = comparison
  events = np.asarray(runs["fedavg"]["events_per_client"])
  lines = [f"FELLRec's dynamic balance vs FedAvg, {meta['data']}, "
           f"{meta['clients']} {meta['partition']} clients "
           f"({meta['participating']} participating, all in every round), "
           f"{meta['rounds']} rounds, on {meta['device']}. Command: "
           f"`{meta['command']}`.", "",
           "Per-client out-of-sample Recall@10 (each client scored with the model "
           "it would serve):", ""] + results_lib.markdown_table(header, cells)
  lines += ["", f"Client by client (paired): FELLRec - FedAvg = "
            f"{c['mean_diff']:+.3f} +- {c['mean_diff_se']:.3f} (one standard error); "
            f"{c['clients_better']} of {c['clients']} clients better. FedAvg's worst "
            f"quarter of clients: {c['worst_quarter_fedavg']:.3f} under FedAvg, "
            f"{c['worst_quarter_fellrec']:.3f} under FELLRec. Each client has "
            f"{events.min()}-{events.max()} held-out events (a client's Recall@10 "
            f"has a binomial standard error up to "
            f"{(0.25 / max(events.min(), 1)) ** 0.5:.3f}).", ""]
  costs = runs["fellrec"]["split_costs"]
  lines += ["Client cost per round (FedAvg and FELLRec alike: one model down, one "
            "update up; with split storage the client keeps the embeddings, final "
            "norm and first k blocks and exchanges activations instead):", ""]
  lines += results_lib.markdown_table(
      ["k", "client params (KiB)", "share of the model", "bytes per round (KiB)"],
      [[r["k"], f"{r['client_param_bytes'] / 1024:.0f}", f"{r['client_share']:.2f}",
        f"{r['round_bytes'] / 1024:.0f}"] for r in costs])
  results_lib.write_report(out, {"meta": meta, "runs": runs, "paired": comparison},
                           lines)
  fig, (left, right) = report.figure(2)
  names = list(runs)
  left.boxplot([runs[n]["per_client"] for n in names], tick_labels=names)
  left.set(ylabel="per-client Recall@10", title="per-client distribution")
  x, y = (np.asarray(runs[n]["per_client"]) for n in ("fedavg", "fellrec"))
  right.scatter(x, y, s=14)
  top = max(x.max(), y.max()) * 1.05
  right.plot([0, top], [0, top], color="gray", ls="--")
  right.set(xlabel="FedAvg", ylabel="FELLRec", title="client by client")
  report.save(fig, out)


def main(argv):
  del argv
  base = _CONFIG.value
  out = _OUT.value
  if _RENDER.value:
    with open(out + ".json") as f:
      saved = json.load(f)
    write(out, saved["runs"], saved["paired"], saved["meta"])
    print(open(out + ".md").read())
    return
  workdir = _WORKDIR.value or os.path.join("runs", os.path.basename(out))
  mesh = mesh_lib.make_mesh(base.mesh)
  runs = {name: run(name, config, workdir, mesh)
          for name, config in configs(base).items()}
  comparison = paired(runs["fedavg"], runs["fellrec"])
  fed = configs(base)["fellrec"].federated
  meta = {"data": base.data.source, "device": report.device(),
          "rounds": base.train.num_steps, "clients": fed.num_clients,
          "participating": fed.clients_per_round, "partition": fed.partition,
          "fellrec": fed.fellrec.to_dict(),
          "command": "python -m benchmarks.fellrec " + " ".join(sys.argv[1:])}
  write(out, runs, comparison, meta)
  print(open(out + ".md").read())


if __name__ == "__main__":
  app.run(main)
