"""Where FELLRec's dynamic balance goes (issue 41): its weights round by
round, and the variants tried, against FedAvg-LoRA on the same base.

  python -m benchmarks.federated.fellrec_balance \\
    --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/fellrec_balance_ml100k

The setting is benchmarks/federated/federated_llm.py's (the same config,
clients, base warm-up and validation / test clients), at the base length and
client learning rate that benchmark chose on validation clients (500 steps,
0.01 for both FedAvg-LoRA and FELLRec). Every round is logged
(`train.log_every` = 1), so the balance metrics the round reports
(federated/personalisation.py balance_metrics) are per round:
`balance_w_mean` / `balance_w_min` (the share of a client's model taken from
the others, over the clients of the round) and `balance_attention_max` (a
client's largest attention weight, averaged; 1 / (n - 1) when uniform).

FELLRec's heating w_i = tanh(alpha / l_i ** (r + 1 / beta)) with l the
softmax of the cohort's losses: since l_i <= 1, w_i >= tanh(alpha) for
every client in every round, and since the l_i sum to 1, at most one
client has l_i > 1/2. The variants tried: alpha (the paper's default 0.7
and smaller), and `include_self` (the attention keeps a share of the
client's own update). The variant reported on test clients is the one with
the best validation mean; every variant's validation mean and its weights
over rounds are in the artifact.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness, plots, report
from benchmarks.federated import federated_llm as fl
from infra import results

FLAGS = (
    harness.Flag("base_steps", ["500"], "The base's warm-up length "
                 "(federated_llm's choice on validation clients)."),
    harness.Flag("learning_rate", 0.01, "Client learning rate (federated_llm's "
                 "choice for FedAvg-LoRA and FELLRec)."),
    harness.Flag("alphas", ["0.7", "0.1", "0.01"], "FELLRec's alpha values."),
    harness.Flag("include_self", ["false", "true"], "FELLRec's include_self values."),
)
METRIC = fl.METRIC
BALANCE = ("balance_w_mean", "balance_w_min", "balance_attention_max",
           "balance_own_kept")


def variant_name(alpha: float, include_self: bool) -> str:
  return f"fellrec_a{alpha:g}" + ("_self" if include_self else "")


def weights_over_rounds(workdir: str) -> dict[str, list[float]]:
  """{metric: [per round]} of the balance metrics in a run's metrics.jsonl."""
  rows = [r for r in report.read_metrics(workdir) if "balance_w_mean" in r]
  rows = sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])
  return {"round": [r["step"] for r in rows],
          **{k: [float(r[k]) for r in rows] for k in BALANCE}}


def measure(run: harness.Run) -> dict:
  config = harness.with_overrides(run.config, {**fl.SHARED, "train.log_every": 1})
  mesh = run.mesh()
  steps, cfg, root, base, base_row, popularity = fl.choose_base(run, config, mesh)
  lr = float(run.args.learning_rate)
  reference = fl.run_method("fedavg_lora", cfg, root, base, mesh, lr).test
  candidates, curves = {}, {}
  for alpha in (float(a) for a in run.args.alphas):
    for include_self in (s.lower() == "true" for s in run.args.include_self):
      name = variant_name(alpha, include_self)
      variant = harness.with_overrides(cfg, {
          "federated.fellrec.alpha": alpha,
          "federated.fellrec.include_self": include_self})
      tag = name.removeprefix("fellrec")
      candidates[name] = fl.run_method("fellrec_balance", variant, root, base,
                                       mesh, lr, tag=tag)
      curves[name] = weights_over_rounds(
          f"{root}/fellrec_balance{tag}_lr{lr:g}/federated")
  chosen, test = run.choose("fellrec", "federated.fellrec (alpha, include_self)",
                            f"mean per-client {METRIC}", candidates)
  valid = {name: float(s.valid) for name, s in candidates.items()}
  return {"meta": {"data": cfg.data.source, "base_steps": steps,
                   "rounds": cfg.train.num_steps, "learning_rate": lr,
                   "clients_per_round": cfg.federated.clients_per_round,
                   "beta": cfg.federated.fellrec.beta,
                   "temperature": cfg.federated.fellrec.temperature},
          "fedavg_lora": reference, "chosen": chosen, "fellrec": test,
          "paired": fl.paired(reference, test), "valid": valid,
          "curves": curves, "popularity": popularity, "base": base_row}


def present(payload: dict):
  meta, curves = payload["meta"], payload["curves"]
  lines = [f"FELLRec's dynamic balance on {meta['data']}: {meta['rounds']} rounds "
           f"of {meta['clients_per_round']} clients (users), client learning rate "
           f"{meta['learning_rate']:g}, beta {meta['beta']:g}, temperature "
           f"{meta['temperature']:g}; the base warmed up {meta['base_steps']} "
           "steps (benchmarks/federated/federated_llm.py's choices).", "",
           "Balance over rounds (clients of each round): w is the share of a "
           "client's model taken from the others' updates.", ""]
  header = ["variant", f"valid mean {METRIC}", "w mean (rounds 1-10)",
            "w mean (all rounds)", "w min (all rounds)", "rounds with a client at w <= 0.5",
            "attention max (mean)"]
  cells = []
  for name, c in curves.items():
    w = np.asarray(c["balance_w_mean"])
    cells.append([name + (" (chosen)" if name == payload["chosen"] else ""),
                  f"{payload['valid'][name]:.4f}", f"{w[:10].mean():.3f}",
                  f"{w.mean():.3f}", f"{min(c['balance_w_min']):.3f}",
                  f"{int(np.sum(np.asarray(c['balance_own_kept']) > 0))}",
                  f"{np.mean(c['balance_attention_max']):.3f}"])
  lines += results.markdown_table(header, cells)
  f, r, p = payload["fellrec"], payload["fedavg_lora"], payload["paired"]
  lines += ["", f"Test clients ({f['clients']}), per-client {METRIC}, +- one "
            "standard error over clients:", ""]
  lines += results.markdown_table(
      ["method", "mean", "p10", "p50", "p90", "spread beyond noise",
       "vs FedAvg-LoRA (paired)"],
      [["FedAvg-LoRA", f"{r['mean']:.4f} +- {r['mean_se']:.4f}",
        *(f"{r[k]:.3f}" for k in ("p10", "p50", "p90")), f"{r['excess_std']:.3f}", "-"],
       [f"FELLRec {payload['chosen']}", f"{f['mean']:.4f} +- {f['mean_se']:.4f}",
        *(f"{f[k]:.3f}" for k in ("p10", "p50", "p90")), f"{f['excess_std']:.3f}",
        f"{p['mean_diff']:+.4f} +- {p['mean_diff_se']:.4f}"]])
  return lines, plot(payload)


def plot(payload: dict):
  fig, (w_ax, attention_ax) = plots.panels(2)
  for name, c in payload["curves"].items():
    w_ax.plot(c["round"], c["balance_w_mean"], label=name)
    attention_ax.plot(c["round"], c["balance_attention_max"], label=name)
  w_ax.set(xlabel="round", ylabel="mean w (share from the others)",
           title="FELLRec's heating weights")
  attention_ax.set(xlabel="round", ylabel="largest attention weight (mean)",
                   title="attention over the cohort")
  w_ax.legend(fontsize=7)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/federated_llm.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
