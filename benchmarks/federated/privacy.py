"""Privacy against utility: DP-FedAvg at several epsilons, compression and
split storage, each scored by the attacks of federated/attacks.py.

  python -m benchmarks.federated.privacy --out benchmarks/results/privacy

For every setting the federated workflow trains the next-item model
(`--config`, default configs/dp_fedavg.py on the embedded synthetic data;
`--config.train.num_steps=...` and other overrides apply to all settings):

- `none`: the mean of unclipped updates (uniform weighting, the DP runs'
  server optimiser), no protection;
- `clip`: clipping only (noise multiplier 0, epsilon infinite);
- `eps=E`: DP-FedAvg with the noise multiplier that gives epsilon E at the
  config's delta after the run's rounds (federated/privacy.py).

Each is scored by Recall@10 (participating clients' held-out events; and the
non-participating clients'), the loss-threshold membership-inference AUC over
users, and the embedding-update attack on what leaves a client (its update as
sent) and on what the server releases each round (the aggregate, noised under
DP). On the unprotected model, the compressors and the split-storage cuts are
scored by what they send: the update attack on compressed updates, and for
each cut k the activation-inversion attack with the client's cost.

No setting is chosen: every row is reported as run.
"""

from __future__ import annotations

import copy
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import harness, plots
from data import sequences
from federated import attacks, compression, split
from infra import results

FLAGS = (
    harness.Flag("epsilons", ["64", "16", "4", "1"], "Target epsilons of the DP "
                 "settings."),
    harness.Flag("compressors", ["tnqsgd:2", "qsgd:2", "topk:0.01"],
                 "scheme:bits or topk:fraction, attacked as sent."),
    harness.Flag("unprotected", True, "Also train the unprotected model (the "
                 "plain mean) and attack what its clients send, compressed and "
                 "split (--nounprotected: the DP curve alone, against clipping)."),
)
RECALL = "out_of_sample/model/next_item/recall@10_mean"
RECALL_NONPART = "non_participating/model/next_item/recall@10_mean"


def settings(base, epsilons, unprotected: bool = True) -> dict:
  """{name: config} of the protection settings."""
  out = {}
  if unprotected:
    none = copy.deepcopy(base)
    none.federated.aggregator = "mean"
    out["none"] = none
  clip = copy.deepcopy(base)
  clip.federated.dp.update(noise_multiplier=0.0, target_epsilon=0.0)
  out["clip"] = clip
  for eps in epsilons:
    c = copy.deepcopy(base)
    c.federated.dp.target_epsilon = float(eps)
    out[f"eps={eps}"] = c
  return out


def embedding_leaf(tree):
  return np.asarray(tree["item_embed"]["embedding"])


def client_update_auc(deltas, items, num_items: int) -> float:
  """Mean over clients of the update attack on each client's own update."""
  scores = [attacks.embedding_update_auc(embedding_leaf(deltas)[c], items[c],
                                         num_items)
            for c in range(len(items)) if 0 < len(items[c][items[c] > 0]) < num_items]
  return float(np.mean(scores))


def released_auc(f, state, deltas, weights, items, num_items: int
                 ) -> float | None:
  """The update attack on the round's released aggregate: the cohort's items
  against the rest; None when the cohort's items cover the whole catalogue
  (large cohorts: no item is left to tell apart)."""
  union = np.unique(np.concatenate(items))
  if len(union[union > 0]) >= num_items:
    return None
  aggregate, _, _ = f.server_spec.aggregator.apply(
      state.aggregator_state, deltas, weights, jax.random.PRNGKey(7))
  return attacks.embedding_update_auc(embedding_leaf(aggregate), union, num_items)


def compressed_auc(compressor: compression.Compressor, deltas, items,
                   num_items: int) -> tuple[float, float]:
  """(update attack on the compressed client updates, bits per client)."""
  keys = jax.random.split(jax.random.PRNGKey(3), len(items))
  decoded, bits = jax.vmap(compressor.client)(deltas, keys)
  return client_update_auc(decoded, items, num_items), float(np.mean(bits))


