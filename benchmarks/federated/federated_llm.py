"""Federated personalisation of the LLM (issue 41): centralised LoRA, local-only
adapters, FedAvg-LoRA, FELLRec's dynamic balance and federated MoDE over one
warmed-up base LLM, at equal rounds and adapter size; each client's quality,
bytes and memory per round, and rounds per second vmapped vs looped.

  nice -n 10 python -m benchmarks.federated.federated_llm \\
    --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \\
    --out benchmarks/results/federated_llm_ml100k

Protocol (configs/federated_llm.py, federated/llm_workflow.py):
- Clients are users. Their held-out out-of-sample events (the participation
  split's last 20% of each participating user's timeline) are split by
  client into validation and test halves (`harness.user_halves`); every
  setting is chosen on the validation clients, every table row is the test
  clients'.
- The base: the workflow's warm-up at each of `--base_steps` (its cosine
  schedule spans the run), chosen by the base's own next title after the
  bare history ("Watched: <titles>") on validation clients.
- The methods train the same adapters (LoRA rank 4 on q, k, v and the
  attention output; MoDE at the rank whose parameter count is nearest LoRA's,
  `adapters.match_budget`) for `config.train.num_steps` rounds of
  `clients_per_round` clients; each method's client learning rate is chosen
  among `--learning_rates` on validation clients. "local_only" and
  "fellrec_balance" keep an adapter per client and score each client that
  trained with its own (the rest with the server's); the others score every
  client with the server's adapters.
- Centralised LoRA: the federated clients' examples pooled into one client,
  trained through the same round for as many epochs as make the federated
  runs' example passes (each round's sampled examples x local epochs).
- Per client: Recall@10 over its held-out events (the mean over them);
  mean, p10, p50, p90 over test clients, the spread beyond sampling noise
  (the standard deviation over clients less the binomial noise of each
  client's mean), and the difference from FedAvg-LoRA client by client
  (paired, +- one standard error over clients).
- Cost: bytes a client sends (= receives) a round (the adapters), the base
  it receives once, one client's update in XLA's compiled memory and FLOPs,
  what one more client adds to the vmapped round's compiled memory, and
  rounds per second of the vmapped round (CPU chunking, and the whole cohort
  in one vmap) against a Python loop over the same jitted client update, at
  `--throughput_clients` clients.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from benchmarks import harness, plots
from federated import (algorithms, clients, cost, evaluation, frozen_base,
                       llm_workflow, runs)
from infra import mesh as mesh_lib, results
from userllm.models import adapters

METHODS = {  # name -> config overrides (centralised: pooled, see `pooled`)
    "centralised_lora": {},
    "local_only": {"federated.personalisation": "local"},
    "fedavg_lora": {},
    "fellrec_balance": {"federated.personalisation": "fellrec"},
    "fedavg_mode": {"adapter.kind": "mode"},
}
FLAGS = (
    harness.Flag("base_steps", ["250", "500", "1000"], "Warm-up lengths of the base "
                 "LLM, chosen among on validation clients."),
    harness.Flag("learning_rates", ["0.003", "0.01"], "Client learning rates each "
                 "method chooses among on validation clients."),
    harness.Flag("methods", list(METHODS), "Methods to run (fedavg_lora is the "
                 "paired reference and always runs)."),
    harness.Flag("throughput_clients", 64, "Clients a round in the rounds/s and "
                 "memory-per-client measurements."),
    harness.Flag("chunks", ["2", "4", "8"], "Clients per vmapped chunk timed "
                 "(config.federated.client_chunk), beside the whole cohort."),
    harness.Flag("repeats", 5, "Timed rounds per mode (the median is reported)."),
)
METRIC = "recall@10"
# settings every run shares: no periodic evaluation (the benchmark scores at
# the end), small evaluation batches (a client with its own adapters is
# scored in batches of its own rows)
SHARED = {"train.eval_every": 0, "base_train.eval_every": 0,
          "train.eval_batch_size": 32}


def excess_std(per_client: np.ndarray, events: np.ndarray) -> float:
  """The spread over clients beyond sampling noise: sqrt(max(0, variance of
  the per-client means - the mean binomial variance p (1 - p) / n_events))."""
  noise = np.mean(per_client * (1 - per_client) / np.maximum(events, 1))
  return float(np.sqrt(max(per_client.var(ddof=1) - noise, 0.0)))


def distribution(per_client: np.ndarray, events: np.ndarray) -> dict:
  """mean (+- standard error), p10, p50, p90, spread beyond noise."""
  mean, stderr = harness.mean_and_stderr(per_client)
  p10, p50, p90 = np.percentile(per_client, (10, 50, 90))
  return {"mean": mean, "mean_se": stderr, "p10": float(p10), "p50": float(p50),
          "p90": float(p90), "excess_std": excess_std(per_client, events),
          "clients": len(per_client)}


class Scorer:
  """Per-client Recall@10 on the participating clients' held-out events,
  and which clients are validation and which test (fixed by the seed)."""

  def __init__(self, f, config, mesh):
    self.f, self.config, self.mesh = f, config, mesh
    self.evaluator = evaluation.ParticipationGapEvaluator(
        f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
        splits=("out_of_sample",))
    row_clients = self.evaluator.row_clients["out_of_sample"]
    self.clients, self.events = np.unique(row_clients, return_counts=True)
    self.valid, self.test = harness.user_halves(self.clients, config.seed)

  def adapters(self, state) -> np.ndarray:
    """[clients] of adapters over `state`'s base (own adapters where kept)."""
    self.f.task.hold_base(state.frozen)
    clients_, scores = self.evaluator.client_scores(
        "out_of_sample", state.params, runs.personal_models(state, self.f.dataset))
    assert (clients_ == self.clients).all()
    return self._checked(scores[METRIC])

  def rows(self, ranks: np.ndarray) -> np.ndarray:
    """[clients] Recall@10 of per-event ranks [rows]."""
    hits = (ranks < 10).astype(np.float64)
    return self._checked(evaluation.per_client_means(
        hits, self.evaluator.row_clients["out_of_sample"]))

  def base(self, base_params) -> np.ndarray:
    """[clients] of the base's own next title after the bare history."""
    scorer = llm_workflow.continuation_scorer(self.config, self.f, self.mesh,
                                              self.f.split.out_of_sample)
    return self.rows(scorer.ranks(base_params))

  def popularity(self) -> np.ndarray:
    scores = self.f.task.baselines(self.f.split.train, self.config.seed)
    return self.rows(self.evaluator.scorers["out_of_sample"].fixed_score_ranks(
        scores["popularity"]))

  def scored(self, per_client: np.ndarray, **extra) -> harness.Scored:
    """Validation mean (the choice) and the test clients' figures."""
    return harness.Scored(float(per_client[self.valid].mean()), {
        "per_client": per_client[self.test].tolist(),
        **distribution(per_client[self.test], self.events[self.test]), **extra})

  @staticmethod
  def _checked(values):
    if not np.isfinite(values).all():
      raise FloatingPointError(f"a client's {METRIC} is not finite")
    return values


