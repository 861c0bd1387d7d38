"""Workflow `federated_llm`: federated personalisation of the LLM itself, the
clients training LoRA / MoLoRA / MoDE adapters (`config.adapter`) of a
decoder LLM whose base weights are frozen and held once (FELLRec's setting,
arXiv 2402.09959; federated/llm_task.py says the task, federated/frozen_base.py
the round's state).

1. The vocabulary: SentencePiece trained on the catalogue's text, every title
   one piece (`config.data.title_pieces`, required: the ranking reads one
   piece per title), kept at `<workdir>/spm.model`.
2. `base`: the base LLM's warm-up, a centralised stage (infra/stages.py,
   `config.base_train`) on the participating users' training histories as
   text, every title a target (the history-LM loss). Its valid line is the
   out-of-sample Recall@10 of the LM's own next title after a history.
3. `federated`: rounds of `config.federated`'s algorithm over the adapters
   only (`config.train` counts rounds), the base an argument of every round,
   sharded over the mesh's `model` axis; `personalisation` "fellrec" (its
   dynamic balance) or "local" (local-only adapters) keeps an adapter per
   client, and `pooling="central"` with one client a round is centralised
   LoRA through the same round.
4. The participation-gap evaluation (federated/evaluation.py) of the
   adapters over the base, popularity on the same events, and the base alone
   reading its own next title after the history (`base_continuation`);
   results.json also gets each client's bytes and FLOPs per round and the
   memory of one client's update from XLA's compiled memory analysis.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data import prompts, sources
from data.sequences import EpochBatcher
from federated import (algorithms, clients, cost, evaluation, frozen_base,
                       llm_task, privacy, runs, user_llm_task)
from infra import optim, results as results_lib, stages, train_loop
from infra.errors import ConfigError
from userllm import language_model
from userllm.models import adapters, llm

# The warm-up depends on what decides its rows (the data, the vocabulary and
# which users train) and on its own shapes and schedule.
STAGES = {"base": stages.Stage("base_train", (
    "seed", "data", "llm", "base_train", "federated.partition",
    "federated.num_clients", "federated.dirichlet_alpha",
    "federated.embedding_dim", "federated.participating_fraction",
    "federated.heldout_fraction"))}
TASK = "next_title"  # the prediction (results keys) both models make
# config.federated.task -> what the clients train: adapters of the LLM,
# reading the history as text, or the User-LLM's user path over the frozen
# LLM, reading it as user tokens
TASKS = {"next_title": llm_task.NextTitleLLMTask,
         "user_llm": user_llm_task.UserLLMNextTitleTask}
USER_LLM_SECTIONS = ("encoder", "userllm")  # read by task "user_llm" only


def adapter_config(config) -> adapters.AdapterConfig:
  """`config.adapter` as the AdapterConfig of the clients' adapters; errors
  name the field. The adapters' task needs some; the User-LLM's may have
  none (kind "none")."""
  fields = {name: config.adapter[name] for name in config.adapter.keys()}
  fields["targets"] = tuple(fields.get("targets", ()))
  try:
    cfg = adapters.AdapterConfig(**fields).validate()
  except TypeError as e:
    raise ConfigError(f"config.adapter: {e}") from None
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if not cfg.enabled and config.federated.task == "next_title":
    raise ConfigError("config.adapter.kind='none': the clients train adapters "
                      f"only; pick one of {adapters.KINDS[1:]}")
  return cfg


def check(config) -> None:
  """One-line errors for values that would fail later (or silently)."""
  for field in ("base_train", "train"):
    train_loop.check_schedule(config[field], f"config.{field}")
  if config.federated.task not in TASKS:
    raise ConfigError(f"config.federated.task={config.federated.task!r} is not "
                      f"one of the federated_llm workflow's {tuple(TASKS)}")
  if not config.data.title_pieces:
    raise ConfigError("config.data.title_pieces=False: the next-title task "
                      "ranks one vocabulary piece per title (set it True)")
  if config.data.history_len < 1:
    raise ConfigError(f"config.data.history_len={config.data.history_len} must "
                      "be >= 1")
  if not config.task.history_lm_weight >= 0:
    raise ConfigError("config.task.history_lm_weight="
                      f"{config.task.history_lm_weight} must be >= 0")
  adapter_config(config)


@dataclasses.dataclass
class LLMFederation:
  """What a federated LLM run builds before it trains."""
  timelines: Any
  task: llm_task.NextTitleLLMTask  # or its User-LLM subclass
  split: clients.ParticipationSplit
  dataset: clients.ClientDataset
  dp_budget: privacy.Budget | None
  client_spec: algorithms.ClientSpec
  server_spec: algorithms.ServerSpec


def build(config: ml_collections.ConfigDict, workdir: str, mesh) -> LLMFederation:
  """Data, vocabulary, task, clients, privacy budget and the round's specs."""
  check(config)
  timelines = sources.load_timelines(config.data)
  sources.require_item_text(timelines, config.workflow)  # titles for prompts
  tokenizer = language_model.tokenizer(
      config, workdir, lambda: prompts.corpus(timelines),
      titles=[str(t) for t in timelines.items.titles[1:]])
  model_config = language_model.llm_config(config, tokenizer.vocab_size,
                                           adapter=adapter_config(config))
  task = TASKS[config.federated.task](config, timelines, tokenizer, model_config)
  split, dataset, dp_budget, client_spec, server_spec = runs.clients_and_specs(
      config, timelines, task, mesh)
  return LLMFederation(timelines, task, split, dataset, dp_budget, client_spec,
                       server_spec)


