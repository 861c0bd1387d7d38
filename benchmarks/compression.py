"""Update compression on real federated updates: the error of each compressor
at equal bits, the heavy tail that makes truncation pay, and Recall@10 after
training with each.

  python -m benchmarks.compression --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --out benchmarks/compression_ml100k

1. Error: one cohort's client deltas (the next-item model of `--config`, by
   default configs/fedavg.py, at its initialisation and after training
   without compression), each leaf compressed by QSGD, truncated-uniform,
   TNQSGD (`--bits`) and top-k (the fraction that sends the same bits), the
   relative squared error of the decoded sum over 8 draws. The tail: the
   kurtosis of the coordinates (Laplace 6, Gaussian 3) and the share of the
   update's squared norm in its largest 1% of coordinates.
2. Utility: the federated workflow trained with each compressor at each of
   `--train_bits`, against uncompressed: out-of-sample Recall@10 (mean over
   clients, with its binomial standard error over held-out events).

Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import report
from federated import attacks, compression, workflow
from infra import mesh as mesh_lib
from infra import results as results_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/fedavg.py",
                                          "The federated experiment config.")
_OUT = flags.DEFINE_string("out", "benchmarks/compression", "Output path prefix.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Runs go here (default runs/<out name>).")
_BITS = flags.DEFINE_list("bits", ["2", "3", "4", "6"], "Bits per coordinate "
                          "for the error table.")
_TRAIN_BITS = flags.DEFINE_list("train_bits", ["2", "4"], "Bits per coordinate "
                                "of the training runs.")

RECALL = "out_of_sample/model/next_item/recall@10_mean"
QUANTISERS = ("qsgd", "truncated_uniform", "tnqsgd")
# (name, scheme, scale): each quantiser with one scale per tensor and per row
# (federated/compression.py), and top-k
VARIANTS = ([(s, s, "tensor") for s in QUANTISERS] + [("topk", "topk", "tensor")]
            + [(f"{s}/row", s, "row") for s in QUANTISERS])
NAMES = [name for name, _, _ in VARIANTS]


def topk_fraction(bits: int, deltas) -> float:
  """The top-k fraction that sends `bits` per coordinate of the largest leaf
  (each kept value costs 32 bits plus its index)."""
  d = max(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(deltas))
  return bits / (32 + math.ceil(math.log2(d)))


def compressor(scheme: str, bits: int, deltas, scale: str = "tensor"
               ) -> compression.Compressor:
  if scheme == "topk":
    return compression.Compressor("topk", fraction=topk_fraction(bits, deltas))
  return compression.Compressor(scheme, bits, scale=scale)


def tail_stats(deltas) -> dict[str, float]:
  """Kurtosis of every client's coordinates, each divided by its leaf's mean
  |g| (pooled), and the squared-norm share of the top 1%."""
  pooled = []
  for x in jax.tree.leaves(deltas):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    scale = np.abs(x).mean(1, keepdims=True)
    pooled.append((x / np.maximum(scale, 1e-30)).ravel())
  g = np.concatenate(pooled)
  g = g[np.isfinite(g)]
  centred = g - g.mean()
  kurtosis = float(np.mean(centred ** 4) / np.mean(centred ** 2) ** 2)
  squares = np.sort(g ** 2)[::-1]
  top = squares[:max(1, len(squares) // 100)].sum() / squares.sum()
  # the survival function P(|g| / mean|g| > x): Laplace's is exp(-x)
  xs = np.linspace(0.0, 30.0, 61)
  magnitudes = np.sort(np.abs(g))
  survival = 1.0 - np.searchsorted(magnitudes, xs, side="right") / len(magnitudes)
  return {"kurtosis": kurtosis, "top1pct_energy": float(top), "coordinates": len(g),
          "survival_x": xs.tolist(), "survival": survival.tolist(),
          "zero_fraction": float(np.mean(g == 0.0))}


def relative_error(comp: compression.Compressor, deltas, draws: int = 8) -> float:
  """Mean over draws of |sum decoded - sum true|^2 / |sum true|^2."""
  total = jax.tree.map(lambda x: x.sum(0), deltas)
  signal = sum(float(jnp.sum(t ** 2)) for t in jax.tree.leaves(total))
  clients = jax.tree.leaves(deltas)[0].shape[0]
  errors = []
  for draw in range(draws):
    keys = jax.random.split(jax.random.PRNGKey(draw), clients)
    decoded, _ = jax.vmap(comp.client)(deltas, keys)
    errors.append(sum(float(jnp.sum((a.sum(0) - b) ** 2)) for a, b in zip(
        jax.tree.leaves(decoded), jax.tree.leaves(total))) / signal)
  return float(np.mean(errors))


def error_rows(stage: str, deltas, bits_list) -> list[dict]:
  rows = []
  for bits in bits_list:
    for name, scheme, scale in VARIANTS:
      comp = compressor(scheme, bits, deltas, scale)
      keys = jax.random.split(jax.random.PRNGKey(0), 1)
      _, sent = comp.client(jax.tree.map(lambda x: x[0], deltas), keys[0])
      rows.append({"stage": stage, "scheme": name, "bits": bits,
                   "bits_per_client": float(sent),
                   "relative_error": relative_error(comp, deltas)})
  return rows


def train(config, name: str, workdir: str, mesh):
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name), mesh, f)
  return f, state, workflow.evaluate(config, mesh, f, state)


def write(out: str, errors, tails, runs, meta) -> None:
  lines = [f"Update compression, {meta['data']}, {meta['rounds']} rounds of "
           f"{meta['clients_per_round']} clients ({meta['algorithm']}), on "
           f"{meta['device']}. Command: `{meta['command']}`.", ""]
  for stage, tail in tails.items():
    lines.append(f"- updates at {stage}: kurtosis {tail['kurtosis']:.1f} (Laplace 6, "
                 f"Gaussian 3); the largest 1% of coordinates hold "
                 f"{100 * tail['top1pct_energy']:.0f}% of the squared norm; "
                 f"{100 * tail['zero_fraction']:.0f}% are exactly 0.")
  lines += ["", "Relative squared error of the decoded cohort sum (mean of 8 "
            "draws):", ""]
  for stage in tails:
    header = ["bits / coordinate"] + NAMES
    cells = []
    for bits in sorted({r["bits"] for r in errors}):
      by = {r["scheme"]: r for r in errors if r["stage"] == stage and r["bits"] == bits}
      cells.append([bits] + [f"{by[s]['relative_error']:.3g}" for s in NAMES])
    lines += [f"At {stage}:", ""] + results_lib.markdown_table(header, cells) + [""]
  events = runs[0]["events"]
  lines += [f"Training with each compressor (Recall@10 of participating clients' "
            f"held-out events, binomial standard error about "
            f"{(runs[0]['recall@10'] * (1 - runs[0]['recall@10']) / events) ** 0.5:.3f}"
            f" over {events:.0f} events):", ""]
  lines += results_lib.markdown_table(
      ["compressor", "bits / coordinate", "bits per client per round",
       "bits sent / coordinate", "Recall@10", "mean compression error"],
      [[r["scheme"], r["bits"], f"{r['bits_per_client']:,.0f}",
        f"{r['bits_per_client'] / meta['parameters']:.2f}",
        f"{r['recall@10']:.3f}", "-" if r["compression_error"] is None else
        f"{r['compression_error']:.3g}"] for r in runs])
  results_lib.write_report(out, {"meta": meta, "errors": errors, "tails": tails,
                                 "runs": runs}, lines)
  plot(out, errors, runs, tails)


def _style(name: str) -> str:
  return "s--" if name.endswith("/row") else "o-"


def plot(out: str, errors, runs, tails) -> None:
  fig, (tail_ax, left, right) = report.figure(3)
  for stage, tail in tails.items():
    tail_ax.plot(tail["survival_x"], np.maximum(tail["survival"], 1e-9), label=stage)
  xs = np.asarray(next(iter(tails.values()))["survival_x"])
  tail_ax.plot(xs, np.exp(-xs), "k--", label="Laplace, same mean |g|")
  tail_ax.set(yscale="log", ylim=(1e-7, 1.5), xlabel="|g| / mean |g|",
              ylabel="P(larger)", title="tail of the client updates")
  stage = list(tails)[-1]
  for scheme in NAMES:
    rows = [r for r in errors if r["stage"] == stage and r["scheme"] == scheme]
    left.plot([r["bits"] for r in rows], [r["relative_error"] for r in rows], _style(scheme),
              label=scheme)
  left.set(yscale="log", xlabel="bits per coordinate",
           ylabel="relative error of the sum", title=f"error on real updates ({stage})")
  base = runs[0]["recall@10"]
  for scheme in NAMES:
    rows = [r for r in runs if r["scheme"] == scheme]
    right.plot([r["bits"] for r in rows], [r["recall@10"] for r in rows], _style(scheme),
               label=scheme)
  right.axhline(base, color="gray", ls="--", label="32-bit")
  right.set(xlabel="bits per coordinate", ylabel="Recall@10", title="after training")
  for ax in (tail_ax, left, right):
    ax.legend(fontsize=8)
  report.save(fig, out)


def logged_metrics(run_dir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_record(name, scheme, bits, metrics, bits_per_client, error):
  return {"run": name, "scheme": scheme, "bits": bits, "recall@10": metrics[RECALL],
          "events": metrics["out_of_sample/model/next_item/events"],
          "bits_per_client": bits_per_client, "compression_error": error}


def main(argv):
  del argv
  base = _CONFIG.value
  out = _OUT.value
  workdir = _WORKDIR.value or os.path.join("runs", os.path.basename(out))
  mesh = mesh_lib.make_mesh(base.mesh)
  f, state, metrics = train(base, "none", workdir, mesh)
  initial = workflow.init_state(f.task, f.client_spec, f.server_spec, base.seed,
                                len(f.dataset), mesh)[0]
  cohort = base.federated.clients_per_round
  stages = {stage: attacks.cohort_updates(f.task.example_loss, f.client_spec,
                                          f.dataset, s, cohort, base.seed)[0]
            for stage, s in (("initialisation", initial),
                             ("the end of training", state))}
  bits_list = [int(b) for b in _BITS.value]
  errors = [row for stage, deltas in stages.items()
            for row in error_rows(stage, deltas, bits_list)]
  tails = {stage: tail_stats(deltas) for stage, deltas in stages.items()}
  params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(stages[
      "initialisation"]))
  runs = [run_record("none", "none", 32, metrics, 32.0 * params, None)]
  for bits in (int(b) for b in _TRAIN_BITS.value):
    for label, scheme, scale in VARIANTS:
      config = copy.deepcopy(base)
      comp = compressor(scheme, bits, stages["initialisation"], scale)
      config.federated.compression.update(scheme=scheme, bits=bits,
                                          fraction=comp.fraction, scale=scale)
      name = f"{label.replace('/', '_')}_{bits}"
      _, _, run_metrics = train(config, name, workdir, mesh)
      train_lines = [m for m in logged_metrics(os.path.join(workdir, name))
                     if "compression_error" in m]
      runs.append(run_record(
          name, label, bits, run_metrics,
          float(np.mean([m["bits_per_client"] for m in train_lines])) if train_lines
          else None,
          float(np.mean([m["compression_error"] for m in train_lines]))
          if train_lines else None))
      print(f"[compression] {runs[-1]}", flush=True)
  meta = {"data": base.data.source, "device": report.device(),
          "rounds": base.train.num_steps, "clients_per_round": cohort,
          "algorithm": base.federated.algorithm, "parameters": params,
          "command": "python -m benchmarks.compression " + " ".join(sys.argv[1:])}
  write(out, errors, tails, runs, meta)
  print(open(out + ".md").read())


if __name__ == "__main__":
  app.run(main)
