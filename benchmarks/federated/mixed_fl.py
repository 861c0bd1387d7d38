"""Mixed FL with datacenter data (Augenstein et al., arXiv 2205.13655,
experiment A): the clients see one distribution, the server holds data of
another, and the model is scored on their mixture.

  python -m benchmarks.federated.mixed_fl --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/mixed_fl_ml100k

The retrieval dual encoder of `--config` (configs/retrieval.py, global
softmax). Users split by favourite genre (`federated.datacenter.users=genre`:
genres ranked by popularity, odd ranks to the server): the federated clients
are the users of the even-ranked genres, the server holds the training
examples of the others. Every setting is scored on the held-out events of the
participating users (the inference distribution: both groups), per client:

- oracle: centralised training on both groups' examples;
- FL oracle: federated training with every user a client (the inference
  distribution, trained the way the mixed runs are: the same rounds, cohort
  and optimisers);
- centralised only: centralised training on the server's examples;
- FL only: federated training on the clients, the server's data unused;
- parallel, one_way, two_way: federated training plus the server's loss
  (the mean example loss of `server_batch_size` of its examples a round),
  joined by each mixed-FL algorithm (federated/algorithms.py).

Validation-only selection: the participating users are split once into
validation and test users (harness.user_halves, by config.seed). Each mixed
setting trains once per `--server_batch_sizes` candidate and keeps the one
with the best validation Recall@10; every figure of the table is on the test
users, compared client by client with the oracles (mean paired difference and
its standard error over test clients).
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks import harness, plots
from benchmarks.federated import common
from infra import results

MIXINGS = ("parallel", "one_way", "two_way")
BATCH_FIELD = "federated.datacenter.server_batch_size"
FLAGS = (
    harness.Flag("central_epochs", 30, "Epochs (rounds) of the centralised runs."),
    harness.Flag("central_steps", 5, "Server SGD steps on its loss a round "
                 "(parallel, two_way)."),
    harness.Flag("central_learning_rate", 0.5, "Their learning rate (the clients' own)."),
    harness.Flag("server_batch_sizes", ["64", "2048"], "Candidates for the server's "
                 "batch of the mixed settings, chosen on validation users."),
    harness.Flag("only", [], "Run only these settings (default: all)."),
)


def settings(args) -> dict[str, dict]:
  """name -> config overrides (the mixed settings' server batch aside)."""
  central = common.centralised(args.central_epochs)
  split = {"federated.datacenter.users": "genre"}
  out = {"oracle": central, "FL oracle": {},
         "centralised only": {**central, **split, "federated.datacenter.swap": True},
         "FL only": split}
  for mixing in MIXINGS:
    out[mixing] = {**split, "federated.mixed.server_loss": "datacenter",
                   "federated.mixed.weight": 1.0,
                   "federated.mixed.algorithm": mixing,
                   "federated.mixed.central_steps": args.central_steps,
                   "federated.mixed.central_learning_rate": args.central_learning_rate}
  return {k: v for k, v in out.items() if not args.only or k in args.only}


def train_and_score(name: str, config, workdir: str, mesh) -> dict:
  """{"clients", "recall" (per client), "server_group" (bool per client),
  "rounds"} of one trained setting."""
  from federated import partition, workflow
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name.replace(" ", "_")), mesh, f)
  clients, recall = common.client_scores(f, state, config, mesh)
  at_server = partition.datacenter_users("genre", f.timelines)
  user_of_client = {int(c): u for u, c in enumerate(f.split.client_of_user)}
  server_group = np.asarray([at_server[user_of_client[int(c)]] for c in clients])
  print(f"[mixed_fl] {name}: Recall@10 {recall.mean():.4f} over {len(clients)} "
        "clients", flush=True)
  return {"clients": clients, "recall": recall, "server_group": server_group,
          "rounds": int(state.step)}


def test_row(name: str, scored: dict, references: dict, test: np.ndarray) -> dict:
  """The table's row of one setting: test users only."""
  recall, group = scored["recall"][test], scored["server_group"][test]
  mean, stderr = harness.mean_and_stderr(recall)
  row = {"setting": name, "rounds": scored["rounds"], "recall@10": mean,
         "recall@10_se": stderr, "test_users": int(test.sum()),
         "clients_group": float(recall[~group].mean()),
         "server_group": float(recall[group].mean())}
  for reference, key in (("oracle", "minus_oracle"), ("FL oracle", "minus_fl_oracle")):
    if reference in references and name != reference:
      if not np.array_equal(scored["clients"], references[reference]["clients"]):
        raise ValueError(f"{name} and {reference} scored different clients")
      diff, diff_se = harness.mean_and_stderr(
          recall - references[reference]["recall"][test])
      row.update({key: diff, f"{key}_se": diff_se})
  return row