def split_rows(f, config, params) -> list[dict]:
  """Per cut k: the client's cost, and the activation-inversion attack fitted
  on non-participating users' activations, scored on participating users'."""
  model, max_len = f.task.model, config.data.max_len
  layers = model.config.num_layers

  def positions(held_out, limit):
    users, first = np.unique(held_out.users, return_index=True)
    prefix = attacks.prefix_timelines(f.timelines, users,
                                      held_out.history_lengths[first])
    windows, _ = sequences.training_windows_by_user(prefix, max_len)
    return windows[:limit, :-1]

  fit_items = positions(f.split.non_participating, 2000)
  test_items = positions(f.split.out_of_sample, 500)
  steps = -(-int(f.dataset.examples.shape[1]) // config.federated.client_batch_size)
  rows = []
  for k in range(layers + 1):
    cost = split.client_cost(params, layers, k, config.federated.client_batch_size,
                             max_len, model.config.embed_dim,
                             steps * config.federated.local_epochs)
    accuracy = None
    if k < layers:  # the server sees the activations at the cut
      client, _ = split.split_params(params, layers, k)
      front = jax.jit(lambda c, x: split.client_front(model, c, x, k)[0])

      def activations(items):
        h = np.concatenate([np.asarray(front(client, jnp.asarray(items[i:i + 256])))
                            for i in range(0, len(items), 256)])
        real = items > 0
        return h[real], items[real]

      accuracy = attacks.activation_inversion_accuracy(
          *activations(fit_items), *activations(test_items),
          vocab=f.timelines.num_items + 1)
    rows.append({**cost, "inversion_accuracy": accuracy,
                 "chance": 1.0 / f.timelines.num_items})
  return rows


def run_setting(name: str, config, workdir: str, mesh, timelines
                ) -> tuple[dict, tuple]:
  from federated import workflow
  f = workflow.build(config, mesh, timelines)
  state = workflow.train(config, os.path.join(workdir, name), mesh, f)
  metrics = workflow.evaluate(config, mesh, f, state)
  num_items = f.timelines.num_items
  deltas, weights, items = attacks.cohort_updates(
      f.task.example_loss, f.client_spec, f.dataset, state,
      config.federated.clients_per_round, config.seed)
  row = {"setting": name, "recall@10": metrics[RECALL],
         "recall@10_nonparticipating": metrics.get(RECALL_NONPART),
         "events": metrics["out_of_sample/model/next_item/events"],
         "epsilon": metrics.get("dp_epsilon", math.inf if name != "none" else None),
         "noise_multiplier": metrics.get("dp_noise_multiplier"),
         **attacks.membership_auc(f.task.model, state.params, f.timelines, f.split,
                                  config.data.max_len),
         "client_update_auc": client_update_auc(deltas, items, num_items),
         "released_update_auc": released_auc(f, state, deltas, weights, items,
                                             num_items)}
  print(f"[privacy] {name}: {row}", flush=True)
  return row, (f, state, deltas, items)


def logged_delta_norm(workdir: str, setting: str) -> float:
  """Mean norm of the applied aggregate over a run's logged rounds (with DP
  noise, the noise's norm dominates it)."""
  with open(os.path.join(workdir, setting, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return float(np.mean([r["delta_norm"] for r in rows if "delta_norm" in r]))


def noise_norm(row: dict, meta: dict) -> float | None:
  """The norm of one round's noise on the mean: z C sqrt(P) / m."""
  z = row["noise_multiplier"]
  if z is None:
    return None
  return z * meta["clip_norm"] * math.sqrt(meta["parameters"]) / meta[
      "clients_per_round"]


def compressed_rows(specs, deltas, items, num_items: int, unprotected: dict
                    ) -> list[dict]:
  """The update attack on each compressor's output, after the uncompressed row."""
  rows = [{"compressor": "none", "bits": float(32 * sum(
      np.prod(x.shape[1:]) for x in jax.tree.leaves(deltas))),
      "client_update_auc": unprotected["client_update_auc"]}]
  for spec in specs:
    scheme, _, value = spec.partition(":")
    compressor = (compression.Compressor(scheme, fraction=float(value))
                  if scheme == "topk" else compression.Compressor(scheme, int(value)))
    auc, bits = compressed_auc(compressor, deltas, items, num_items)
    rows.append({"compressor": spec, "bits": bits, "client_update_auc": auc})
  return rows


def measure(run: harness.Run) -> dict:
  from data import sources
  base = run.config
  timelines = sources.load_timelines(base.data)  # the settings share their data
  rows, contexts = [], {}
  for name, config in settings(base, run.args.epsilons, run.args.unprotected).items():
    row, contexts[name] = run_setting(name, config, run.workdir, run.mesh(),
                                      timelines)
    row["delta_norm"] = logged_delta_norm(run.workdir, name)
    rows.append(row)
  f, state, deltas, items = contexts[rows[0]["setting"]]
  meta = {"data": base.data.source, "rounds": base.train.num_steps,
          "users": timelines.num_users,
          "participating_clients": int(f.split.participating.sum()),
          "clients_per_round": base.federated.clients_per_round,
          "delta": base.federated.dp.delta,
          "clip_norm": base.federated.dp.clip_norm,
          "parameters": int(sum(np.prod(x.shape[1:])
                                for x in jax.tree.leaves(deltas)))}
  payload = {"meta": meta, "rows": rows}
  if run.args.unprotected:
    payload.update(
        compressed=compressed_rows(run.args.compressors, deltas, items,
                                   f.timelines.num_items, rows[0]),
        split=split_rows(f, base, jax.device_get(state.params)))
  return payload


def present(payload: dict):
  meta, rows = payload["meta"], payload["rows"]
  fmt = lambda v, f="{:.3f}": "-" if v is None else f.format(v)  # noqa: E731
  header = ["setting", "epsilon", "noise z", "noise norm / round",
            "applied update norm", "Recall@10 (participating)",
            "Recall@10 (non-participating)", "MIA AUC", "update attack AUC (client)",
            "update attack AUC (released)"]
  cells = [[r["setting"], fmt(r["epsilon"], "{:.3g}"), fmt(r["noise_multiplier"], "{:.3g}"),
            fmt(noise_norm(r, meta)), fmt(r["delta_norm"]), fmt(r["recall@10"]),
            fmt(r["recall@10_nonparticipating"]),
            f"{r['mia_auc']:.3f} ± {r['mia_auc_se']:.3f}", fmt(r["client_update_auc"]),
            fmt(r["released_update_auc"])] for r in rows]
  events = rows[0]["events"]
  population = (f" ({meta['users']:,} users, {meta['participating_clients']:,} "
                f"participating clients, delta {meta['delta']:.2g})"
                if "users" in meta else "")
  lines = [f"Privacy against utility, {meta['data']}{population}, {meta['rounds']} "
           f"rounds of {meta['clients_per_round']} clients.", ""] + results.markdown_table(
               header, cells)
  lines += ["", f"Recall@10 is over {events:.0f} held-out events (binomial standard "
            f"error at most {(0.25 / events) ** 0.5:.3f}); the MIA AUC is over "
            f"{rows[0]['mia_members']:.0f} member and {rows[0]['mia_nonmembers']:.0f} "
            f"non-member users, ± one standard error (Hanley & McNeil). The noise "
            f"norm is z C sqrt(P) / m for the model's P = {meta['parameters']:,} "
            f"parameters and m = {meta['clients_per_round']} clients a round; the "
            f"applied update norm is the mean over the logged rounds of the norm "
            f"of what the server applied (the clipped mean plus the noise).", ""]
  if "compressed" not in payload:  # --nounprotected: the DP curve alone
    return lines, plot(rows)
  lines += ["What a client sends, attacked on the unprotected model's updates:", ""]
  lines += results.markdown_table(
      ["compressor", "bits per client", "update attack AUC (client)"],
      [[c["compressor"], f"{c['bits']:,.0f}", fmt(c["client_update_auc"])]
       for c in payload["compressed"]])
  lines += ["", "Split storage (federated/split.py): the client keeps the "
            "embeddings, the final norm and the first k blocks; the server sees "
            "the activations at the cut.", ""]
  lines += results.markdown_table(
      ["k", "client params (KiB)", "client share", "bytes per round (KiB)",
       "activation inversion top-1", "chance"],
      [[c["k"], f"{c['client_param_bytes'] / 1024:.0f}", f"{c['client_share']:.2f}",
        f"{c['round_bytes'] / 1024:.0f}", fmt(c["inversion_accuracy"]),
        f"{c['chance']:.4f}"] for c in payload["split"]])
  return lines, plot(rows)


def plot(rows):
  dp = [r for r in rows if r["setting"] not in ("none",)]
  x = [r["epsilon"] if math.isfinite(r["epsilon"]) else None for r in dp]
  finite = [v for v in x if v is not None]
  right = max(finite) * 4 if finite else 1.0
  x = [right if v is None else v for v in x]
  fig, (utility_ax, attack_ax) = plots.panels(2)
  utility_ax.plot(x, [r["recall@10"] for r in dp], "o-", label="DP-FedAvg")
  if rows[0]["setting"] == "none":
    utility_ax.axhline(rows[0]["recall@10"], color="gray", ls="--",
                       label="no protection")
  utility_ax.set(xscale="log", xlabel="epsilon (rightmost: clipping only)",
                 ylabel="Recall@10", title="utility")
  attack_ax.plot(x, [r["mia_auc"] for r in dp], "o-", label="membership AUC")
  released = [r["released_update_auc"] for r in dp]
  if any(v is not None for v in released):
    attack_ax.plot(x, [math.nan if v is None else v for v in released], "s-",
                   label="update attack on the release")
  attack_ax.axhline(0.5, color="gray", ls=":")
  attack_ax.set(xscale="log", xlabel="epsilon", ylabel="attack AUC", title="attacks")
  for ax in (utility_ax, attack_ax):
    ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/dp_fedavg.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