def choose_base(run: harness.Run, config, mesh) -> tuple:
  """(chosen warm-up steps, its config, its workdir, the base on the host,
  the base's and popularity's test figures)."""
  candidates = {}
  for steps in (int(s) for s in run.args.base_steps):
    cfg = harness.with_overrides(config, {"base_train.num_steps": steps})
    root = f"{run.workdir}/base_{steps}"
    f = llm_workflow.build(cfg, root, mesh)
    base = jax.device_get(llm_workflow.warm_up(cfg, root, mesh, f))
    scorer = Scorer(f, cfg, mesh)
    candidates[steps] = scorer.scored(scorer.base(base), cfg=cfg, root=root,
                                      base=base, scorer=scorer)
  steps, chosen = run.choose("base", "base_train.num_steps",
                             "Recall@10 of the base's own next title", candidates)
  popularity = chosen["scorer"].scored(chosen["scorer"].popularity()).test
  base_row = {k: v for k, v in chosen.items()
              if k not in ("cfg", "root", "base", "scorer")}
  return steps, chosen["cfg"], chosen["root"], chosen["base"], base_row, popularity


def mode_rank(f) -> int:
  """MoDE's rank whose adapter count is nearest the LoRA adapters'."""
  llm_cfg = f.task.model.config
  lora = adapters.formula_count(llm_cfg.adapter, llm_cfg)
  mode = dataclasses.replace(llm_cfg.adapter, kind="mode")
  return adapters.match_budget(mode, llm_cfg, lora).rank


