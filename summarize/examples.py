"""Users, cuts and fixed-shape token batches for summarisation.

A cut splits a user's timeline: the history is the latest `history_len` events
before it, the future the `future_len` events from it on. Training users give
random cuts; held-out users (valid and test, never trained on) are cut
`future_len` events before their end, as in UserSumBench.

The batches' token layout is the corpus's (summarize/corpus.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import prompts
from data import timelines as tl
from summarize import texts
from summarize.corpus import Corpus

PREDICTOR_TASKS = ("next_title", "favourite_genre", "rating")
DISTRACTORS = ("popularity_matched", "popularity", "uniform")
# the predictor's training contexts: a programmatic summary, or part of the
# history as text (the latest / random / earliest k events, or all), or none
CONTEXTS = ("summary", "last_k", "random_k", "first_k", "full", "none")


@dataclasses.dataclass(frozen=True)
class UserSplit:
  train: np.ndarray  # user indices
  valid: np.ndarray
  test: np.ndarray


def split_users(timelines: tl.UserTimelines, valid_users: int, test_users: int,
                min_history: int, future_len: int, seed: int) -> UserSplit:
  """Held-out users drawn from those with `min_history + future_len` events;
  every other user trains."""
  eligible = np.nonzero(timelines.lengths >= min_history + future_len)[0]
  if len(eligible) < valid_users + test_users + 1:
    raise ValueError(f"only {len(eligible)} users have {min_history + future_len}"
                     f" events; {valid_users} valid + {test_users} test asked")
  held = np.random.default_rng(seed).choice(eligible, valid_users + test_users,
                                            replace=False)
  train = np.setdiff1d(np.arange(timelines.num_users), held)
  return UserSplit(train, np.sort(held[:valid_users]), np.sort(held[valid_users:]))


@dataclasses.dataclass(frozen=True)
class Cuts:
  users: np.ndarray  # [n] int
  cuts: np.ndarray  # [n] int: index of the first event after the history

  def __len__(self) -> int:
    return len(self.users)


def training_cuts(timelines: tl.UserTimelines, users: np.ndarray, per_user: int,
                  min_history: int, seed: int) -> Cuts:
  """Up to `per_user` random cuts per user with >= min_history events before
  and one event at the cut."""
  rng = np.random.default_rng(seed)
  out_users, out_cuts = [], []
  for user in users:
    choices = np.arange(min_history, timelines.lengths[user])
    if len(choices) == 0:
      continue
    picked = rng.choice(choices, min(per_user, len(choices)), replace=False)
    out_users += [user] * len(picked)
    out_cuts += sorted(picked.tolist())
  return Cuts(np.asarray(out_users, np.int32), np.asarray(out_cuts, np.int32))


def held_out_cuts(timelines: tl.UserTimelines, users: np.ndarray,
                  future_len: int) -> Cuts:
  return Cuts(users.astype(np.int32),
              (timelines.lengths[users] - future_len).astype(np.int32))


def history_context(corpus: Corpus, item_ids: np.ndarray, ratings: np.ndarray,
                    kind: str, k: int, rng: np.random.Generator) -> list[int]:
  """A predictor context of part of a history as text: the latest, random or
  earliest `k` events (time order kept), all of them, or none."""
  n = len(item_ids)
  k = min(k, n)
  if kind == "none":
    return []
  if kind == "full":
    chosen = np.arange(n)
  elif kind == "last_k":
    chosen = np.arange(n - k, n)
  elif kind == "first_k":
    chosen = np.arange(k)
  elif kind == "random_k":
    chosen = np.sort(rng.choice(n, k, replace=False))
  else:
    raise ValueError(f"context {kind!r} is not one of {CONTEXTS}")
  return corpus.history_ids(item_ids[chosen], ratings[chosen])


def task_label(corpus: Corpus, task: str, user: int, cut: int) -> tuple[int, int]:
  """(label, item the question names) of a predictor task at a cut."""
  (target,), (rating,) = corpus.future(user, cut, 1)
  if task == "next_title":
    return int(target), 0
  if task == "favourite_genre":
    return corpus.facts(user, cut).genres[0], 0
  if task == "rating":
    return prompts.rating_bucket(rating), int(target)
  raise ValueError(f"task {task!r} is not one of {PREDICTOR_TASKS}")


def lm_batch(corpus: Corpus, prompts_: list[list[int]], answers: list[list[int]],
             prompt_len: int, answer_len: int) -> dict[str, np.ndarray]:
  """{"tokens", "token_mask", "target_mask": [n, prompt_len + answer_len]}:
  left-padded prompts, right-padded answers, the answers' tokens targeted."""
  prompt, prompt_mask = corpus.pad_prompts(prompts_, prompt_len)
  answer, answer_mask = corpus.tokenizer.pad(answers, answer_len, left=False)
  return {"tokens": np.concatenate([prompt, answer], 1),
          "token_mask": np.concatenate([prompt_mask, answer_mask], 1),
          "target_mask": np.concatenate([np.zeros_like(prompt_mask), answer_mask], 1)}