def base_model(task: llm_task.NextTitleLLMTask) -> llm.DecoderLM:
  """The LLM without adapters (the warm-up's; its tree is the frozen base)."""
  return llm.DecoderLM(task.base_config)


def continuation_scorer(config, f: LLMFederation, mesh, held_out):
  """The base LM's own next title after a bare history ("Watched: <titles>"),
  scored like the adapters (params: the base's whole tree)."""
  model = base_model(f.task)
  return llm_task.NextTitleScorer(
      f.timelines, held_out, config.data.history_len,
      lambda items, lengths: f.task.text.prompts(items, lengths, question=False),
      config.train.eval_batch_size, mesh,
      llm_task.make_rank_fn(model, f.task.text.piece_of_item), lambda p: p)


def warm_up(config, workdir: str, mesh, f: LLMFederation):
  """Stage `base`: the base LLM trained centrally on the participating users'
  training histories as text (every title a target); returns its parameters
  on the mesh."""
  model = base_model(f.task)
  rows = f.task.base_rows(f.split.train)
  schedule = config.base_train
  tx = optim.make_optimizer(schedule)
  is_title = f.task.is_title

  def loss_fn(params, batch, rng):
    del rng
    return jnp.mean(llm_task.history_lm_losses(model, params, batch, is_title)), {}

  init = lambda rng: model.init(rng, rows[:1], rows[:1] > 0)["params"]  # noqa: E731
  state, shardings = train_loop.create_state(init, tx, jax.random.PRNGKey(config.seed),
                                             mesh)
  scorer = continuation_scorer(config, f, mesh, f.split.out_of_sample)

  def valid(s):
    ranks = scorer.ranks(s.params)
    return {"out_of_sample_recall@10": float(np.mean(ranks < 10))}

  print(f"[base] warm-up on {len(rows)} history windows of "
        f"{int(f.split.participating.sum())} participating clients' training "
        "events", flush=True)
  state = stages.fit(
      STAGES["base"], "base", config, state=state, shardings=shardings,
      train_step=train_loop.make_train_step(loss_fn, tx),
      batches=EpochBatcher(rows, schedule.batch_size, config.seed), mesh=mesh,
      workdir=workdir, eval_fn=valid)
  return state.params


def make_round(config, f: LLMFederation, mesh, looped: bool = False):
  """The adapters' round `round(state, cohort, frozen)` (vmapped, chunked as
  `config.federated.client_chunk` resolves on this machine; or the Python
  loop over clients)."""
  if looped:
    return algorithms.make_looped_round(f.task.example_loss, f.client_spec,
                                        f.server_spec)
  return algorithms.make_round(
      f.task.example_loss, f.client_spec, f.server_spec,
      client_chunk=runs.resolve_client_chunk(config.federated.client_chunk, mesh),
      client_shards=mesh.shape["data"])


def init_state(config, f: LLMFederation, mesh, base):
  """(FrozenBaseState, shardings): the clients' part fresh (adapters, or
  the User-LLM's user path) over the warm-up's `base`."""
  state, shardings = frozen_base.init_state(
      f.task.init_params, f.client_spec, f.server_spec, config.seed,
      len(f.dataset), mesh, split=f.task.split_params)
  frozen = jax.device_put(f.task.frozen_of_base(base), shardings.frozen)
  return state.replace(frozen=frozen), shardings


