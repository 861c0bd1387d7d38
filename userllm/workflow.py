"""Workflow `user_llm`: the recipe of "User-LLM: Efficient LLM Contextualization
with User Embeddings" (arXiv 2402.13598), as named stages.

1. `language_model`: the decoder LM, loaded from a Gemma checkpoint
   (`config.llm.checkpoint`) or trained from scratch on the data's task text
   (text prompts with `lm_history` titles), so that it can write titles and
   genres. Workdir stage `lm`.
2. `user_encoder`: the fused user encoder pretrained autoregressively on the
   training timelines (next item, genres and rating). Only for user-embedding
   methods. Workdir stage `encoder_h<H>`.
3. `task_model`: the UserLLM, started from stages 1-2 and trained on the tasks
   with `config.userllm.strategy`. Workdir stage `<method>_h<H>[_<adapter>]`.
   Methods: `cross_attention`, `soft_prompt` (User-LLM), `text_prompt`
   (history as titles in the prompt), `no_history` (the bare task prompt).
4. `evaluate`: every task on held-out users (leave-last-out valid and test)
   by log-likelihood ranking of its candidates (userllm/evaluation.py), the
   task-independent prior beside it, and the run's cost figures.

Each stage is a `train_loop.fit` run in its own sub-directory of the workdir,
so each resumes on its own and a finished stage is reused by a later method
(or adapter kind) in the same workdir.

Modes on a finished workdir (main.py --mode, docs/using.md): `evaluate`
(every stage restored, none trained), `recommend` and `answer` (a task's
answers for given users, by candidate ranking) and `export` (the LLM, LoRA
merged, in the released Gemma layout, the User-LLM parts beside it).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import ml_collections
import numpy as np

from data import prompts, sources, splits
from data.sequences import EpochBatcher
from data.vocab import Tokenizer
from infra import mesh as mesh_lib, optim, stages, train_loop
from infra.errors import ConfigError
from userllm import builders, evaluation, use
from userllm import export as export_lib
from userllm import language_model as lm_lib
from userllm.models import adapters
from userllm import user_llm as ul
from userllm.models import sequence_model as sm

BATCH_KEYS = ("tokens", "token_mask", "target_mask", "events", "task_ids")


def example_batches(builder: prompts.PromptBuilder, examples: prompts.Examples,
                    batch_size: int, seed: int):
  """step -> the training batch of that step (a pure function of the step)."""
  rows = EpochBatcher(np.arange(len(examples)), batch_size, seed)
  return lambda step: {k: v for k, v in builder.batch(examples, rows(step)).items()
                       if k in BATCH_KEYS}


def task_batches(config, workdir: str, builder: prompts.PromptBuilder, timelines,
                 examples: prompts.Examples, tasks):
  """Stage 3's step -> batch, from `config.userllm.input_pipeline`: "arrays"
  (in memory, from `examples`) or "seqio" (the tasks' seqio Mixture over the
  tfds data, the same (user, cut) rows: data/seqio_tasks.py)."""
  if config.userllm.input_pipeline == "arrays":
    return example_batches(builder, examples, config.train.batch_size, config.seed)
  from data import seqio_tasks  # loads TensorFlow: only on this path
  return seqio_tasks.training_batches(config, workdir, builder.over(timelines),
                                      tasks, seed=config.seed + 1)  # = examples'


# Each stage's schedule (config section) and the config values that define
# its training (stored with its checkpoints: a resume under other values is an
# error); the last stage depends on everything.
STAGES = {
    # (+ the prompt and answer lengths the LM trains at, set by lm_history,
    # the tasks and answer_len: language_model adds them)
    "lm": stages.Stage("lm_train", (
        "seed", "data", "llm", "lm_train", "userllm.lm_history",
        "userllm.lm_tasks", "userllm.tasks", "userllm.text_ratings",
        "userllm.cuts_per_user")),
    "encoder": stages.Stage("encoder_train", (
        "seed", "data", "encoder", "encoder_train", "userllm.history_len")),
    "task": stages.Stage("train")}


def language_model(config, split, tokenizer, tasks, mesh, workdir: str):
  """Stage 1: (base LLMConfig or None, LLM parameters on the host)."""
  if config.llm.checkpoint:
    return lm_lib.pretrained(config, config.llm.checkpoint, mesh)
  use.require_finished(f"{workdir}/lm", config.lm_train, "lm", "config.lm_train")
  u = config.userllm
  lm_tasks = builders.tasks_of(config, "lm_tasks")
  # lm_history titles whole (the longest such prompt): the LM does not depend
  # on stage 3's text budget, so every method of a benchmark shares it
  builder = prompts.PromptBuilder(split.train, tokenizer, "text",
                                  u.lm_history, 10**9, u.answer_len,
                                  u.text_ratings, tasks + lm_tasks)
  model = builders.build_model(config, split.train, tokenizer.vocab_size,
                               "text_prompt", with_adapters=False)
  state, shardings, tx, mask = builders.init_state(
      model, "full", config.lm_train, config.seed, mesh, builder)
  examples = prompts.training_examples(split.train, u.cuts_per_user, config.seed,
                                       lm_tasks)
  state = stages.fit(
      STAGES["lm"], "lm", config, state=state, shardings=shardings,
      train_step=train_loop.make_train_step(
          functools.partial(ul.lm_loss, model, mask), tx),
      batches=example_batches(builder, examples, config.lm_train.batch_size,
                              config.seed), mesh=mesh, workdir=workdir,
      identity_extras={"lm_prompt_len": builder.prompt_len,
                       "lm_answer_len": builder.answer_len})
  return None, jax.device_get(state.params["llm"])


def user_encoder(config, train_timelines, encoder_cfg: sm.SequenceModelConfig,
                 mesh, workdir: str) -> tuple[dict, int]:
  """Stage 2: next-event pretraining of the fused encoder; returns (its
  parameters without the pretraining heads, number of training windows)."""
  window = encoder_cfg.max_len  # history_len + 1 events: inputs and targets
  name = f"encoder_h{window - 1}"
  train = config.encoder_train
  use.require_finished(f"{workdir}/{name}", train, name, "config.encoder_train")
  cuts = [(user, end) for user, length in enumerate(train_timelines.lengths)
          for end in range(int(length), 1, -(window - 1))]
  examples = prompts.Examples(np.array([c[0] for c in cuts], np.int32),
                              np.array([c[1] for c in cuts], np.int32),
                              np.zeros(len(cuts), np.int32))
  events = functools.partial(prompts.history_events, train_timelines, examples,
                             history_len=window)
  encoder = sm.ItemSequenceTransformer(encoder_cfg)
  tx = optim.make_optimizer(train)
  dummy = events(np.arange(1))
  init = lambda rng: encoder.init(  # noqa: E731
      rng, dummy["items"], dummy["ratings"], dummy["genres"],
      method=encoder.next_event_logits)["params"]
  state, shardings = train_loop.create_state(init, tx,
                                             jax.random.PRNGKey(config.seed), mesh)
  rows = EpochBatcher(np.arange(len(examples)), train.batch_size, config.seed)
  state = stages.fit(
      STAGES["encoder"], name, config, state=state,
      shardings=shardings, train_step=train_loop.make_train_step(
          functools.partial(sm.next_event_loss, encoder), tx),
      batches=lambda step: events(rows(step)), mesh=mesh, workdir=workdir)
  heads = ("genre_head", "rating_head")  # pretraining only: User-LLM reads states
  params = {k: v for k, v in jax.device_get(state.params).items() if k not in heads}
  return params, len(examples)


def encoder_quality(config, encoder_cfg: sm.SequenceModelConfig, params: dict,
                    timelines, split) -> dict[str, float]:
  """The pretrained encoder's own next-item Recall / NDCG on the valid users
  (the test users stay for the task model)."""
  metrics = evaluation.encoder_next_item(
      sm.ItemSequenceTransformer(encoder_cfg), params, timelines, split.valid,
      config.userllm.history_len, config.userllm.eval_users, config.seed, "valid")
  print(f"[encoder] valid next-item recall@10 "
        f"{metrics['valid/encoder/next_item/recall@10']:.3f}", flush=True)
  return metrics


def task_prompts(config, train_timelines, tokenizer: Tokenizer, tasks
                 ) -> prompts.PromptBuilder:
  """Stage 3's prompts (and their shapes) for the method's history kind."""
  u = config.userllm
  return prompts.PromptBuilder(
      train_timelines, tokenizer, builders.METHODS[u.method].history,
      u.history_len, u.text_prompt_len, u.answer_len, u.text_ratings,
      tasks + builders.tasks_of(config, "lm_tasks"))


def run(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict[str, float]:
  builders.check(config)
  began = time.time()
  u = config.userllm
  tasks = builders.tasks_of(config, "tasks")
  timelines = sources.load_timelines(config.data)
  sources.require_item_text(timelines, config.workflow)  # titles for prompts
  split = splits.leave_last_out(timelines)
  tokenizer = builders.tokenizer_for(config, workdir, timelines)
  print(f"[text] vocabulary {tokenizer.vocab_size} pieces; tasks "
        f"{', '.join(tasks)}", flush=True)
  results = {}

  # 1. the LLM; 2. the user encoder (user-embedding methods only)
  base, llm_params = language_model(config, split, tokenizer, tasks, mesh, workdir)
  model = builders.build_model(config, timelines, tokenizer.vocab_size, u.method,
                               base)
  encoder_params = None
  if model.config.uses_user:
    encoder_params, windows = user_encoder(config, split.train,
                                           model.config.encoder, mesh, workdir)
    results["encoder_pretrain_windows"] = float(windows)
    results.update(encoder_quality(config, model.config.encoder, encoder_params,
                                   timelines, split))

  # 3. the task model
  name = builders.stage_name(config, model)
  use.require_finished(f"{workdir}/{name}", config.train, name, "config.train")
  builder = task_prompts(config, split.train, tokenizer, tasks)
  state, shardings, tx, mask = builders.init_state(model, u.strategy, config.train,
                                                   config.seed, mesh, builder,
                                                   u.new_params_lr_scale)
  state = lm_lib.load_into(state, shardings, llm_params, "llm")
  if encoder_params is not None:
    state = lm_lib.load_into(state, shardings, encoder_params, "encoder")
  examples = prompts.training_examples(split.train, u.cuts_per_user,
                                       config.seed + 1, tasks)  # seqio's too
  # held-out cuts index the full timelines (the train split lacks the
  # held-out events); the prompts keep the training shapes
  score = evaluation.candidate_scorer(model)
  valid, test = (evaluation.TaskEvaluator(
      score, builder.over(timelines),
      prompts.held_out_examples(held_out, tasks[0], u.eval_users, config.seed),
      tasks, name, config.train.eval_batch_size, u.candidate_chunk, mesh)
      for name, held_out in (("valid", split.valid), ("test", split.test)))
  if u.eval_base:  # before any training: the base LLM (fresh adapters are no-ops)
    results.update(test.evaluate(state.params, scorer="base"))
  train_step = train_loop.make_train_step(functools.partial(
      ul.lm_loss, model, mask,
      aux_weight=u.aux_item_weight if model.config.uses_user else 0.0), tx)
  batches = task_batches(config, workdir, builder, timelines, examples, tasks)
  train_began = time.time()
  last_valid = {}  # {step: metrics} of fit's latest valid evaluation

  def evaluate_valid(s):
    last_valid.clear()
    last_valid[int(s.step)] = valid.evaluate(s.params)
    return last_valid[int(s.step)]

  state = stages.fit(STAGES["task"], name, config,
                     state=state, shardings=shardings, train_step=train_step,
                     batches=batches, mesh=mesh, workdir=workdir,
                     eval_fn=evaluate_valid)
  results["train_seconds"] = time.time() - train_began
  if u.step_time_repeats:
    results["train_step_seconds"] = train_loop.step_seconds(
        train_step, state, mesh_lib.put_batch(batches(0), mesh),
        repeats=u.step_time_repeats)

  # 4. evaluation
  if u.eval_valid:  # fit scored the final model already when eval_every > 0
    results.update(last_valid.get(int(state.step)) or valid.evaluate(state.params))
  results.update(test.evaluate(state.params))
  prior = evaluation.prior_scores(builder, examples, tasks, split.train.item_ids,
                                  config.seed)
  results.update(test.evaluate(None, scorer="prior", fixed_scores=prior))
  results.update(cost_figures(config, model, state, mask, builder, test))
  results.update(evaluation.gate_values(jax.device_get(state.params["llm"])))
  if model.config.uses_user:  # where the user is lost, if it is
    probe_train = prompts.training_examples(split.train, 1, config.seed + 2,
                                            ("favourite_genre",))
    probe_train = prompts.Examples(*(a[:u.probe_examples] for a in (
        probe_train.users, probe_train.cuts, probe_train.tasks)))
    results.update(evaluation.user_information_probe(
        model, state.params, builder, probe_train, test.builder, test.examples,
        "test"))
  results.update({"eval_users": float(len(test.examples)),
                  "steps": float(state.step), "wall_seconds": time.time() - began})
  return results


def cost_figures(config, model: ul.UserLLM, state, mask, builder, test) -> dict:
  """What the run costs: LLM input tokens per example, sequence length,
  parameter counts (all, trainable, adapters by tree and by formula)."""
  u, llm_cfg = config.userllm, model.config.llm
  sample = test.builder.batch(test.examples,
                              np.arange(min(len(test.examples), 64)),
                              with_answers=False)
  user_tokens = (model.config.num_latents or u.history_len) if (
      model.config.integration == "soft_prompt") else 0
  adapter = llm_cfg.adapter
  return {
      "llm_input_tokens": float(sample["prompt_mask"].sum(1).mean()) + user_tokens,
      "llm_sequence_length": float(builder.prompt_len + builder.answer_len),
      "vocab_size": float(builder.tokenizer.vocab_size),
      "trainable_parameters": float(sum(
          x.size for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask))
          if m)),
      "parameters": float(sum(x.size for x in jax.tree.leaves(state.params))),
      "adapter_parameters": float(adapters.tree_count(state.params)),
      "adapter_parameters_formula": float(adapters.formula_count(adapter, llm_cfg)),
      "adapter_rank": float(adapter.rank if adapter.enabled else 0),
      "adapter_experts": float(adapter.experts if adapter.enabled else 0)}


# --- a finished workdir (main.py --mode; docs/using.md) --------------------------

def evaluate(config: ml_collections.ConfigDict, workdir: str, mesh
             ) -> dict[str, float]:
  """--mode=eval: `run` with every stage restored from its checkpoints and
  none trained (one not finished is a WorkdirError naming it)."""
  with use.restoring():
    return run(config, workdir, mesh)


@dataclasses.dataclass
class Trained:
  """A finished run's task model (stage 3), restored."""
  model: ul.UserLLM
  params: dict  # on the mesh
  builder: prompts.PromptBuilder  # stage 3's prompts, over the full timelines
  tokenizer: Tokenizer
  stage: str  # its workdir sub-directory


