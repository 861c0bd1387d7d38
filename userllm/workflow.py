"""Workflow `user_llm`: LM pretraining -> user-encoder pretraining -> User-LLM.

Stages, each a `train_loop.fit` run in its own sub-directory of the workdir
(`lm`, `encoder_h<H>`, `<method>_h<H>` for history length H), so each resumes on
its own and a finished stage is not rerun by a later method or a rerun:
1. `lm`: the decoder LM trained from scratch on the data's task text (text
   prompts with `lm_history` titles of history), so that it can write titles
   and genres. Skipped when `config.llm.checkpoint` names a Gemma checkpoint,
   which is loaded instead (with its tokenizer, `config.llm.tokenizer`).
2. `encoder`: the fused user encoder pretrained autoregressively on the
   training timelines (next item, genres and rating). Only for user-embedding
   methods.
3. `<method>`: the task model, started from stages 1-2 and trained with
   `config.userllm.strategy` on both tasks. Methods: `cross_attention`,
   `soft_prompt` (User-LLM), `text_prompt` (history as titles in the prompt),
   `no_history` (the bare task prompt).

Evaluation (leave-last-out, valid and test): next title by ranking *every*
item's title by its log-likelihood under the model (Recall@1/5/10, NDCG; items
already in the user's history excluded, as in `infra/ranking.py`), favourite
genre by the most likely genre name (accuracy).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from data import prompts, sources, splits
from data.sequences import EpochBatcher
from data.vocab import Tokenizer, train_vocabulary
from infra import mesh as mesh_lib, ranking, train_loop
from infra.errors import ConfigError
from userllm import adapters, decoding, gemma_loader, llm as llm_lib
from userllm import sequence_model as sm, user_llm as ul
from userllm.next_item import make_optimizer

METHODS = ("cross_attention", "soft_prompt", "text_prompt", "no_history")
_INTEGRATION = {"cross_attention": "cross_attention", "soft_prompt": "soft_prompt",
                "text_prompt": "text", "no_history": "text"}


def tokenizer_for(config, workdir: str, timelines) -> Tokenizer:
  """Gemma's tokenizer, config.data.vocab_path, or one trained on the data."""
  path = config.llm.tokenizer or config.data.vocab_path
  if path:
    return Tokenizer(path)
  path = os.path.join(workdir, "spm.model")
  if not os.path.exists(path):
    train_vocabulary(prompts.corpus(timelines), path, config.data.vocab_size)
  return Tokenizer(path)


def llm_config(config, vocab_size: int, method: str,
               base: llm_lib.LLMConfig | None = None,
               with_adapters: bool = True) -> llm_lib.LLMConfig:
  """config.llm (shape from `base`, a loaded Gemma's config, when given) with
  cross-attention for `method` and the adapters of config.adapter."""
  fields = dict(config.llm.to_dict())
  for key in ("checkpoint", "tokenizer"):
    fields.pop(key)
  fields["cross_attention_every"] = (fields["cross_attention_every"]
                                     if method == "cross_attention" else 0)
  try:
    cfg = llm_lib.LLMConfig(vocab_size=vocab_size, **fields).validate()
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.llm: {e}") from None
  if base is not None:
    cfg = dataclasses.replace(base, cross_attention_every=cfg.cross_attention_every,
                              dtype=cfg.dtype)
  if not with_adapters:
    return cfg
  return dataclasses.replace(cfg, adapter=adapter_config(config, cfg))


def adapter_config(config, llm: llm_lib.LLMConfig) -> adapters.AdapterConfig:
  """config.adapter; with `match_params_of` naming another kind, the rank that
  brings this kind's trainable count closest to that kind's at the configured
  rank and experts (MoDE and MoLoRA match exactly when rank = num_experts)."""
  fields = dict(config.get("adapter", {"kind": "none"}))
  match = fields.pop("match_params_of", "")
  targets = fields.get("targets", adapters.AdapterConfig.targets)
  if isinstance(targets, str):
    targets = [t.strip() for t in targets.split(",") if t.strip()]
  fields.update(targets=tuple(targets), num_tasks=len(prompts.TASKS))
  try:
    cfg = adapters.AdapterConfig(**fields).validate()
    if match and cfg.enabled and match != cfg.kind:
      reference = dataclasses.replace(cfg, kind=match).validate()
      cfg = adapters.match_budget(cfg, llm, adapters.formula_count(reference, llm))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{e}" if str(e).startswith("adapter.")
                      else f"config.adapter: {e}") from None
  return cfg