def measure(run: harness.Run) -> dict:
  base = harness.with_overrides(run.config, {"retrieval.loss": "global_softmax"})
  batches = [int(b) for b in run.args.server_batch_sizes]
  scored = {}
  for name, overrides in settings(run.args).items():
    if name not in MIXINGS:
      scored[name] = {None: train_and_score(name, harness.with_overrides(
          base, overrides), run.workdir, run.mesh())}
      continue
    scored[name] = {b: train_and_score(f"{name} b{b}", harness.with_overrides(
        base, {**overrides, BATCH_FIELD: b}), run.workdir, run.mesh()) for b in batches}
  any_run = next(s for by_batch in scored.values() for s in by_batch.values())
  valid, test = harness.user_halves(any_run["clients"], base.seed)
  references = {name: by_batch[None] for name, by_batch in scored.items()
                if None in by_batch}
  rows = []
  for name, by_batch in scored.items():
    chosen = None
    if name in MIXINGS:
      chosen, _ = run.choose(name, BATCH_FIELD, "Recall@10 of the validation users",
                             {b: harness.Scored(s["recall"][valid].mean(), None)
                              for b, s in by_batch.items()})
    row = test_row(name, by_batch[chosen], references, test)
    if chosen is not None:
      row["server_batch_size"] = chosen
    rows.append(row)
  meta = {"data": base.data.source, "rounds": base.train.num_steps,
          "clients_per_round": base.federated.clients_per_round,
          "central_epochs": run.args.central_epochs,
          "central_steps": run.args.central_steps,
          "central_learning_rate": run.args.central_learning_rate,
          "server_batch_sizes": batches, "valid_users": int(valid.sum())}
  return {"meta": meta, "rows": rows}


def present(payload: dict):
  meta, rows = payload["meta"], payload["rows"]
  lines = [f"Mixed FL with datacenter data, {meta['data']}. Federated: "
           f"{meta['rounds']} rounds of {meta['clients_per_round']} clients; "
           f"centralised: {meta['central_epochs']} epochs; server: "
           f"{meta['central_steps']} SGD steps at {meta['central_learning_rate']} "
           f"a round, on a batch chosen among {meta['server_batch_sizes']} on "
           f"{meta['valid_users']} validation users. Global Recall@10 of the test "
           f"users' held-out events ({rows[0]['test_users']} users), mean over "
           "users; the differences to the oracles paired user by user.", ""]
  lines += results.markdown_table(
      ["setting", "server batch (chosen on valid)", "Recall@10 (test users)",
       "users of the clients' genres", "users of the server's genres",
       "minus the oracle (± s.e.)", "minus the FL oracle (± s.e.)"],
      [[r["setting"], r.get("server_batch_size", "-"),
        f"{r['recall@10']:.4f} ± {r['recall@10_se']:.4f}",
        f"{r['clients_group']:.4f}", f"{r['server_group']:.4f}",
        _paired(r, "minus_oracle"), _paired(r, "minus_fl_oracle")] for r in rows])
  return lines, plot(rows)


def _paired(row: dict, key: str) -> str:
  return f"{row[key]:+.4f} ± {row[key + '_se']:.4f}" if key in row else "-"


def plot(rows: list[dict]):
  fig, (ax,) = plots.panels(1, width=7.0)
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["clients_group"] for r in rows], 0.4, label="clients' genres")
  ax.bar(x + 0.2, [r["server_group"] for r in rows], 0.4, label="server's genres")
  ax.errorbar(x, [r["recall@10"] for r in rows], [r["recall@10_se"] for r in rows],
              fmt="ko", label="all test users")
  ax.set_xticks(x, [r["setting"] for r in rows], rotation=20, fontsize=8)
  ax.set(ylabel="Global Recall@10 (test users)",
         title="mixed FL: datacenter + federated data")
  ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/retrieval.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
