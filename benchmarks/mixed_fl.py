"""Mixed FL with datacenter data (Augenstein et al., arXiv 2205.13655,
experiment A): the clients see one distribution, the server holds data of
another, and the model is scored on their mixture.

  python -m benchmarks.mixed_fl --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --out benchmarks/mixed_fl_ml100k

The retrieval dual encoder of `--config` (configs/retrieval.py, global
softmax). Users split by favourite genre (`federated.datacenter.users=genre`:
genres ranked by popularity, odd ranks to the server): the federated clients
are the users of the even-ranked genres, the server holds the training
examples of the others. Every setting is scored on the held-out events of all
participating users (the inference distribution: both groups), per client,
and compared client by client with the oracle (mean paired difference and its
standard error over clients):

- oracle: centralised training on both groups' examples;
- FL oracle: federated training with every user a client (the inference
  distribution, trained the way the mixed runs are: the same rounds, cohort
  and optimisers);
- centralised only: centralised training on the server's examples;
- FL only: federated training on the clients, the server's data unused;
- parallel, one_way, two_way: federated training plus the server's loss
  (the mean example loss of `server_batch_size` of its examples a round),
  joined by each mixed-FL algorithm (federated/algorithms.py).

Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import report
from federated import evaluation, partition, workflow
from infra import mesh as mesh_lib
from infra import results as results_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retrieval.py",
                                          "The retrieval experiment config.")
_OUT = flags.DEFINE_string("out", "benchmarks/mixed_fl", "Output path prefix.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Runs go here (default runs/<out name>).")
_CENTRAL_EPOCHS = flags.DEFINE_integer("central_epochs", 30, "Epochs (rounds) of "
                                       "the centralised runs.")
_CENTRAL_STEPS = flags.DEFINE_integer("central_steps", 5, "Server SGD steps on its "
                                      "loss a round (parallel, two_way).")
_CENTRAL_LR = flags.DEFINE_float("central_learning_rate", 0.5, "Their learning "
                                 "rate (the clients' own).")
_ONLY = flags.DEFINE_list("only", [], "Run only these settings (default: all).")

KEY = "out_of_sample/model/retrieval/recall@10_mean"
MIXINGS = ("parallel", "one_way", "two_way")


def settings() -> dict[str, dict]:
  """name -> config overrides."""
  central = report.centralised(_CENTRAL_EPOCHS.value)
  split = {"federated.datacenter.users": "genre"}
  out = {"oracle": central, "FL oracle": {},
         "centralised only": {**central, **split, "federated.datacenter.swap": True},
         "FL only": split}
  for mixing in MIXINGS:
    out[mixing] = {**split, "federated.mixed.server_loss": "datacenter",
                   "federated.mixed.weight": 1.0,
                   "federated.mixed.algorithm": mixing,
                   "federated.mixed.central_steps": _CENTRAL_STEPS.value,
                   "federated.mixed.central_learning_rate": _CENTRAL_LR.value}
  return {k: v for k, v in out.items() if not _ONLY.value or k in _ONLY.value}


def run_setting(name: str, config, workdir: str, mesh) -> tuple[dict, np.ndarray,
                                                                 np.ndarray]:
  """(row, client ids, per-client Recall@10) of one setting."""
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name.replace(" ", "_")),
                         mesh, f)
  scorer = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      splits=("out_of_sample",))
  clients, scores = scorer.client_scores("out_of_sample", state.params)
  recall = scores["recall@10"]
  if not np.all(np.isfinite(recall)):
    raise FloatingPointError(f"{name}: non-finite recall")
  at_server = partition.datacenter_users("genre", f.timelines)
  user_of_client = {int(c): u for u, c in enumerate(f.split.client_of_user)}
  server_group = np.asarray([at_server[user_of_client[int(c)]] for c in clients])
  row = {"setting": name, "rounds": int(state.step), "recall@10": float(recall.mean()),
         "recall@10_se": float(recall.std(ddof=1) / np.sqrt(len(recall))),
         "clients_group": float(recall[~server_group].mean()),
         "server_group": float(recall[server_group].mean())}
  print(f"[mixed_fl] {row}", flush=True)
  return row, clients, recall


def write(out: str, rows: list[dict], meta: dict) -> None:
  lines = [f"Mixed FL with datacenter data, {meta['data']}, on {meta['device']}. "
           f"Command: `{meta['command']}`. Federated: {meta['rounds']} rounds of "
           f"{meta['clients_per_round']} clients; centralised: "
           f"{meta['central_epochs']} epochs; server: {meta['central_steps']} SGD "
           f"steps at {meta['central_learning_rate']} a round on batches of "
           f"{meta['server_batch_size']}. Global Recall@10 of the participating "
           "users' held-out events, mean over clients (users); the differences "
           "to the oracles paired client by client.", ""]
  lines += results_lib.markdown_table(
      ["setting", "Recall@10 (all users)", "users of the clients' genres",
       "users of the server's genres", "minus the oracle (± s.e.)",
       "minus the FL oracle (± s.e.)"],
      [[r["setting"], f"{r['recall@10']:.4f} ± {r['recall@10_se']:.4f}",
        f"{r['clients_group']:.4f}", f"{r['server_group']:.4f}",
        _paired(r, "minus_oracle"), _paired(r, "minus_fl_oracle")] for r in rows])
  results_lib.write_report(out, {"meta": meta, "rows": rows}, lines)
  plot(out, rows)


def _paired(row: dict, key: str) -> str:
  return f"{row[key]:+.4f} ± {row[key + '_se']:.4f}" if key in row else "-"


def plot(out: str, rows: list[dict]) -> None:
  fig, (ax,) = report.figure(1, width=6.0)
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["clients_group"] for r in rows], 0.4, label="clients' genres")
  ax.bar(x + 0.2, [r["server_group"] for r in rows], 0.4, label="server's genres")
  ax.errorbar(x, [r["recall@10"] for r in rows], [r["recall@10_se"] for r in rows],
              fmt="ko", label="all users")
  ax.set_xticks(x, [r["setting"] for r in rows], rotation=20, fontsize=8)
  ax.set(ylabel="Global Recall@10", title="mixed FL: datacenter + federated data")
  ax.legend(fontsize=8)
  report.save(fig, out)


def main(argv):
  del argv
  base = _CONFIG.value
  base.retrieval.loss = "global_softmax"
  out = _OUT.value
  workdir = _WORKDIR.value or os.path.join("runs", os.path.basename(out))
  mesh = mesh_lib.make_mesh(base.mesh)
  results = {name: run_setting(name, report.with_overrides(base, overrides), workdir,
                               mesh)
             for name, overrides in settings().items()}
  rows = []
  for name, (row, clients, recall) in results.items():
    for reference, key in (("oracle", "minus_oracle"), ("FL oracle", "minus_fl_oracle")):
      if reference in results and name != reference:
        assert np.array_equal(clients, results[reference][1])  # the same events
        diff = recall - results[reference][2]
        row.update({key: float(diff.mean()),
                    f"{key}_se": float(diff.std(ddof=1) / np.sqrt(len(diff)))})
    rows.append(row)
  meta = {"data": base.data.source, "device": report.device(),
          "rounds": base.train.num_steps,
          "clients_per_round": base.federated.clients_per_round,
          "central_epochs": _CENTRAL_EPOCHS.value,
          "central_steps": _CENTRAL_STEPS.value,
          "central_learning_rate": _CENTRAL_LR.value,
          "server_batch_size": base.federated.datacenter.server_batch_size,
          "command": "python -m benchmarks.mixed_fl " + " ".join(sys.argv[1:])}
  write(out, rows, meta)
  print(open(out + ".md").read())


if __name__ == "__main__":
  app.run(main)
