"""Federated User-LLM (issue 41, item 3): the user encoder, Perceiver,
projector and cross-attention blocks trained by the clients over a frozen
LLM, against the same model trained centrally, and mixed FL's server loss
against FL only on it.

  nice -n 10 python -m benchmarks.federated.federated_user_llm \\
    --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/federated_user_llm_ml100k

Protocol (configs/federated_llm.py with `federated.task=user_llm`,
federated/user_llm_task.py; the clients, the base warm-up, the validation
and test clients and the per-client scoring are
benchmarks/federated/federated_llm.py's):
- The base: the workflow's warm-up (`--base_steps`, federated_llm's choice),
  frozen for every method here.
- centralised_user_llm: the participating clients' examples pooled into one
  client, trained through the same round (one epoch a round) for 1, 2 or as
  many epochs as make the federated run's example passes (`matched`), the
  epochs and batch chosen with the learning rate on validation clients (the
  counterpart), in batches of the clients' 8 or of `--central_batch_sizes`
  (at matched epochs).
- fedavg_user_llm: FedAvg over the user path, every participating user a
  client.
- fl_only_user_llm / mixed_user_llm: mixed FL's datacenter split
  (`federated.datacenter.users=genre`: the users whose favourite genre has an
  odd popularity rank give their data to the server, the rest are clients);
  FL only trains on the clients alone, mixed FL adds the server's loss on its
  users (the task's own loss over the same frozen LLM, `parallel` mixing:
  `--central_steps` SGD steps on a batch of `--server_batch_size` a round,
  the server's rate chosen among `--central_learning_rates` on validation
  clients). Every participating user is scored, the server's users too.
- fedavg_lora: the adapters' task (the history as text in the prompt, LoRA
  rank 4 on q, k, v and the attention output) over the same base, for scale.
- Each method's client learning rate is chosen among `--learning_rates` on
  validation clients; the table gives the test clients, per-client Recall@10
  (mean +- standard error over clients) and paired differences client by
  client.
"""

from __future__ import annotations


from benchmarks import harness, plots
from benchmarks.federated import federated_llm as fl
from infra import results

USER_LLM = {"federated.task": "user_llm", "adapter.kind": "none"}
DATACENTER = {"federated.datacenter.users": "genre"}
METHODS = {  # name -> config overrides on top of USER_LLM
    "centralised_user_llm": {},
    "fedavg_user_llm": {},
    "fl_only_user_llm": DATACENTER,
    "mixed_user_llm": {**DATACENTER, "federated.mixed.server_loss": "datacenter",
                       "federated.mixed.weight": 1.0,
                       "federated.mixed.algorithm": "parallel"},
    "fedavg_lora": {"federated.task": "next_title", "adapter.kind": "lora"},
}
# (name, reference): each row's paired difference, name - reference
PAIRS = (("fedavg_user_llm", "centralised_user_llm"),
         ("mixed_user_llm", "fl_only_user_llm"),
         ("fedavg_user_llm", "fl_only_user_llm"),
         ("fedavg_user_llm", "fedavg_lora"))
FLAGS = (
    harness.Flag("base_steps", ["500"], "The base's warm-up length "
                 "(federated_llm's choice on validation clients)."),
    harness.Flag("learning_rates", ["0.003", "0.01"], "Client learning rates each "
                 "method chooses among on validation clients."),
    harness.Flag("central_epochs", ["1", "2", "matched"], "Epochs of the "
                 "centralised counterpart, chosen among on validation clients "
                 "(matched: as many example passes as the federated run)."),
    harness.Flag("central_batch_sizes", ["128"], "Larger batches the "
                 "centralised counterpart also tries (at matched epochs; the "
                 "federated round's cohort of 32 clients averages about 128 "
                 "examples a round)."),
    harness.Flag("central_learning_rates", ["0.1", "0.5"], "Mixed FL's server SGD "
                 "rates, chosen among on validation clients."),
    harness.Flag("central_steps", 5, "Mixed FL's server SGD steps a round."),
    harness.Flag("server_batch_size", 256, "Mixed FL's server batch a round."),
    harness.Flag("methods", [m for m in METHODS if m != "fedavg_lora"],
                 "Methods to run (fedavg_lora: benchmarks/results/"
                 "federated_llm_ml100k.md has it at these rounds)."),
)
METRIC = fl.METRIC


def candidates_of(name: str, run: harness.Run) -> dict[str, dict]:
  """{label: overrides} of the settings `name` chooses among on validation
  clients (client learning rates; mixed FL's server rate too)."""
  base = {**USER_LLM, **METHODS[name]}
  out = {}
  for lr in run.args.learning_rates:
    if name == "centralised_user_llm":
      for epochs in run.args.central_epochs:
        matched = epochs == "matched"
        out[f"lr{lr}_{epochs}" + ("" if matched else "ep")] = (float(lr), (
            base if matched else {**base, "train.num_steps": int(epochs)}))
      for size in run.args.central_batch_sizes:  # matched epochs
        out[f"lr{lr}_matched_b{size}"] = (float(lr), {
            **base, "federated.client_batch_size": int(size)})
      continue
    if name != "mixed_user_llm":
      out[f"lr{lr}"] = (float(lr), base)
      continue
    for central in run.args.central_learning_rates:
      out[f"lr{lr}_server{central}"] = (float(lr), {
          **base, "federated.mixed.central_learning_rate": float(central),
          "federated.mixed.central_steps": int(run.args.central_steps),
          "federated.datacenter.server_batch_size": int(run.args.server_batch_size)})
  return out


