"""Federated retrieval with limited negatives, and the global spreadout moved
to the server (mixed FL, offloading).

  python -m benchmarks.retrieval --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --out benchmarks/retrieval_ml100k

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

Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from benchmarks import report
from federated import cost, workflow
from infra import mesh as mesh_lib
from infra import results as results_lib
from userllm.models import dual_encoder as de

_CONFIG = config_flags.DEFINE_config_file("config", "configs/retrieval.py",
                                          "The retrieval experiment config.")
_OUT = flags.DEFINE_string("out", "benchmarks/retrieval", "Output path prefix.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Runs go here (default runs/<out name>).")
_CENTRAL_EPOCHS = flags.DEFINE_integer("central_epochs", 30, "Epochs (rounds) of "
                                       "the centralised runs.")
_SPREADOUT = flags.DEFINE_float("spreadout", 0.1, "lambda of the global spreadout.")
_CENTRAL_STEPS = flags.DEFINE_integer("central_steps", 1, "Server SGD steps on the "
                                      "spreadout a round (mixed FL).")
# about what the clients' local steps give the spreadout when they compute it:
# client learning rate 0.5 x ~5 local steps (84 examples in batches of 16)
_CENTRAL_LR = flags.DEFINE_float("central_learning_rate", 2.5, "Their learning rate.")
_ONLY = flags.DEFINE_list("only", [], "Run only these settings (default: all).")
_RENDER = flags.DEFINE_bool("render", False, "Only re-draw <out>.png and re-write "
                            "<out>.md from <out>.json.")

KEY = "out_of_sample/model/retrieval/{}_mean"
LOSSES = {"batch softmax": {"retrieval.loss": "batch_softmax"},
          "global softmax": {"retrieval.loss": "global_softmax"},
          "hinge + global spreadout": {"retrieval.loss": "hinge"}}
TRAININGS = ("centralised", "federated", "iid")


def settings(base) -> dict[str, dict]:
  """name -> config overrides of every setting."""
  central = report.centralised(_CENTRAL_EPOCHS.value)
  out = {}
  for loss, overrides in LOSSES.items():
    spread = ({"retrieval.spreadout.table": _SPREADOUT.value}
              if "spreadout" in loss else {})
    out[f"{loss} / centralised"] = {**overrides, **spread, **central}
    out[f"{loss} / federated"] = {**overrides, **spread}
    out[f"{loss} / iid"] = {**overrides, **spread, "federated.pooling": "iid"}
  out["hinge + global spreadout at the server / federated"] = {
      "retrieval.loss": "hinge", "federated.mixed.server_loss": "global_spreadout",
      "federated.mixed.weight": _SPREADOUT.value,
      "federated.mixed.algorithm": "parallel",
      "federated.mixed.central_steps": _CENTRAL_STEPS.value,
      "federated.mixed.central_learning_rate": _CENTRAL_LR.value}
  return {k: v for k, v in out.items() if not _ONLY.value or k in _ONLY.value}


def batch_recall_at_1(f: workflow.Federation, state, batch: int = 16) -> float:
  """Batch Recall@1 over the participating users' held-out events in
  consecutive batches of `batch` (the context of each event's history)."""
  from data import sequences
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


def write(out: str, rows: list[dict], meta: dict) -> None:
  lines = [f"Federated retrieval, {meta['data']}, on {meta['device']}. Command: "
           f"`{meta['command']}`. Federated: {meta['rounds']} rounds of "
           f"{meta['clients_per_round']} clients; centralised: "
           f"{meta['central_epochs']} epochs. Popularity's Recall@10: "
           f"{rows[0]['popularity_recall@10']:.3f}.", ""]
  lines += results_lib.markdown_table(
      ["setting", "Global Recall@1", "Recall@5", "Recall@10 (± s.e.)",
       "Batch Recall@1", "KiB down / up per client-round", "client MFLOPs / round"],
      [[r["setting"], f"{r['recall@1']:.4f}", f"{r['recall@5']:.4f}",
        f"{r['recall@10']:.4f} ± {r['recall@10_se']:.4f}",
        f"{r['batch_recall@1']:.3f}",
        f"{r['client_bytes_down'] / 1024:.1f} / {r['client_bytes_up'] / 1024:.1f}",
        f"{r['client_flops'] / 1e6:.1f}"] for r in rows])
  results_lib.write_report(out, {"meta": meta, "rows": rows}, lines)
  plot(out, rows)


def plot(out: str, rows: list[dict]) -> None:
  fig, (ax,) = report.figure(1, width=8.0, height=4.0)
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
  report.save(fig, out)


def main(argv):
  del argv
  base = _CONFIG.value
  out = _OUT.value
  if _RENDER.value:
    with open(out + ".json") as f:
      saved = json.load(f)
    write(out, saved["rows"], saved["meta"])
    return
  workdir = _WORKDIR.value or os.path.join("runs", os.path.basename(out))
  mesh = mesh_lib.make_mesh(base.mesh)
  rows = [run_setting(name, report.with_overrides(base, overrides), workdir, mesh)
          for name, overrides in settings(base).items()]
  meta = {"data": base.data.source, "device": report.device(),
          "rounds": base.train.num_steps,
          "clients_per_round": base.federated.clients_per_round,
          "central_epochs": _CENTRAL_EPOCHS.value, "spreadout": _SPREADOUT.value,
          "command": "python -m benchmarks.retrieval " + " ".join(sys.argv[1:])}
  write(out, rows, meta)
  print(open(out + ".md").read())


if __name__ == "__main__":
  app.run(main)