def trained(config, workdir: str, mesh) -> Trained:
  """Stage 3's UserLLM restored from `workdir` (never trained: a stage that
  is not finished is a WorkdirError); the LLM's shape read off
  config.llm.checkpoint when the run started from one, as `run` builds it."""
  builders.check(config)
  u = config.userllm
  timelines = sources.load_timelines(config.data)
  sources.require_item_text(timelines, config.workflow)  # titles for prompts
  split = splits.leave_last_out(timelines)
  tokenizer = builders.tokenizer_for(config, workdir, timelines)
  base = (lm_lib.pretrained(config, config.llm.checkpoint, mesh)[0]
          if config.llm.checkpoint else None)
  model = builders.build_model(config, timelines, tokenizer.vocab_size, u.method,
                               base)
  builder = task_prompts(config, split.train, tokenizer,
                         builders.tasks_of(config, "tasks"))
  state, *_ = builders.init_state(model, u.strategy, config.train, config.seed,
                                  mesh, builder, u.new_params_lr_scale)
  name = builders.stage_name(config, model)
  state = use.restore(f"{workdir}/{name}", config.train,
                      STAGES["task"].identity(config), state, name, "config.train")
  return Trained(model, state.params, builder.over(timelines), tokenizer, name)


ANSWERED_BY = ("candidate ranking: every answer the task has (each title, genre, "
               "rating, ...) scored by its log-likelihood after the task prompt "
               "under the trained User-LLM, as the evaluation scores them; "
               "probability: softmax over the candidates ranked")