def scores(evaluator, f: LLMFederation, state) -> dict[str, float]:
  """The evaluator's summaries of `state`: adapters over its base (each
  client with its own adapters when the run keeps them)."""
  f.task.hold_base(state.frozen)  # a donated state's base lives in the newest
  return evaluator.evaluate(state.params, runs.personal_models(state, f.dataset))


def train(config, workdir: str, mesh, f: LLMFederation, base):
  """Rounds over the adapters under the shared loop (`<workdir>/federated`);
  the final FrozenBaseState."""
  state, shardings = init_state(config, f, mesh, base)
  periodic = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      splits=("out_of_sample",), full_summary=False)
  return train_loop.fit(
      state=state, state_shardings=shardings,
      train_step=frozen_base.round_step(make_round(config, f, mesh)),
      batch_fn=runs.cohorts(config, f),
      mesh=mesh, workdir=f"{workdir}/federated", schedule=config.train,
      eval_fn=lambda s: {**scores(periodic, f, s),
                         **runs.privacy_spent(f.dp_budget, s.step)},
      name="federated", unit="round", identity=identity(config))


def identity(config) -> dict:
  """The federated stage's identity: the whole config, less the User-LLM's
  sections (`encoder`, `userllm`) when the task is the adapters' (which
  never reads them), so an adapters run resumes whatever they hold."""
  out = config.to_dict()
  if config.federated.task != "user_llm":
    for section in USER_LLM_SECTIONS:
      out.pop(section, None)
  return out


def base_continuation(config, f: LLMFederation, mesh, state) -> dict[str, float]:
  """out_of_sample summaries of the base alone, reading its own next title
  after the bare history (what the adapters start from)."""
  held_out = f.split.out_of_sample
  if not len(held_out):
    return {}
  ranks = continuation_scorer(config, f, mesh, held_out).ranks(
      f.task.base_of_frozen(state.frozen))
  rows = f.task.rank_metrics(ranks)
  row_clients = f.split.client_of_user[held_out.users]
  out = {}
  for metric, values in rows.items():
    stats = evaluation.summarize(evaluation.per_client_means(values, row_clients))
    out.update(results_lib.prefixed({f"{metric}_{s}": v for s, v in stats.items()},
                                    "out_of_sample", "base_continuation", TASK))
  return out


def evaluate(config, mesh, f: LLMFederation, state) -> dict[str, float]:
  """The participation-gap evaluation (with popularity) and the base's own."""
  final = evaluation.ParticipationGapEvaluator(
      f.task, f.timelines, f.split, config.train.eval_batch_size, mesh,
      f.task.baselines(f.split.train, config.seed))
  out = scores(final, f, state)
  out.update(base_continuation(config, f, mesh, state))
  out.update(runs.privacy_spent(f.dp_budget, state.step))
  return out


def client_memory(f: LLMFederation, state) -> dict[str, float]:
  """XLA's compiled memory of one client's local update (the client padded
  to the largest, as it runs): `client_temp_bytes` (activations, gradients,
  optimiser state) and `client_argument_bytes` (base, adapters, examples)."""
  update = algorithms.make_client_update(f.task.example_loss, f.client_spec)
  one = lambda tree: jax.tree.map(lambda t: t[0], tree)  # noqa: E731
  memory = frozen_base.compiled_memory(
      update, state.params, one(state.client_states), f.dataset.examples[0],
      f.dataset.num_examples[0], jax.random.PRNGKey(0), None, state.frozen)
  return {"client_temp_bytes": float(memory["temp"]),
          "client_argument_bytes": float(memory["argument"])}


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  """Vocabulary, warm-up, federated adapters, evaluation and cost."""
  began = time.time()
  f = build(config, workdir, mesh)
  base = warm_up(config, workdir, mesh, f)
  train_began = time.time()
  state = train(config, workdir, mesh, f, base)
  results = {"train_seconds": time.time() - train_began, "rounds": int(state.step),
             "num_clients": len(f.split.participating),
             "participating_clients": int(f.split.participating.sum()),
             "training_examples": int(f.dataset.num_examples.sum()),
             "adapter_parameters": float(adapters.tree_count(state.params)),
             "trained_parameters": float(sum(np.size(x) for x in
                                             jax.tree.leaves(state.params))),
             "base_parameters": float(sum(np.size(x) for x in
                                          jax.tree.leaves(state.frozen)))}
  results.update(evaluate(config, mesh, f, state))
  results.update(cost.round_cost(f.task, f.client_spec, state, f.dataset))
  results.update(client_memory(f, state))
  results["wall_seconds"] = time.time() - began
  return results