def encoder_config(config, timelines) -> sm.SequenceModelConfig:
  try:
    return sm.SequenceModelConfig.from_config(
        config.encoder, timelines.num_items + 1, config.userllm.history_len + 1,
        num_genres=len(timelines.items.genre_names)).validate()
  except ValueError as e:
    raise ConfigError(f"config.encoder: {e}") from None


def build_model(config, timelines, vocab_size: int, method: str,
                base: llm_lib.LLMConfig | None = None,
                with_adapters: bool = True) -> ul.UserLLM:
  """The UserLLM for `method`; `base` (a loaded Gemma's config) fixes the LLM's
  shape, the config adds cross-attention, adapters and dtype."""
  cfg = llm_config(config, vocab_size, method, base, with_adapters)
  u = config.userllm
  return ul.UserLLM(ul.UserLLMConfig(
      encoder=encoder_config(config, timelines), llm=cfg,
      integration=_INTEGRATION[method], num_latents=u.num_latents,
      perceiver_layers=u.perceiver_layers, perceiver_heads=u.perceiver_heads))


class Stage:
  """Runs one stage through `train_loop.fit` in `<workdir>/<stage name>`."""

  def __init__(self, mesh, workdir: str):
    self.mesh, self.workdir = mesh, workdir

  def fit(self, name: str, state, shardings, loss_fn, tx, batch_fn,
          train: ml_collections.ConfigDict, train_field: str, eval_fn=None):
    """`train` is the stage's schedule, found at `config.<train_field>`."""
    mesh_lib.check_batch_divides(train.batch_size, self.mesh,
                                 f"config.{train_field}.batch_size")
    return train_loop.fit(
        state=state, state_shardings=shardings,
        train_step=train_loop.make_train_step(loss_fn, tx), batch_fn=batch_fn,
        mesh=self.mesh, num_steps=train.num_steps,
        workdir=os.path.join(self.workdir, name),
        checkpoint_every=train.checkpoint_every,
        keep_checkpoints=train.keep_checkpoints, log_every=train.log_every,
        eval_every=train.eval_every if eval_fn else 0, eval_fn=eval_fn,
        stop_after_steps=train.stop_after_steps, name=name)


def _example_batches(builder: prompts.PromptBuilder, examples: prompts.Examples,
                     batch_size: int, seed: int):
  rows = EpochBatcher(np.arange(len(examples)), batch_size, seed)
  keys = ("tokens", "token_mask", "target_mask", "events")
  return lambda step: {k: v for k, v in builder.batch(examples, rows(step)).items()
                       if k in keys}


def init_user_llm_state(model: ul.UserLLM, strategy: str, train, config, mesh,
                        builder: prompts.PromptBuilder):
  """(state, shardings, tx, trainable mask) for a UserLLM, parameters fresh."""
  rows = np.arange(1)
  dummy = builder.batch(prompts.Examples(np.zeros(1, np.int32), np.ones(1, np.int32),
                                         np.zeros(1, np.int32)), rows)
  init = lambda rng: model.init(rng, dummy.get("events"), dummy["tokens"],  # noqa: E731
                                dummy["token_mask"])["params"]
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init(jax.random.PRNGKey(0))))
  mask = ul.trainable_mask(shapes, strategy)
  tx = ul.masked_optimizer(make_optimizer(train), mask)
  state, shardings = train_loop.create_state(init, tx,
                                             jax.random.PRNGKey(config.seed), mesh)
  return state, shardings, tx, mask


def load_into(state, shardings, subtree: str, pretrained: dict):
  """state with params[subtree]'s matching leaves replaced by `pretrained`."""
  params = dict(state.params)
  params[subtree] = gemma_loader.merge_pretrained(
      jax.device_get(params[subtree]), pretrained, subtree)
  params = jax.device_put(params, shardings.params)
  return state.replace(params=params)


