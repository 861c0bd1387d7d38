"""Update compression on real federated updates: the error of each compressor
at equal bits, the heavy tail that makes truncation pay, and Recall@10 after
training with each.

  python -m benchmarks.federated.compression --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/compression_ml100k

1. Error: one cohort's client deltas (the next-item model of `--config`, by
   default configs/fedavg.py, at its initialisation and after training
   without compression), each leaf compressed by QSGD, truncated-uniform,
   TNQSGD (`--bits`, with one scale per tensor and per row) and top-k (the
   fraction that sends the same bits), the relative squared error of the
   decoded sum over 8 draws. The tail: the kurtosis of the coordinates
   (Laplace 6, Gaussian 3) and the share of the update's squared norm in its
   largest 1% of coordinates.
2. Utility: the federated workflow trained with each compressor at each of
   `--train_bits`, against uncompressed. Each quantiser trains once per
   `--scales` candidate (one scale per tensor, or per row) and keeps the scale
   with the best Recall@10 on validation users (a fixed random half of the
   participating users, harness.user_halves by config.seed); the table
   reports Recall@10 of the other half, the test users (mean over users of
   their held-out events, ± its standard error over users).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, plots
from benchmarks.federated import common
from federated import compression
from infra import results

QUANTISERS = ("qsgd", "truncated_uniform", "tnqsgd")
# (name, scheme, scale) of the error table: each quantiser with one scale per
# tensor and per row (federated/compression.py), and top-k
VARIANTS = ([(s, s, "tensor") for s in QUANTISERS] + [("topk", "topk", "tensor")]
            + [(f"{s}/row", s, "row") for s in QUANTISERS])
NAMES = [name for name, _, _ in VARIANTS]
FLAGS = (
    harness.Flag("bits", ["2", "3", "4", "6"], "Bits per coordinate for the error "
                 "table."),
    harness.Flag("train_bits", ["2", "4"], "Bits per coordinate of the training runs."),
    harness.Flag("scales", ["tensor", "row"], "Candidate scales of the quantisers' "
                 "training runs, chosen on validation users."),
)


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
  """(federation, final state, per-client scores) of one training run."""
  from federated import workflow
  f = workflow.build(config, mesh)
  state = workflow.train(config, os.path.join(workdir, name), mesh, f)
  return f, state, common.client_scores(f, state, config, mesh)


def logged_metrics(run_dir: str) -> list[dict]:
  """The rows of a run's metrics.jsonl."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def sent_and_error(run_dir: str) -> tuple[float | None, float | None]:
  """(mean bits per client, mean compression error) over a run's logged rounds."""
  logged = [m for m in logged_metrics(run_dir) if "compression_error" in m]
  if not logged:
    return None, None
  return (float(np.mean([m["bits_per_client"] for m in logged])),
          float(np.mean([m["compression_error"] for m in logged])))


def training_runs(run: harness.Run, base, initial_deltas) -> list[dict]:
  """One row per compressor and bits, each quantiser at the scale chosen on
  validation users; Recall@10 of the test users."""
  rows = []
  for bits in (int(b) for b in run.args.train_bits):
    for scheme in QUANTISERS + ("topk",):
      scales = run.args.scales if scheme != "topk" else ["tensor"]
      candidates = {}
      for scale in scales:
        comp = compressor(scheme, bits, initial_deltas, scale)
        config = harness.with_overrides(base, {
            "federated.compression.scheme": scheme, "federated.compression.bits": bits,
            "federated.compression.fraction": comp.fraction,
            "federated.compression.scale": scale})
        name = f"{scheme}_row_{bits}" if scale == "row" else f"{scheme}_{bits}"
        _, _, (clients, recall) = train(config, name, run.workdir, run.mesh())
        scores = common.valid_and_test(clients, recall, base.seed)
        sent, error = sent_and_error(os.path.join(run.workdir, name))
        candidates[scale] = harness.Scored(scores["valid"], {
            "run": name, "scheme": scheme, "bits": bits,
            "scale": scale if scheme != "topk" else "-",
            "recall@10": scores["test"], "recall@10_se": scores["test_se"],
            "test_users": scores["test_users"], "bits_per_client": sent,
            "compression_error": error})
        print(f"[compression] {name}: valid Recall@10 {scores['valid']:.4f}",
              flush=True)
      if scheme == "topk":
        rows.append(candidates["tensor"].test)
      else:
        _, row = run.choose(f"{scheme} at {bits} bits", "federated.compression.scale",
                            "Recall@10 of the validation users", candidates)
        rows.append(row)
  return rows


