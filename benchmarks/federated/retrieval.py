"""Federated retrieval with limited negatives, and the global spreadout moved
to the server (mixed FL, offloading).

  python -m benchmarks.federated.retrieval --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/retrieval_ml100k

Every setting trains the dual encoder of `--config` (configs/retrieval.py)
through the federated workflow, and is scored by Global Recall@1/5/10 of the
participating users' held-out next events among every item (mean over
clients; the binomial standard error over events), and Batch Recall@1 (the
target among the labels of its evaluation batch of 16 held-out events):

- centralised (`pooling=central`: all training examples in one client, one
  client a round, the server copying it: plain minibatch training);
- federated: one client per user (its own items are its batch's negatives);
- IID control (`pooling=iid`: the same clients and counts, examples dealt at
  random: diverse negatives, the same federated optimisation);
for batch softmax, global softmax and hinge + global spreadout; and the
global spreadout computed at the server instead (mixed FL, parallel: the
server's SGD steps on lambda x the spreadout, `--central_steps` steps at
`--central_learning_rate`).

Client cost per round: bytes down and up (the item-table rows a client reads,
and sends updates for, plus the dense layer; every row when its loss or a
spreadout reads the whole table), and the FLOPs of one client's update as
XLA compiles it (cost analysis, the client padded to the largest).

No setting is chosen: every row is reported as run.
"""

from __future__ import annotations

import os

import numpy as np
from flax import linen as nn

from benchmarks import harness, plots
from benchmarks.federated import common
from infra import results

FLAGS = (
    harness.Flag("central_epochs", 30, "Epochs (rounds) of the centralised runs."),
    harness.Flag("spreadout", 0.1, "lambda of the global spreadout."),
    harness.Flag("central_steps", 1, "Server SGD steps on the spreadout a round "
                 "(mixed FL)."),
    # about what the clients' local steps give the spreadout when they compute
    # it: client learning rate 0.5 x ~5 local steps (84 examples in batches of 16)
    harness.Flag("central_learning_rate", 2.5, "Their learning rate."),
    harness.Flag("only", [], "Run only these settings (default: all)."),
)
KEY = "out_of_sample/model/retrieval/{}_mean"
LOSSES = {"batch softmax": {"retrieval.loss": "batch_softmax"},
          "global softmax": {"retrieval.loss": "global_softmax"},
          "hinge + global spreadout": {"retrieval.loss": "hinge"}}


def settings(args) -> dict[str, dict]:
  """name -> config overrides of every setting."""
  central = common.centralised(args.central_epochs)
  out = {}
  for loss, overrides in LOSSES.items():
    spread = ({"retrieval.spreadout.table": args.spreadout}
              if "spreadout" in loss else {})
    out[f"{loss} / centralised"] = {**overrides, **spread, **central}
    out[f"{loss} / federated"] = {**overrides, **spread}
    out[f"{loss} / iid"] = {**overrides, **spread, "federated.pooling": "iid"}
  out["hinge + global spreadout at the server / federated"] = {
      "retrieval.loss": "hinge", "federated.mixed.server_loss": "global_spreadout",
      "federated.mixed.weight": args.spreadout,
      "federated.mixed.algorithm": "parallel",
      "federated.mixed.central_steps": args.central_steps,
      "federated.mixed.central_learning_rate": args.central_learning_rate}
  return {k: v for k, v in out.items() if not args.only or k in args.only}


def batch_recall_at_1(f, state, batch: int = 16) -> float:
  """Batch Recall@1 over the participating users' held-out events in
  consecutive batches of `batch` (the context of each event's history)."""
  from data import sequences
  from userllm.models import dual_encoder as de
  params = nn.meta.unbox(state.params)
  held_out = f.split.out_of_sample
  inputs, _ = sequences.history_inputs(f.timelines, held_out, f.task.cfg.context_len)
  model = f.task.model
  context = model.apply({"params": params}, inputs, method=model.context)
  label = model.apply({"params": params}, held_out.targets, method=model.label)
  usable = (len(inputs) // batch) * batch
  return float(np.mean([de.batch_recall(context[i:i + batch], label[i:i + batch], 1)
                        for i in range(0, usable, batch)]))


def run_setting(name: str, config, workdir: str, mesh) -> dict:
  from federated import cost, workflow
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name.replace(" ", "_").replace(
      "/", "").replace("+", "plus")), mesh, f)
  metrics = workflow.evaluate(config, mesh, f, state)
  events = metrics["out_of_sample/model/retrieval/events"]
  row = {"setting": name, "rounds": int(state.step), "events": events,
         "batch_recall@1": batch_recall_at_1(f, state),
         **cost.round_cost(f.task, f.client_spec, state, f.dataset)}
  for k in (1, 5, 10):
    value = metrics[KEY.format(f"recall@{k}")]
    row[f"recall@{k}"] = value
    row[f"recall@{k}_se"] = float(np.sqrt(value * (1 - value) / events))
  row["popularity_recall@10"] = metrics[
      "out_of_sample/popularity/retrieval/recall@10_mean"]
  if not all(np.isfinite(row[f"recall@{k}"]) for k in (1, 5, 10)):
    raise FloatingPointError(f"{name}: non-finite recall")
  print(f"[retrieval] {row}", flush=True)
  return row


def measure(run: harness.Run) -> dict:
  base = run.config
  rows = [run_setting(name, harness.with_overrides(base, overrides), run.workdir,
                      run.mesh())
          for name, overrides in settings(run.args).items()]
  meta = {"data": base.data.source, "rounds": base.train.num_steps,
          "clients_per_round": base.federated.clients_per_round,
          "central_epochs": run.args.central_epochs, "spreadout": run.args.spreadout}
  return {"meta": meta, "rows": rows}


def present(payload: dict):
  meta, rows = payload["meta"], payload["rows"]
  lines = [f"Federated retrieval, {meta['data']}. Federated: {meta['rounds']} rounds "
           f"of {meta['clients_per_round']} clients; centralised: "
           f"{meta['central_epochs']} epochs. Popularity's Recall@10: "
           f"{rows[0]['popularity_recall@10']:.3f}.", ""]
  lines += results.markdown_table(
      ["setting", "Global Recall@1", "Recall@5", "Recall@10 (± s.e.)",
       "Batch Recall@1", "KiB down / up per client-round", "client MFLOPs / round"],
      [[r["setting"], f"{r['recall@1']:.4f}", f"{r['recall@5']:.4f}",
        f"{r['recall@10']:.4f} ± {r['recall@10_se']:.4f}",
        f"{r['batch_recall@1']:.3f}",
        f"{r['client_bytes_down'] / 1024:.1f} / {r['client_bytes_up'] / 1024:.1f}",
        f"{r['client_flops'] / 1e6:.1f}"] for r in rows])
  return lines, plot(rows)


def plot(rows: list[dict]):
  fig, (ax,) = plots.panels(1, width=8.0, height=4.0)
  names = [r["setting"] for r in rows]
  y = np.arange(len(rows))
  ax.barh(y, [r["recall@10"] for r in rows], xerr=[r["recall@10_se"] for r in rows],
          color=["C0" if "centralised" in n else "C2" if "iid" in n else "C1"
                 for n in names])
  ax.set_yticks(y, names, fontsize=7)
  ax.invert_yaxis()
  ax.axvline(rows[0]["popularity_recall@10"], color="gray", ls="--", label="popularity")
  ax.set(xlabel="Global Recall@10 (± s.e.)",
         title="blue: centralised, orange: federated, green: IID control")
  ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/retrieval.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