def answer(config, workdir: str, mesh, users: list[str], task: str, k: int,
           item: int | None = None) -> dict:
  """--mode=answer: `task`'s k best answers for each of `users` (ids of the
  data files) after the user's whole history (ANSWERED_BY; next_title leaves
  out the titles the user rated). The item tasks (rating, title_genre) ask
  about `item` (an item id of the data files). Writes
  `<workdir>/use/answers_<task>.json`; returns the same payload."""
  check_task(task, item)
  t = trained(config, workdir, mesh)
  rows = ranked_answers(config, t, mesh, users, task, k, item)
  payload = {"workflow": "user_llm", "workdir": workdir, "stage": t.stage,
             "task": task, "k": k, "answered_by": ANSWERED_BY, "users": rows}
  use.save(workdir, f"answers_{task}", payload)
  return payload


def recommend(config, workdir: str, mesh, users: list[str], k: int) -> dict:
  """--mode=recommend: the `answer` of next_title, the k titles the User-LLM
  finds likeliest next among those each user has not rated. Writes
  `<workdir>/use/recommendations.json`; returns the same payload."""
  t = trained(config, workdir, mesh)
  rows = ranked_answers(config, t, mesh, users, "next_title", k)
  for row in rows:
    row["recommendations"] = row.pop("answers")
  payload = {"workflow": "user_llm", "workdir": workdir, "stage": t.stage, "k": k,
             "scored_by": ANSWERED_BY + "; rated titles excluded", "users": rows}
  use.save(workdir, "recommendations", payload)
  return payload