@functools.lru_cache(maxsize=None)
def candidate_scorer(model: ul.UserLLM):
  """One jitted fn per model: (params, batch, candidates, candidate_mask) ->
  [b, c] log-likelihoods, the user's conditioning computed inside."""
  llm = llm_lib.DecoderLM(model.config.llm)

  @jax.jit
  def score(params, batch, candidates, candidate_mask):
    conditioning = model.apply({"params": params}, batch.get("events"),
                               method=model.conditioning)
    conditioning["task_ids"] = batch["task_ids"]  # task-routed adapters read it
    return decoding.score_continuations(
        llm, params["llm"], batch["prompt"], batch["prompt_mask"], candidates,
        candidate_mask, conditioning)
  return score


def candidate_chunks(lengths: np.ndarray, chunk: int, limit: int,
                     multiple: int = 8) -> list[tuple[np.ndarray, int]]:
  """Candidates grouped by length into calls of `chunk` rows: [(row ids
  [chunk], width)], width = the group's longest, rounded up to `multiple` (few
  compiled shapes). Titles are short but padded to the longest, so scoring
  each group at its own width saves most of the padding's compute. The last
  group repeats its last row to keep `chunk` rows (one shape per width)."""
  order = np.argsort(lengths, kind="stable")
  chunk = min(chunk, len(order))
  groups = []
  for start in range(0, len(order), chunk):
    ids = order[start:start + chunk]
    ids = np.concatenate([ids, np.full(chunk - len(ids), ids[-1])])
    width = -(-max(int(lengths[ids].max()), 1) // multiple) * multiple
    groups.append((ids, min(width, limit)))
  return groups


class Evaluator:
  """Ranks every item title / genre name by log-likelihood for held-out users."""

  def __init__(self, score, builder: prompts.PromptBuilder,
               timelines, examples: prompts.Examples, batch_size: int,
               candidate_chunk: int, mesh):
    """`score`: a `candidate_scorer`, shared by the splits' evaluators so that
    each candidate width compiles once; None: fixed scores only (baselines)."""
    self.score, self.builder, self.examples = score, builder, examples
    self.timelines, self.batch_size, self.mesh = timelines, batch_size, mesh
    self.candidate_chunk = candidate_chunk

  def _padded_rows(self):
    n, b = len(self.examples), self.batch_size
    for start in range(0, n, b):
      rows = np.arange(start, min(start + b, n))
      yield np.concatenate([rows, np.full(b - len(rows), rows[-1])]), len(rows)

  def prompt_batch(self, task: str, rows: np.ndarray) -> dict:
    """Prompts (and events) of held-out `rows`, asking for `task`."""
    examples = dataclasses.replace(
        self.examples, tasks=np.full(len(self.examples), prompts.TASKS.index(task),
                                     np.int32))
    return self.builder.batch(examples, rows, with_answers=False)

  def scores(self, params, task: str) -> np.ndarray:
    """[n, num candidates] log-likelihoods."""
    candidates, candidate_mask = self.builder.candidates(task)
    chunks = candidate_chunks(candidate_mask.sum(1), self.candidate_chunk,
                              candidates.shape[1])
    out = []
    for rows, real in self._padded_rows():
      batch = self.prompt_batch(task, rows)
      batch = mesh_lib.put_batch(batch, self.mesh)
      scores = np.empty((len(rows), len(candidates)), np.float32)
      for ids, width in chunks:
        scores[:, ids] = np.asarray(self.score(
            params, batch, candidates[ids, :width], candidate_mask[ids, :width]))
      out.append(scores[:real])
    return np.concatenate(out)

  def targets_and_seen(self) -> tuple[np.ndarray, np.ndarray]:
    """[n] target items and [n, num_items + 1] items seen before each cut."""
    ex, tl = self.examples, self.timelines
    targets = tl.item_ids[tl.user_offsets[ex.users] + ex.cuts]
    seen = ranking.seen_mask([tl.user_items(u)[:c] for u, c in zip(ex.users, ex.cuts)],
                             len(ex), tl.num_items + 1)
    return targets, seen

  def next_title_metrics(self, params, scores: np.ndarray | None = None
                         ) -> dict[str, float]:
    """Ranking metrics of the model, or of fixed `scores` [n, num_items + 1]."""
    if scores is None:
      scores = self.scores(params, "next_title")
    targets, seen = self.targets_and_seen()
    ranks = np.asarray(ranking.target_ranks(np.broadcast_to(scores, seen.shape),
                                            targets, seen))
    return ranking.metrics_from_ranks(ranks)

  def labels(self, task: str) -> np.ndarray:
    """[n] index of each held-out example's right answer (see PromptBuilder)."""
    ex = self.examples
    return np.array([self.builder.label(int(u), int(c), task)
                     for u, c in zip(ex.users, ex.cuts)], np.int64)

  def task_metrics(self, params, task: str, scores: np.ndarray | None = None
                   ) -> dict[str, float]:
    """`task`'s metrics of the model, or of fixed `scores` [n or 1, answers]."""
    if task == "next_title":
      return self.next_title_metrics(params, scores)
    if scores is None:
      scores = self.scores(params, task)
    predicted = np.broadcast_to(scores, (len(self.examples), scores.shape[1])
                                ).argmax(1)
    labels = self.labels(task)
    if task == "title_genre":  # any of the item's genres is right
      targets = self.timelines.item_ids[self.timelines.user_offsets[
          self.examples.users] + self.examples.cuts]
      correct = self.timelines.items.genres[targets, predicted] > 0
    else:
      correct = predicted == labels
    metrics = {"accuracy": float(np.mean(correct))}
    if task == "rating":  # buckets are ordered: how far off, in stars
      metrics["mae"] = float(np.mean(np.abs(predicted - labels)))
    return metrics

  def all_metrics(self, params, tasks, scores: dict | None = None,
                  label: str = "") -> dict[str, float]:
    """{"<task>/<metric>", "average": mean headline metric} over `tasks`;
    with a `label`, one progress line per task (scoring takes minutes)."""
    out = {}
    for task in tasks:
      fixed = None if scores is None else scores[task]
      began = time.time()
      out.update({f"{task}/{k}": v
                  for k, v in self.task_metrics(params, task, fixed).items()})
      if label:
        print(f"[eval {label}] {task} {HEADLINE[task]}="
              f"{out[f'{task}/{HEADLINE[task]}']:.3f} ({len(self.examples)} users, "
              f"{time.time() - began:.0f} s)", flush=True)
    out["average"] = float(np.mean([out[f"{t}/{HEADLINE[t]}"] for t in tasks]))
    return out


HEADLINE = {"next_title": "recall@10", "favourite_genre": "accuracy",
            "rating": "accuracy", "title_genre": "accuracy", "summary": "accuracy"}


def prior_scores(builder: prompts.PromptBuilder, examples: prompts.Examples,
                 tasks, num_items: int, train_item_ids, seed: int) -> dict:
  """Baseline scores that ignore the user: each task's answers ranked by how
  often they are right in training (for next_title: item popularity).
  {task: [1, answers]}."""
  out = {}
  for task in tasks:
    if task == "next_title":
      out[task] = ranking.popularity_scores(train_item_ids, num_items + 1, seed)[None]
      continue
    rows = np.flatnonzero(examples.tasks == prompts.TASKS.index(task))
    labels = [builder.label(int(examples.users[r]), int(examples.cuts[r]), task)
              for r in rows]
    out[task] = np.bincount(labels, minlength=len(builder.answers[task]))[None]
  return out


def _tasks(config, field: str) -> tuple[str, ...]:
  value = config.userllm[field]
  tasks = tuple(t.strip() for t in value.split(",")) if isinstance(value, str) else (
      tuple(value))
  unknown = [t for t in tasks if t not in prompts.TASKS]
  if not tasks or unknown:
    raise ConfigError(f"config.userllm.{field}={value!r}: {unknown or 'empty'}; "
                      f"tasks are {prompts.TASKS}")
  return tasks


def _check(config):
  u = config.userllm
  if u.method not in METHODS:
    raise ConfigError(f"config.userllm.method={u.method!r} is not one of {METHODS}")
  if u.history_len < 1:
    raise ConfigError(f"config.userllm.history_len={u.history_len} must be >= 1")
  if u.strategy == "adapters" and config.get("adapter", {}).get("kind", "none") == "none":
    raise ConfigError("config.userllm.strategy='adapters' trains the adapters: "
                      "set config.adapter.kind (lora | molora | mode | molora_sd)")


def stage_name(config, model: ul.UserLLM) -> str:
  """`<method>_h<H>`, plus the adapter (`_mode_r4_e4`) when there is one."""
  u, adapter = config.userllm, model.config.llm.adapter
  name = f"{u.method}_h{u.history_len}"
  if adapter.enabled:
    name += f"_{adapter.kind}_r{adapter.rank}"
    name += f"_e{adapter.num_experts}" if adapter.kind != "lora" else ""
    name += f"_{adapter.router}" if adapter.router != "token" else ""
    name += f"_top{adapter.top_k}" if adapter.top_k else ""
  return name


def step_seconds(loss_fn, tx, state, batch, repeats: int = 10) -> float:
  """Median wall time of one jitted train step (compiled and warmed up first);
  the caller's state is not donated, so training is not affected."""
  step = jax.jit(train_loop.make_train_step(loss_fn, tx))  # no donation
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - began)
  return float(np.median(times))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  _check(config)
  began = time.time()
  u = config.userllm
  tasks, lm_tasks = _tasks(config, "tasks"), _tasks(config, "lm_tasks")
  timelines = sources.load_timelines(config.data)
  split = splits.leave_last_out(timelines)
  mesh = mesh_lib.make_mesh(config.mesh)
  tokenizer = tokenizer_for(config, workdir, timelines)
  print(f"[data] {timelines.name}: {timelines.num_users} users, "
        f"{timelines.num_items} items; vocabulary {tokenizer.vocab_size} pieces; "
        f"tasks {', '.join(tasks)}", flush=True)

  def builder_for(method, history_len, events=split.train):
    b = prompts.PromptBuilder(events, tokenizer, method, history_len,
                              u.text_prompt_len, answer_len=1,
                              show_ratings=u.text_ratings)
    both = tuple(dict.fromkeys(tasks + lm_tasks))
    b.answer_len = u.answer_len or b.longest_answer(both)
    b.prompt_len = min(u.text_prompt_len, b.longest_prompt(both))
    return b

  builder = builder_for(u.method, u.history_len)
  # Held-out cuts index the full timelines (the train split lacks the held-out
  # events), so evaluation prompts read them; shapes match the training ones.
  eval_builder = builder_for(u.method, u.history_len, timelines)
  eval_builder.prompt_len, eval_builder.answer_len = (builder.prompt_len,
                                                      builder.answer_len)
  results = {}

  # Stage 1: the LLM (Gemma, or trained from scratch on the lm_tasks' text).
  base = None
  if config.llm.checkpoint:
    # the embedding table's rows (256128 for Gemma) cover the tokenizer's pieces
    base, llm_params = gemma_loader.load_checkpoint(config.llm.checkpoint)
    if base.vocab_size < tokenizer.vocab_size:
      raise ConfigError(f"config.llm.tokenizer has {tokenizer.vocab_size} pieces, "
                        f"more than the checkpoint's {base.vocab_size} embeddings")
  else:
    lm_builder = builder_for("text_prompt", u.lm_history)
    lm_model = build_model(config, timelines, tokenizer.vocab_size, "text_prompt",
                           with_adapters=False)
    state, shardings, tx, mask = init_user_llm_state(
        lm_model, "full", config.lm_train, config, mesh, lm_builder)
    examples = prompts.training_examples(split.train, u.cuts_per_user, config.seed,
                                         lm_tasks)
    stage = Stage(mesh, workdir)
    state = stage.fit("lm", state, shardings,
                      functools.partial(ul.lm_loss, lm_model, mask), tx,
                      _example_batches(lm_builder, examples,
                                       config.lm_train.batch_size, config.seed),
                      config.lm_train, "lm_train")
    llm_params = jax.device_get(state.params["llm"])
    del state

  # Stage 2: the user encoder, pretrained on next-event features.
  model = build_model(config, timelines, tokenizer.vocab_size, u.method, base)
  encoder_params = None
  if model.config.uses_user:
    encoder_params = pretrain_encoder(config, split.train, model.config.encoder,
                                      mesh, workdir, results)

  # Stage 3: the task model.
  try:
    state, shardings, tx, mask = init_user_llm_state(model, u.strategy, config.train,
                                                     config, mesh, builder)
  except ValueError as e:
    raise ConfigError(f"config.userllm.strategy: {e}") from None
  state = load_into(state, shardings, "llm", llm_params)
  if encoder_params is not None:
    state = load_into(state, shardings, "encoder", encoder_params)
  examples = prompts.training_examples(split.train, u.cuts_per_user, config.seed + 1,
                                       tasks)
  score = candidate_scorer(model)
  held_out = lambda part: Evaluator(  # noqa: E731
      score, eval_builder, timelines, prompts.held_out_examples(
          part, tasks[0], u.eval_users, config.seed),
      config.train.eval_batch_size, u.candidate_chunk, mesh)
  valid, test = held_out(split.valid), held_out(split.test)
  if u.eval_base:  # before any training: the base LLM (fresh adapters are no-ops)
    for k, v in test.all_metrics(state.params, tasks, label="base/test").items():
      results[f"base/test/{k}"] = v
  loss_fn = functools.partial(ul.lm_loss, model, mask)
  batches = _example_batches(builder, examples, config.train.batch_size, config.seed)
  train_began = time.time()
  state = Stage(mesh, workdir).fit(
      stage_name(config, model), state, shardings, loss_fn, tx, batches,
      config.train, "train", eval_fn=lambda s: valid.all_metrics(s.params, tasks, label="valid"))
  results["train_seconds"] = time.time() - train_began
  results["train_step_seconds"] = step_seconds(
      loss_fn, tx, state, mesh_lib.put_batch(batches(0), mesh))

  for name, evaluator in ((("valid", valid),) if u.eval_valid else ()) + (
      ("test", test),):
    for k, v in evaluator.all_metrics(state.params, tasks, label=name).items():
      results[f"{name}/{k}"] = v
  prior = prior_scores(builder, examples, tasks, timelines.num_items,
                       split.train.item_ids, config.seed)
  for k, v in test.all_metrics(None, tasks, scores=prior).items():
    results[f"test/prior/{k}"] = v
  ex = test.examples
  sample = eval_builder.batch(ex, np.arange(min(len(ex), 64)), with_answers=False)
  user_tokens = (model.config.num_latents or u.history_len) if (
      u.method == "soft_prompt") else 0
  llm_cfg = model.config.llm
  results.update({
      "llm_input_tokens": float(sample["prompt_mask"].sum(1).mean()) + user_tokens,
      "llm_sequence_length": float(builder.prompt_len + builder.answer_len),
      "vocab_size": float(tokenizer.vocab_size),
      "trainable_parameters": float(sum(
          x.size for x, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask))
          if m)),
      "parameters": float(sum(x.size for x in jax.tree.leaves(state.params))),
      "adapter_parameters": float(adapters.tree_count(state.params)),
      "adapter_parameters_formula": float(adapters.formula_count(llm_cfg.adapter,
                                                                 llm_cfg)),
      "adapter_rank": float(llm_cfg.adapter.rank if llm_cfg.adapter.enabled else 0),
      "adapter_experts": float(llm_cfg.adapter.experts if llm_cfg.adapter.enabled
                               else 0),
      "eval_users": float(len(ex)), "steps": float(state.step),
      "wall_seconds": time.time() - began})
  return results