def example_passes(config, f) -> int:
  """Examples the federated clients train on over the run (each round's
  sampled clients' real examples x local epochs)."""
  sampler = clients.CohortSampler(f.dataset, config.federated.clients_per_round,
                                  config.seed)
  per_round = [int(sampler(r)["num_examples"].sum())
               for r in range(config.train.num_steps)]
  return sum(per_round) * config.federated.local_epochs


def pooled(f):
  """`f` with the federated clients' real examples pooled into one client."""
  d = f.dataset
  real = np.concatenate([ex[:n] for ex, n in zip(d.examples, d.num_examples)])
  one = clients.pack_clients(real, np.full(len(real), d.client_ids[0]),
                             d.client_ids[:1])
  return dataclasses.replace(f, dataset=one)


def method_config(name: str, cfg, f, lr: float, overrides: dict | None = None):
  """The config of one method at client learning rate `lr` (`overrides`:
  the method's own, METHODS[name] by default; a name that starts with
  "centralised" pools the clients' examples, see `pooled`)."""
  overrides = {**(METHODS[name] if overrides is None else overrides),
               "federated.client_learning_rate": lr}
  if name == "fedavg_mode":
    overrides["adapter.rank"] = mode_rank(f)
  if name.startswith("centralised"):  # epochs: as given, else matched passes
    epochs = max(1, round(example_passes(cfg, f) / int(f.dataset.num_examples.sum())))
    overrides = {"federated.clients_per_round": 1, "train.num_steps": epochs,
                 "train.checkpoint_every": 1, **overrides}
  return harness.with_overrides(cfg, overrides)


def run_method(name: str, cfg, root: str, base, mesh, lr: float, tag: str = "",
               overrides: dict | None = None) -> dict:
  """Trains one method at `lr` (in `root`/<name><tag>_lr<lr>); its Scored
  per-client figures and costs (`overrides`: see `method_config`)."""
  f = llm_workflow.build(cfg, root, mesh)
  cfg = method_config(name, cfg, f, lr, overrides)
  f = llm_workflow.build(cfg, root, mesh)
  if name.startswith("centralised"):
    f = pooled(f)
  began = time.perf_counter()
  state = llm_workflow.train(cfg, f"{root}/{name}{tag}_lr{lr:g}", mesh, f, base)
  seconds = time.perf_counter() - began
  scorer = Scorer(f, cfg, mesh)
  per_client = scorer.adapters(state)
  costs = {**cost.round_cost(f.task, f.client_spec, state, f.dataset),
           **llm_workflow.client_memory(f, state),
           "client_table_bytes": frozen_base.tree_bytes(state.client_states),
           "adapter_parameters": adapters.tree_count(state.params),
           "trained_parameters": int(sum(np.size(x) for x in
                                         jax.tree.leaves(state.params))),
           "rounds": int(state.step), "train_seconds": seconds}
  return scorer.scored(per_client, **costs)


def round_speed(cfg, root: str, base, mesh, num_clients: int, chunks,
                repeats: int) -> dict:
  """Rounds/s at `num_clients` clients: vmapped in chunks of each of
  `chunks` clients and as the whole cohort, and a Python loop over clients
  (the median of `repeats` rounds after a compiling one, interleaved so a
  busy spell of the shared machine falls on every mode alike); and what one
  more client adds to the vmapped round's compiled memory."""
  cfg = harness.with_overrides(cfg, {"federated.clients_per_round": num_clients})
  f = llm_workflow.build(cfg, root, mesh)
  state, _ = llm_workflow.init_state(cfg, f, mesh, base)
  cohort = mesh_lib.put_batch(
      clients.CohortSampler(f.dataset, num_clients, cfg.seed)(0), mesh)
  modes = {f"vmapped_chunk{c}": jax.jit(frozen_base.round_step(
      llm_workflow.make_round(harness.with_overrides(
          cfg, {"federated.client_chunk": int(c)}), f, mesh))) for c in chunks}
  modes["vmapped_whole"] = jax.jit(frozen_base.round_step(llm_workflow.make_round(
      harness.with_overrides(cfg, {"federated.client_chunk": 0}), f, mesh)))
  looped = llm_workflow.make_round(cfg, f, mesh, looped=True)
  modes["looped"] = lambda state, cohort: looped(state, cohort, state.frozen)
  times = {name: [] for name in modes}
  for repeat in range(repeats + 1):  # the first round of each compiles
    for name, step in modes.items():
      began = time.perf_counter()
      jax.block_until_ready(step(state, cohort))
      if repeat:
        times[name].append(time.perf_counter() - began)
  out = {"clients": num_clients, "repeats": repeats,
         "rounds_per_second": {n: 1.0 / float(np.median(t)) for n, t in times.items()},
         "auto_chunk": runs.resolve_client_chunk(-1, mesh)}
  out.update(memory_per_client(cfg, f, mesh, state, num_clients))
  return out