def measure(run: harness.Run) -> dict:
  config = harness.with_overrides(run.config, {**fl.SHARED, **USER_LLM})
  mesh = run.mesh()
  steps, cfg, root, base, base_row, popularity = fl.choose_base(run, config, mesh)
  rows = {}
  for name in (m for m in METHODS if m in run.args.methods):
    scored = {label: fl.run_method(name, cfg, root, base, mesh, lr,
                                   tag=f"_{label}", overrides=overrides)
              for label, (lr, overrides) in candidates_of(name, run).items()}
    _, rows[name] = run.choose(name, "client (and server) learning rate",
                               f"mean per-client {METRIC}", scored)
  pairs = {f"{a} - {b}": fl.paired(rows[b], rows[a]) for a, b in PAIRS
           if a in rows and b in rows}
  u = cfg.userllm
  meta = {"data": cfg.data.source, "base_steps": steps,
          "rounds": cfg.train.num_steps,
          "clients_per_round": cfg.federated.clients_per_round,
          "history_len": cfg.data.history_len, "integration": u.integration,
          "num_latents": u.num_latents, "encoder": cfg.encoder.to_dict(),
          "llm": cfg.llm.to_dict(), "central_steps": int(run.args.central_steps),
          "server_batch_size": int(run.args.server_batch_size)}
  return {"meta": meta, "base": base_row, "popularity": popularity,
          "methods": rows, "paired": pairs,
          "paired_with_base": {n: fl.paired(base_row, r) for n, r in rows.items()}}


def present(payload: dict):
  meta = payload["meta"]
  lines = [f"Federated User-LLM on {meta['data']}: the user encoder "
           f"({meta['encoder']['num_layers']} layers, {meta['encoder']['embed_dim']} "
           f"wide, over the latest {meta['history_len']} item ids), a Perceiver "
           f"to {meta['num_latents']} user tokens, the projector and "
           f"{meta['integration'].replace('_', '-')} blocks trained over a "
           f"frozen {meta['llm']['num_layers']}-layer, {meta['llm']['embed_dim']}-wide "
           f"LLM warmed up for {meta['base_steps']} steps; {meta['rounds']} rounds "
           f"of {meta['clients_per_round']} clients (users). Mixed FL: "
           f"{meta['central_steps']} server SGD steps a round on "
           f"{meta['server_batch_size']} of the server users' examples.", "",
           f"Per-client {METRIC} of the test clients' held-out events (+- one "
           "standard error over clients); settings chosen on validation "
           "clients:", ""]
  selection = payload.get("selection", {})
  header = ["method", "chosen", "mean", "p10", "p50", "p90", "vs the base (paired)",
            "trained params", "bytes up a round"]
  cells = []
  for name, label in (("popularity", "popularity"),
                      ("base", "base LLM, own next title")):
    r = payload[name]
    cells.append([label, "-", f"{r['mean']:.4f} +- {r['mean_se']:.4f}",
                  *(f"{r[k]:.3f}" for k in ("p10", "p50", "p90")), "-", "-", "-"])
  for name, r in payload["methods"].items():
    b = payload["paired_with_base"][name]
    cells.append([name, str(selection.get(name, {}).get("chosen", "-")),
                  f"{r['mean']:.4f} +- {r['mean_se']:.4f}",
                  *(f"{r[k]:.3f}" for k in ("p10", "p50", "p90")),
                  f"{b['mean_diff']:+.4f} +- {b['mean_diff_se']:.4f}",
                  f"{r['trained_parameters']:,}",
                  f"{r['client_bytes_up'] / 1024:.1f} KiB"])
  lines += results.markdown_table(header, cells)
  lines += ["", "Paired differences over the same test clients (+- one standard "
            "error; clients better / worse):", ""]
  lines += results.markdown_table(
      ["difference", "mean", "better / worse"],
      [[name, f"{p['mean_diff']:+.4f} +- {p['mean_diff_se']:.4f}",
        f"{p['clients_better']} / {p['clients_worse']}"]
       for name, p in payload["paired"].items()])
  return lines, plot(payload)


def plot(payload: dict):
  fig, (box_ax, bar_ax) = plots.panels(2)
  names = list(payload["methods"])
  box_ax.boxplot([payload["methods"][n]["per_client"] for n in names],
                 tick_labels=[n.replace("_user_llm", "") for n in names])
  box_ax.set(ylabel=f"per-client {METRIC}", title="test clients")
  box_ax.tick_params(axis="x", rotation=30)
  means = [payload["methods"][n]["mean"] for n in names]
  errors = [payload["methods"][n]["mean_se"] for n in names]
  bar_ax.bar(range(len(names)), means, yerr=errors)
  bar_ax.axhline(payload["popularity"]["mean"], color="grey", linestyle="--",
                 label="popularity")
  bar_ax.set_xticks(range(len(names)), [n.replace("_user_llm", "") for n in names],
                    rotation=30)
  bar_ax.set(ylabel=f"mean {METRIC}", title="mean +- s.e. over test clients")
  bar_ax.legend(fontsize=7)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/federated_llm.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