def check_task(task: str, item: int | None) -> None:
  """--task names a task; the item tasks need --item."""
  if task not in prompts.TASKS:
    raise ConfigError(f"--task={task!r} is not one of {', '.join(prompts.TASKS)}")
  if task in prompts.ITEM_TASKS and item is None:
    raise ConfigError(f"--task={task} asks about an item: give --item=<an item "
                      "id of the data files>")


def ranked_answers(config, t: Trained, mesh, users: list[str], task: str, k: int,
                   item: int | None = None) -> list[dict]:
  """[{user..., "answers": the k best, with log-likelihood and probability}]
  for each of `users` at the end of its history (see `answer`)."""
  check_task(task, item)
  timelines = t.builder.timelines
  asked = use.user_indices(timelines, users)
  asked_item = (use.item_index(timelines, item, "--item")
                if task in prompts.ITEM_TASKS else None)
  # the question at a cut after the whole history: one more event per user,
  # the item asked about (or the user's last one: only item tasks read it)
  items = np.array([asked_item or timelines.user_items(u)[-1] for u in asked])
  builder = t.builder.over(use.with_next_event(timelines, asked, items))
  examples = prompts.Examples(asked.astype(np.int32),
                              timelines.lengths[asked].astype(np.int32),
                              np.full(len(asked), prompts.TASKS.index(task), np.int32))
  scores = evaluation.TaskEvaluator(
      evaluation.candidate_scorer(t.model), builder, examples, (task,), "use",
      config.train.eval_batch_size, config.userllm.candidate_chunk, mesh
  ).scores(t.params, task)
  texts = candidate_texts(builder, task)
  rows = []
  for row, user in enumerate(asked):
    excluded = np.zeros(len(texts), bool)
    if task in prompts.TITLE_TASKS:
      excluded[0] = True  # the padding item's empty answer
      if task == "next_title":
        excluded[timelines.user_items(user)] = True
    best, probability = use.top_k(scores[row], excluded, k)
    entry = {**use.user_entry(timelines, user), "answers": [
        {**(use.item_entry(timelines, a) if task in prompts.TITLE_TASKS
            else {"answer": texts[a]}),
         "log_likelihood": float(scores[row, a]), "probability": float(p)}
        for a, p in zip(best, probability)]}
    if asked_item is not None:
      entry["asked_about"] = use.item_entry(timelines, asked_item)
    rows.append(entry)
  return rows