def memory_per_client(cfg, f, mesh, state, num_clients: int) -> dict:
  """XLA's compiled memory of the whole-cohort vmapped round at a quarter of
  `num_clients` and at `num_clients` clients: what one more client adds
  (temporaries; arguments beyond its own examples), beside the base's and
  the adapters' bytes."""
  round_fn = frozen_base.round_step(algorithms.make_round(
      f.task.example_loss, f.client_spec, f.server_spec))
  sizes = (num_clients // 4, num_clients)
  (small, data_small), (big, data_big) = (
      (frozen_base.compiled_memory(round_fn, state, cohort),
       frozen_base.tree_bytes(cohort))
      for cohort in (clients.CohortSampler(f.dataset, n, cfg.seed)(0)
                     for n in sizes))
  extra = sizes[1] - sizes[0]
  return {"memory_clients": list(sizes),
          "temp_per_client": (big["temp"] - small["temp"]) / extra,
          "arguments_per_client": ((big["argument"] - data_big)
                                   - (small["argument"] - data_small)) / extra,
          "round_temp": big["temp"], "round_arguments": big["argument"],
          "base_bytes": frozen_base.tree_bytes(state.frozen),
          "adapter_bytes": frozen_base.tree_bytes(state.params),
          # one copy of a local step's logits [batch, tokens, vocab], the
          # largest activation of this small-base, big-vocabulary LM
          "logits_bytes": 4 * cfg.federated.client_batch_size
          * f.dataset.examples.shape[-1] * f.task.model.config.padded_vocab}


def paired(a: dict, b: dict) -> dict:
  """Client by client b - a over the same test clients: mean +- standard error."""
  x, y = np.asarray(a["per_client"]), np.asarray(b["per_client"])
  mean, stderr = harness.mean_and_stderr(y - x)
  return {"mean_diff": mean, "mean_diff_se": stderr,
          "clients_better": int((y > x).sum()), "clients_worse": int((y < x).sum())}


def measure(run: harness.Run) -> dict:
  config = harness.with_overrides(run.config, SHARED)
  mesh = run.mesh()
  steps, cfg, root, base, base_row, popularity = choose_base(run, config, mesh)
  methods = [m for m in METHODS if m in run.args.methods or m == "fedavg_lora"]
  rows = {}
  for name in methods:
    candidates = {float(lr): run_method(name, cfg, root, base, mesh, float(lr))
                  for lr in run.args.learning_rates}
    _, rows[name] = run.choose(name, "federated.client_learning_rate",
                               f"mean per-client {METRIC}", candidates)
  speed = round_speed(cfg, root, base, mesh, run.args.throughput_clients,
                      run.args.chunks, run.args.repeats)
  reference = rows["fedavg_lora"]
  fed = cfg.federated
  meta = {"data": cfg.data.source, "base_steps": steps,
          "rounds": cfg.train.num_steps, "clients_per_round": fed.clients_per_round,
          "test_clients": base_row["clients"],
          "max_examples_per_client": fed.max_examples_per_client,
          "local_epochs": fed.local_epochs, "client_batch_size": fed.client_batch_size,
          "client_optimizer": fed.client_optimizer, "history_len": cfg.data.history_len,
          "adapter": cfg.adapter.to_dict(), "llm": cfg.llm.to_dict()}
  return {"meta": meta, "base": base_row, "popularity": popularity, "methods": rows,
          "paired": {n: paired(reference, r) for n, r in rows.items()
                     if n != "fedavg_lora"},
          "paired_with_base": {n: paired(base_row, r) for n, r in rows.items()},
          "speed": speed}


def present(payload: dict):
  meta, rows = payload["meta"], payload["methods"]
  lines = [f"Federated LLM personalisation, {meta['data']}: a "
           f"{meta['llm']['num_layers']}-layer, {meta['llm']['embed_dim']}-wide base "
           f"LLM warmed up for {meta['base_steps']} steps, then adapters "
           f"({meta['adapter']['kind']} rank {meta['adapter']['rank']} on "
           f"{', '.join(meta['adapter']['targets'])}) for {meta['rounds']} rounds of "
           f"{meta['clients_per_round']} clients (users; each keeps "
           + (f"its latest {meta['max_examples_per_client']}"
              if meta["max_examples_per_client"] else "all its")
           + f" windows of {meta['history_len']} "
           f"titles, {meta['local_epochs']} local epoch(s) of batches of "
           f"{meta['client_batch_size']}, {meta['client_optimizer']}).", "",
           f"Per-client {METRIC} on the test clients' held-out events (each "
           "client scored with the adapters it would serve; +- one standard "
           "error over clients):", ""]
  header = ["method", "client lr", "mean", "p10", "p50", "p90",
            "spread beyond noise", "vs FedAvg-LoRA (paired)", "vs the base (paired)",
            "adapter params", "bytes up a round", "client temp memory"]
  selection = payload.get("selection", {})
  cells = []
  for name, label in (("popularity", "popularity"),
                      ("base", "base LLM, own next title (no adapters)")):
    r = payload[name]
    cells.append([label, "-", f"{r['mean']:.4f} +- {r['mean_se']:.4f}",
                  *(f"{r[k]:.3f}" for k in ("p10", "p50", "p90")),
                  f"{r['excess_std']:.3f}", "-", "-", "-", "-", "-"])
  for name, r in rows.items():
    c = payload["paired"].get(name)
    b = payload["paired_with_base"][name]
    cells.append([name, f"{selection.get(name, {}).get('chosen', '-')}",
                  f"{r['mean']:.4f} +- {r['mean_se']:.4f}",
                  *(f"{r[k]:.3f}" for k in ("p10", "p50", "p90")),
                  f"{r['excess_std']:.3f}",
                  "-" if c is None else
                  f"{c['mean_diff']:+.4f} +- {c['mean_diff_se']:.4f}",
                  f"{b['mean_diff']:+.4f} +- {b['mean_diff_se']:.4f}",
                  f"{r['adapter_parameters']:.0f}",
                  f"{r['client_bytes_up'] / 1024:.1f} KiB",
                  f"{r['client_temp_bytes'] / 2**20:.1f} MiB"])
  lines += results.markdown_table(header, cells)
  s = payload["speed"]
  speeds = s["rounds_per_second"]
  lines += ["", f"Rounds per second at {s['clients']} clients a round (FedAvg-LoRA, "
            "the same jitted client update; the median of "
            f"{s['repeats']} rounds; `client_chunk=-1` picks chunks of "
            f"{s['auto_chunk']} on this machine):", ""]
  lines += results.markdown_table(
      [name.replace("_", " ") for name in speeds],
      [[f"{v:.2f}" for v in speeds.values()]])
  small, big = s["memory_clients"]
  lines += ["", "Memory of the vmapped round (XLA's compiled memory analysis, "
            f"whole cohort, {small} vs {big} clients): one more client adds "
            f"{s['temp_per_client'] / 2**20:.2f} MiB of temporaries (a local "
            f"step's logits are {s['logits_bytes'] / 2**20:.2f} MiB a copy) and "
            f"{s['arguments_per_client']:.0f} B of arguments beyond its own "
            f"examples; the base is {s['base_bytes'] / 2**20:.2f} MiB, an "
            f"argument once, and the adapters {s['adapter_bytes'] / 1024:.1f} KiB.",
            ""]
  return lines, plot(payload)


def plot(payload: dict):
  fig, (box_ax, speed_ax) = plots.panels(2)
  names = list(payload["methods"])
  box_ax.boxplot([payload["methods"][n]["per_client"] for n in names],
                 tick_labels=names)
  box_ax.set(ylabel=f"per-client {METRIC}", title="test clients")
  box_ax.tick_params(axis="x", rotation=30)
  s = payload["speed"]
  speeds = s["rounds_per_second"]
  speed_ax.bar([n.replace("vmapped_", "") for n in speeds], list(speeds.values()))
  speed_ax.set(ylabel="rounds / s", title=f"{s['clients']} clients a round")
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/federated_llm.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