def measure(run: harness.Run) -> dict:
  from federated import attacks, workflow
  base = run.config
  f, state, (clients, recall) = train(base, "none", run.workdir, run.mesh())
  initial = workflow.init_state(f.task, f.client_spec, f.server_spec, base.seed,
                                len(f.dataset), run.mesh())[0]
  cohort = base.federated.clients_per_round
  stages = {stage: attacks.cohort_updates(f.task.example_loss, f.client_spec,
                                          f.dataset, s, cohort, base.seed)[0]
            for stage, s in (("initialisation", initial),
                             ("the end of training", state))}
  bits_list = [int(b) for b in run.args.bits]
  errors = [row for stage, deltas in stages.items()
            for row in error_rows(stage, deltas, bits_list)]
  tails = {stage: tail_stats(deltas) for stage, deltas in stages.items()}
  params = sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(stages[
      "initialisation"]))
  scores = common.valid_and_test(clients, recall, base.seed)
  runs = [{"run": "none", "scheme": "none", "scale": "-", "bits": 32,
           "recall@10": scores["test"], "recall@10_se": scores["test_se"],
           "test_users": scores["test_users"], "bits_per_client": 32.0 * params,
           "compression_error": None}]
  runs += training_runs(run, base, stages["initialisation"])
  meta = {"data": base.data.source, "rounds": base.train.num_steps,
          "clients_per_round": cohort, "algorithm": base.federated.algorithm,
          "parameters": params, "scales": list(run.args.scales),
          "valid_users": scores["valid_users"]}
  return {"meta": meta, "errors": errors, "tails": tails, "runs": runs}


def present(payload: dict):
  meta, errors, tails, runs = (payload[k] for k in ("meta", "errors", "tails", "runs"))
  lines = [f"Update compression, {meta['data']}, {meta['rounds']} rounds of "
           f"{meta['clients_per_round']} clients ({meta['algorithm']}).", ""]
  for stage, tail in tails.items():
    lines.append(f"- updates at {stage}: kurtosis {tail['kurtosis']:.1f} (Laplace 6, "
                 f"Gaussian 3); the largest 1% of coordinates hold "
                 f"{100 * tail['top1pct_energy']:.0f}% of the squared norm; "
                 f"{100 * tail['zero_fraction']:.0f}% are exactly 0.")
  lines += ["", "Relative squared error of the decoded cohort sum (mean of 8 "
            "draws):", ""]
  for stage in tails:
    cells = []
    for bits in sorted({r["bits"] for r in errors}):
      by = {r["scheme"]: r for r in errors if r["stage"] == stage and r["bits"] == bits}
      cells.append([bits] + [f"{by[s]['relative_error']:.3g}" for s in NAMES])
    lines += [f"At {stage}:", ""] + results.markdown_table(
        ["bits / coordinate"] + NAMES, cells) + [""]
  lines += [f"Training with each compressor: Recall@10 of {runs[0]['test_users']} "
            f"test users' held-out events (± one standard error over users); each "
            f"quantiser's scale ({' or '.join(meta['scales'])}) chosen on "
            f"{meta['valid_users']} validation users:", ""]
  lines += results.markdown_table(
      ["compressor", "scale (chosen on valid)", "bits / coordinate",
       "bits per client per round", "bits sent / coordinate", "Recall@10 (test users)",
       "mean compression error"],
      [[r["scheme"], r["scale"], r["bits"], _number(r["bits_per_client"], "{:,.0f}"),
        _number(r["bits_per_client"] and r["bits_per_client"] / meta["parameters"],
                "{:.2f}"),
        f"{r['recall@10']:.3f} ± {r['recall@10_se']:.3f}",
        _number(r["compression_error"], "{:.3g}")] for r in runs])
  return lines, plot(errors, runs, tails)


def _number(value, fmt: str) -> str:
  return "-" if value is None else fmt.format(value)


def _style(name: str) -> str:
  return "s--" if name.endswith("/row") else "o-"


def plot(errors, runs, tails):
  """The updates' tail, the error at each bit width, and Recall@10 after
  training: two panels a row."""
  fig, (tail_ax, error_ax, recall_ax) = plots.panels(3)
  for stage, tail in tails.items():
    tail_ax.plot(tail["survival_x"], np.maximum(tail["survival"], 1e-9), label=stage)
  xs = np.asarray(next(iter(tails.values()))["survival_x"])
  tail_ax.plot(xs, np.exp(-xs), "k--", label="Laplace, same mean |g|")
  tail_ax.set(yscale="log", ylim=(1e-7, 1.5), xlabel="|g| / mean |g|",
              ylabel="P(larger)", title="tail of the client updates")
  stage = list(tails)[-1]
  for scheme in NAMES:
    rows = [r for r in errors if r["stage"] == stage and r["scheme"] == scheme]
    error_ax.plot([r["bits"] for r in rows], [r["relative_error"] for r in rows],
                  _style(scheme), label=scheme)
  error_ax.set(yscale="log", xlabel="bits per coordinate",
               ylabel="relative error of the sum", title=f"error on real updates ({stage})")
  for scheme in QUANTISERS + ("topk",):
    rows = [r for r in runs if r["scheme"] == scheme]
    recall_ax.errorbar([r["bits"] for r in rows], [r["recall@10"] for r in rows],
                       [r["recall@10_se"] for r in rows], fmt="o-", capsize=3,
                       label=scheme)
  recall_ax.axhline(runs[0]["recall@10"], color="gray", ls="--", label="32-bit")
  recall_ax.set(xlabel="bits per coordinate", ylabel="Recall@10 (test users)",
                title="after training (scale chosen on valid)")
  for ax in (tail_ax, error_ax, recall_ax):
    ax.legend(fontsize=7)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/fedavg.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