def policy_batch(corpus: Corpus, cuts: Cuts, rows: np.ndarray,
                 rng: np.random.Generator, style_of, merge_fraction: float,
                 chunk_len: int) -> dict[str, np.ndarray]:
  """The policy's warm-up: history -> programmatic summary, or (a share
  `merge_fraction` of rows) chunk summaries -> a summary of the whole history
  (what the time-hierarchical summarizer's merge step asks)."""
  prompt_rows, answers = [], []
  for row in rows:
    user, cut = int(cuts.users[row]), int(cuts.cuts[row])
    if rng.random() < merge_fraction:
      prompt_rows.append(corpus.merge_prompt(
          corpus.chunk_summaries(user, cut, chunk_len, style_of, rng)))
    else:
      prompt_rows.append(corpus.policy_prompt(user, cut))
    summary = texts.programmatic_summary(corpus.items, corpus.facts(user, cut),
                                         style_of(rng), rng)
    answers.append(corpus.summary_ids(summary))
  return lm_batch(corpus, prompt_rows, answers, corpus.prompt_len,
                  corpus.summary_len)


def predictor_batch(corpus: Corpus, cuts: Cuts, rows: np.ndarray,
                    rng: np.random.Generator, style_of, context_weights: dict,
                    num_options: int, distractors: str) -> dict[str, np.ndarray]:
  """The predictor's training rows: a context (CONTEXTS, drawn by
  `context_weights`) + a question (PREDICTOR_TASKS at random) and
  `num_options` answers of that task, the true one among distractors (other
  titles drawn as `distractors`, other genres, other ratings). The same
  arrays as `rl_batch`: "prompt", "prompt_mask", "options", "option_mask",
  "answer", and "history_target" [n, prompt width]: the tokens of a history
  context after its first (a language-model target: each title predicted
  from the events before it)."""
  kinds = list(context_weights)
  weights = np.asarray([context_weights[k] for k in kinds], np.float64)
  num_genres = len(corpus.items.genre_names)
  prompt_rows, options, answers, history_spans = [], [], [], []
  for row in rows:
    user, cut = int(cuts.users[row]), int(cuts.cuts[row])
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    item_ids, ratings = corpus.history(user, cut)
    if kind == "summary":
      summary = texts.programmatic_summary(
          corpus.items, texts.facts(corpus.items, item_ids, ratings), style_of(rng),
          rng)
      context = corpus.summary_context(corpus.summary_ids(summary)[:-1])
    else:
      context = history_context(corpus, item_ids, ratings, kind,
                                int(rng.integers(1, len(item_ids) + 1)), rng)
    task = PREDICTOR_TASKS[rng.integers(len(PREDICTOR_TASKS))]
    label, item = task_label(corpus, task, user, cut)
    context, question = context[-corpus.prompt_len:], corpus.question(task, item)
    prompt_rows.append(corpus.bos + context + question)
    # (first target, end) counted back from the row's end
    is_history = kind not in ("summary", "none")
    history_spans.append((len(context) - 1 + len(question), len(question))
                         if is_history else (0, 0))
    if task == "next_title":
      choice = corpus.options(label, num_options, distractors, rng)
    else:  # other genres / ratings, as many as there are
      pool = num_genres if task == "favourite_genre" else len(prompts.RATINGS)
      others = rng.permutation(np.setdiff1d(np.arange(pool), [label]))
      choice = rng.permutation(np.concatenate(
          [[label], others[:num_options - 1]]))
      choice = np.resize(choice, num_options)  # fewer labels than options: repeat
    options += [corpus.answer_ids(task, int(c)) for c in choice]
    answers.append(int(np.nonzero(choice == label)[0][0]))
  prompt, prompt_mask = corpus.pad_prompts(prompt_rows, predictor_prompt_len(corpus))
  history_target = np.zeros_like(prompt_mask)
  width = prompt.shape[1]
  for row, (first, end) in enumerate(history_spans):
    history_target[row, width - first:width - end] = True
  option_ids, option_mask = corpus.pad_answers(options)
  shape = (len(rows), num_options, corpus.answer_len)
  return {"prompt": prompt, "prompt_mask": prompt_mask,
          "history_target": history_target,
          "options": option_ids.reshape(shape), "option_mask": option_mask.reshape(shape),
          "answer": np.asarray(answers, np.int32)}


def predictor_prompt_len(corpus: Corpus) -> int:
  """A predictor prompt's width: the longest context + the longest question."""
  longest_title = max(len(t) for t in corpus.title_ids)
  return len(corpus.bos) + corpus.prompt_len + longest_title + max(
      len(q) for q in corpus.question_ids.values()) + 2


def rl_batch(corpus: Corpus, cuts: Cuts, rows: np.ndarray, rng: np.random.Generator,
             num_options: int, distractors: str) -> dict[str, np.ndarray]:
  """RL prompts and their multiple-choice question: "prompt", "prompt_mask"
  [n, prompt_len]; "options", "option_mask" [n, num_options, answer_len] (the
  next item's title among distractors); "answer" [n] the true option."""
  prompt_rows, options, answers = [], [], []
  for row in rows:
    user, cut = int(cuts.users[row]), int(cuts.cuts[row])
    prompt_rows.append(corpus.policy_prompt(user, cut))
    (target,), _ = corpus.future(user, cut, 1)
    choice = corpus.options(int(target), num_options, distractors, rng)
    options += [corpus.answer_ids("next_title", int(i)) for i in choice]
    answers.append(int(np.nonzero(choice == target)[0][0]))
  prompt, prompt_mask = corpus.pad_prompts(prompt_rows, corpus.prompt_len)
  option_ids, option_mask = corpus.pad_answers(options)
  shape = (len(rows), num_options, corpus.answer_len)
  return {"prompt": prompt, "prompt_mask": prompt_mask,
          "options": option_ids.reshape(shape), "option_mask": option_mask.reshape(shape),
          "answer": np.asarray(answers, np.int32)}
