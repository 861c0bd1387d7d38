"""Scoring the LLM tasks: every task's closed candidate set (every item title,
every genre name, ...) ranked by log-likelihood under the model, for held-out
users, and the metrics of those rankings.

- `candidate_scorer(model)`: one jitted (params, batch, candidates, mask) ->
  [b, c] log-likelihoods per model, the user's conditioning computed inside;
- `candidate_chunks`: candidates grouped by length so each group is scored at
  its own padded width (titles average ~10 pieces but pad to ~35);
- `TaskEvaluator.evaluate(params)`: `<split>/<scorer>/<task>/<metric>` for every
  task (next title: Recall@1/5/10 and NDCG over all titles, the user's seen
  items excluded; the others: accuracy, rating also MAE) plus
  `<split>/<scorer>/all/average`, the mean of each task's headline metric;
- `prior_scores`: the user-independent baseline (answers ranked by how often
  they are right in training; next title: item popularity).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from data import prompts, sequences
from infra import evaluation, mesh as mesh_lib, ranking, results
from userllm import user_llm as ul
from userllm.models import decoding, llm as llm_lib

HEADLINE = {"next_title": "recall@10", "favourite_genre": "accuracy",
            "rating": "accuracy", "title_genre": "accuracy", "summary": "accuracy",
            "last_title": "recall@10"}


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


def predicted_answers(scores: np.ndarray) -> np.ndarray:
  """[n] the best-scored answer of each row of scores [n, answers]; -1 where a
  score of the row is not finite (a broken model never answers right)."""
  return np.where(np.isfinite(scores).all(1), np.argmax(scores, 1), -1)


class TaskEvaluator:
  """Ranks every task's candidates by log-likelihood for held-out users."""

  def __init__(self, score, builder: prompts.PromptBuilder, examples: prompts.Examples,
               tasks, split: str, batch_size: int, candidate_chunk: int, mesh):
    """`score`: a `candidate_scorer`, shared by the splits' evaluators so that
    each candidate width compiles once (None: fixed scores only); `builder`
    reads the full timelines (held-out cuts index them)."""
    self.score, self.builder, self.examples = score, builder, examples
    self.timelines, self.tasks, self.split = builder.timelines, tuple(tasks), split
    self.batch_size, self.mesh = batch_size, mesh
    self.candidate_chunk = candidate_chunk

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
    for rows, real in evaluation.padded_rows(len(self.examples), self.batch_size):
      batch = mesh_lib.put_batch(self.prompt_batch(task, rows), self.mesh)
      scores = np.empty((len(rows), len(candidates)), np.float32)
      for ids, width in chunks:
        scores[:, ids] = np.asarray(self.score(
            params, batch, candidates[ids, :width], candidate_mask[ids, :width]))
      out.append(scores[:real])
    return np.concatenate(out)

  def targets(self, task: str = "next_title") -> np.ndarray:
    """[n] the item at each held-out cut (last_title: the one before it)."""
    ex, tl = self.examples, self.timelines
    return tl.item_ids[tl.user_offsets[ex.users] + ex.cuts
                       - (task == "last_title")]

  def title_metrics(self, task: str, scores: np.ndarray) -> dict[str, float]:
    """Ranking metrics of title scores [n or 1, num_items + 1]: among unseen
    items for next_title, among all items for last_title (a seen one)."""
    ex, tl = self.examples, self.timelines
    seen = ([tl.user_items(u)[:c] for u, c in zip(ex.users, ex.cuts)]
            if task == "next_title" else [])
    excluded = sequences.excluded_items(seen, len(ex), tl.num_items + 1)
    ranks = np.asarray(ranking.target_ranks(
        np.broadcast_to(scores, excluded.shape), self.targets(task), excluded))
    return ranking.metrics_from_ranks(ranks)

  def labels(self, task: str) -> np.ndarray:
    """[n] index of each held-out example's right answer (see PromptBuilder)."""
    ex = self.examples
    return np.array([self.builder.label(int(u), int(c), task)
                     for u, c in zip(ex.users, ex.cuts)], np.int64)

  def task_metrics(self, task: str, scores: np.ndarray) -> dict[str, float]:
    """`task`'s metrics of scores [n or 1, answers]."""
    if task in prompts.TITLE_TASKS:
      return self.title_metrics(task, scores)
    predicted = predicted_answers(np.broadcast_to(
        scores, (len(self.examples), scores.shape[1])))
    labels = self.labels(task)
    broken = predicted < 0  # a row with a non-finite score answers wrongly
    if task == "title_genre":  # any of the item's genres is right
      correct = self.timelines.items.genres[self.targets(), predicted] > 0
    else:
      correct = predicted == labels
    metrics = {"accuracy": float(np.mean(correct & ~broken))}
    if task == "rating":  # buckets are ordered: how far off, in stars
      worst = np.maximum(labels, len(prompts.RATINGS) - 1 - labels)
      metrics["mae"] = float(np.mean(np.where(broken, worst,
                                              np.abs(predicted - labels))))
    return metrics

  def evaluate(self, params, scorer: str = "model",
               fixed_scores: dict | None = None) -> dict[str, float]:
    """`<split>/<scorer>/<task>/<metric>` for every task and the average of
    the headline metrics; the model's scores with `params`, or `fixed_scores`
    ({task: [1, answers]}, e.g. the prior). One progress line per task."""
    out, headline = {}, []
    for task in self.tasks:
      began = time.time()
      scores = (self.scores(params, task) if fixed_scores is None
                else fixed_scores[task])
      metrics = self.task_metrics(task, scores)
      out.update(results.prefixed(metrics, self.split, scorer, task))
      headline.append(metrics[HEADLINE[task]])
      print(f"[eval {self.split}/{scorer}] {task} {HEADLINE[task]}="
            f"{headline[-1]:.3f} ({len(self.examples)} users, "
            f"{time.time() - began:.0f} s)", flush=True)
    out[results.key(self.split, scorer, "all", "average")] = float(np.mean(headline))
    return out