def candidate_texts(builder: prompts.PromptBuilder, task: str) -> list[str]:
  """Every answer of `task` as text, in the order of its candidates."""
  items = builder.timelines.items
  if task in prompts.TITLE_TASKS:
    return [str(title) for title in items.titles]
  if task in ("favourite_genre", "title_genre"):
    return list(items.genre_names)
  return list(prompts.RATINGS) if task == "rating" else builder.summary_texts()


def export(config, workdir: str, mesh, out: str) -> dict:
  """--mode=export: the task model's LLM (LoRA merged; MoLoRA / MoDE beside
  the base weights, unmerged) in the released Gemma layout under `out`, the
  encoder, Perceiver, projector and cross-attention blocks with their gates
  beside it (userllm/export.py). Returns the manifest (export.json)."""
  export_lib.check_out(out)
  t = trained(config, workdir, mesh)
  params = jax.device_get(t.params)
  parts = {k: v for k, v in params.items() if k != "llm"}
  user_config = {k: v for k, v in dataclasses.asdict(t.model.config).items()
                 if k != "llm"}
  return export_lib.write(
      out, params["llm"], t.model.config.llm, t.tokenizer.path,
      variant=config.llm.variant, user_parts=parts,
      user_config={"method": config.userllm.method, **user_config},
      about={"workflow": "user_llm", "workdir": workdir, "stage": t.stage,
             "method": config.userllm.method})