def pretrain_encoder(config, train_timelines, encoder_cfg: sm.SequenceModelConfig,
                     mesh, workdir: str, results: dict) -> dict:
  """Stage 2: next-event pretraining of the fused encoder; returns its params."""
  window = encoder_cfg.max_len  # history_len + 1 events: inputs and targets
  cuts = []
  for user, length in enumerate(train_timelines.lengths):
    cuts += [(user, end) for end in range(int(length), 1, -(window - 1))]
  examples = prompts.Examples(np.array([c[0] for c in cuts], np.int32),
                              np.array([c[1] for c in cuts], np.int32),
                              np.zeros(len(cuts), np.int32))
  events = functools.partial(prompts.history_events, train_timelines, examples,
                             history_len=window)
  encoder = sm.ItemSequenceTransformer(encoder_cfg)
  train = config.encoder_train
  tx = make_optimizer(train)
  dummy = events(np.arange(1))
  init = lambda rng: encoder.init(  # noqa: E731
      rng, dummy["items"], dummy["ratings"], dummy["genres"],
      method=encoder.next_event_logits)["params"]
  state, shardings = train_loop.create_state(init, tx, jax.random.PRNGKey(config.seed),
                                             mesh)
  rows = EpochBatcher(np.arange(len(examples)), train.batch_size, config.seed)
  state = Stage(mesh, workdir).fit(
      f"encoder_h{window - 1}", state, shardings, functools.partial(sm.next_event_loss, encoder),
      tx, lambda step: events(rows(step)), train, "encoder_train")
  results["encoder_pretrain_windows"] = float(len(examples))
  heads = ("genre_head", "rating_head")  # pretraining only: User-LLM reads states
  return {k: v for k, v in jax.device_get(state.params).items() if k not in heads}