def prior_scores(builder: prompts.PromptBuilder, examples: prompts.Examples,
                 tasks, train_item_ids, seed: int) -> dict:
  """Baseline scores that ignore the user: each task's answers ranked by how
  often they are right in training (for titles: item popularity).
  {task: [1, answers]}."""
  out = {}
  for task in tasks:
    if task in prompts.TITLE_TASKS:
      out[task] = ranking.popularity_scores(
          train_item_ids, builder.timelines.num_items + 1, seed)[None]
      continue
    rows = np.flatnonzero(examples.tasks == prompts.TASKS.index(task))
    labels = [builder.label(int(examples.users[r]), int(examples.cuts[r]), task)
              for r in rows]
    out[task] = np.bincount(labels, minlength=len(builder.answers[task]))[None]
  return out


def encoder_next_item(encoder, params, timelines, held_out, history_len: int,
                      max_users: int, seed: int, split: str,
                      batch_size: int = 64) -> dict[str, float]:
  """The pretrained user encoder's own next-item quality: full-ranking Recall /
  NDCG of each held-out user's next item from the encoder's item logits at the
  last of its latest `history_len` events (seen items excluded), keyed
  `<split>/encoder/next_item/<metric>`. Tells whether the user tokens can carry
  the next item at all, before any LLM reads them."""
  examples = prompts.held_out_examples(held_out, "next_title", max_users, seed)
  vocab = timelines.num_items + 1

  @jax.jit
  def ranks_of(events, lengths, targets, excluded):
    states = encoder.apply({"params": params}, events["items"], ratings=events[
        "ratings"], genres=events["genres"], method=encoder.encode)
    last = jax.numpy.take_along_axis(states, (lengths - 1)[:, None, None], 1)[:, 0]
    scores = encoder.apply({"params": params}, last, method=encoder.item_logits)
    return ranking.target_ranks(scores, targets, excluded)

  out = []
  for rows, real in evaluation.padded_rows(len(examples), batch_size):
    events = prompts.history_events(timelines, examples, rows, history_len)
    lengths = np.maximum((events["items"] != 0).sum(1), 1)
    offsets = timelines.user_offsets[examples.users[rows]]
    seen = [timelines.item_ids[o:o + c] for o, c in
            zip(offsets[:real], examples.cuts[rows][:real])]
    targets = timelines.item_ids[offsets + examples.cuts[rows]]
    excluded = sequences.excluded_items(seen, len(rows), vocab)
    out.append(np.asarray(ranks_of(events, lengths, targets, excluded))[:real])
  return results.prefixed(ranking.metrics_from_ranks(np.concatenate(out)),
                          split, "encoder", "next_item")


def gate_values(llm_params: dict) -> dict[str, float]:
  """tanh of the cross-attention blocks' gates (0: the block is a no-op), the
  mean over blocks: how far stage 3 opened the LLM to the user tokens."""
  blocks = [v for k, v in llm_params.items() if k.startswith("cross_attention_")]
  if not blocks:
    return {}
  return {f"cross_attention_{gate}_tanh": float(np.mean(
      [np.tanh(np.asarray(b[gate])) for b in blocks]))
          for gate in ("attn_gate", "mlp_gate")}


def user_information_probe(model: ul.UserLLM, params, builder: prompts.PromptBuilder,
                           train: prompts.Examples,
                           held_out_builder: prompts.PromptBuilder,
                           held_out: prompts.Examples, split: str,
                           task: str = "favourite_genre",
                           batch_size: int = 64) -> dict[str, float]:
  """Linear probes for `task` (logistic regression, fit on `train` through
  `builder`, scored on `held_out` through `held_out_builder`, the builder over
  the timelines its cuts index) from what each stage of the user path hands to the next: the
  encoder's state at the last event, and the mean of the user tokens the LLM
  reads (after Perceiver and projector). A drop between the two says the
  Perceiver / projector lose the user; a high user-token probe with a low task
  score says the LLM does not read them. Keys
  `<split>/probe_encoder|probe_user_tokens/<task>/accuracy`."""
  from sklearn.linear_model import LogisticRegression

  @jax.jit
  def features(params, events):
    def encoder_last(module, events):
      states = module.encoder.encode(events["items"], ratings=events["ratings"],
                                     genres=events["genres"])
      lengths = jax.numpy.maximum((events["items"] != 0).sum(1), 1)
      return jax.numpy.take_along_axis(states, (lengths - 1)[:, None, None], 1)[:, 0]
    last = model.apply({"params": params}, events, method=encoder_last)
    tokens, mask = model.apply({"params": params}, events, method=model.user_tokens)
    return last, ul.mean_token(tokens, mask)

  def collect(builder, examples):
    parts, labels = [], []
    for rows, real in evaluation.padded_rows(len(examples), batch_size):
      out = features(params, builder.events(examples, rows))
      parts.append([np.asarray(x)[:real] for x in out])
      labels += [builder.label(examples.users[r], examples.cuts[r], task)
                 for r in rows[:real]]
    return [np.concatenate(p) for p in zip(*parts)], np.asarray(labels)

  (train_enc, train_tok), train_y = collect(builder, train)
  (test_enc, test_tok), test_y = collect(held_out_builder, held_out)
  out = {}
  for name, x_train, x_test in (("probe_encoder", train_enc, test_enc),
                                ("probe_user_tokens", train_tok, test_tok)):
    scale = x_train.std(0) + 1e-6  # standardised: one regularisation fits both
    center = x_train.mean(0)
    probe = LogisticRegression(max_iter=2000).fit((x_train - center) / scale, train_y)
    out[f"{split}/{name}/{task}/accuracy"] = float(
        probe.score((x_test - center) / scale, test_y))
  return out
