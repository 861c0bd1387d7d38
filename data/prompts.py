"""Examples for the LLM tasks: a user's history before a cut, a task prompt and
the answer, turned into fixed-shape arrays batch by batch.

Tasks: `next_title` (answer: the title of the event at the cut) and
`favourite_genre` (answer: the most frequent genre of the shown history).
Methods differ only in the prompt and in what else the model gets:
- "text_prompt": "Watched: t1; t2; ...; tH. Next title:" with the history's
  titles, left-truncated to `prompt_len` tokens (the latest titles kept);
- every other method: the bare task prompt ("Next title:"); the user-embedding
  methods also get the history as events (items, rating buckets, genres).
Prompts are left-padded and answers right-padded, so `tokens` is
[pad.. prompt][answer eos pad..] and the cut between them is the same column for
every row.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import splits
from data import timelines as tl
from data.vocab import Tokenizer

TASKS = ("next_title", "favourite_genre")
PROMPTS = {"next_title": "Next title:", "favourite_genre": "Favourite genre:"}
HISTORY_HEAD, HISTORY_SEP, HISTORY_TAIL = "Watched:", ";", "."


def corpus(timelines: tl.UserTimelines) -> list[str]:
  """The text a vocabulary must cover: every title, genre and prompt word."""
  prompts = ["Watched: A; B. " + p for p in PROMPTS.values()]  # separators too
  return (prompts + list(timelines.items.genre_names) + ["unknown"]
          + [str(t) for t in timelines.items.titles[1:]])


def favourite_genre_index(items: tl.ItemTable, history: np.ndarray) -> int:
  """Index of the genre most frequent in `history` (ties: the lower index)."""
  return int(np.argmax(items.genres[history].sum(axis=0)))


@dataclasses.dataclass(frozen=True)
class Examples:
  """One row per (user, cut, task).

  users, cuts, tasks: [n] int; the history is the user's events before `cut`
  (at most the latest `history_len` are shown), the target event is `cut`.
  """
  users: np.ndarray
  cuts: np.ndarray
  tasks: np.ndarray

  def __len__(self) -> int:
    return len(self.users)


def training_examples(timelines: tl.UserTimelines, cuts_per_user: int, seed: int,
                      tasks=TASKS) -> Examples:
  """`cuts_per_user` random cuts (>= 1 event of history) per user, every task."""
  rng = np.random.default_rng(seed)
  users, cuts = [], []
  for user, length in enumerate(timelines.lengths):
    if length < 2:
      continue
    chosen = rng.choice(np.arange(1, length), min(cuts_per_user, length - 1),
                        replace=False)
    users += [user] * len(chosen)
    cuts += sorted(chosen.tolist())
  users, cuts = np.repeat(users, len(tasks)), np.repeat(cuts, len(tasks))
  task_ids = np.tile([TASKS.index(t) for t in tasks], len(users) // len(tasks))
  return Examples(users.astype(np.int32), cuts.astype(np.int32),
                  task_ids.astype(np.int32))


def held_out_examples(held_out: splits.HeldOut, task: str, max_users: int,
                      seed: int) -> Examples:
  """The held-out events (at most `max_users`, a fixed random subset) for a task."""
  rows = np.arange(len(held_out))
  if 0 < max_users < len(rows):
    rows = np.sort(np.random.default_rng(seed).choice(rows, max_users, replace=False))
  return Examples(held_out.users[rows].astype(np.int32),
                  held_out.history_lengths[rows].astype(np.int32),
                  np.full(len(rows), TASKS.index(task), np.int32))


def history_events(timelines: tl.UserTimelines, examples: Examples,
                   rows: np.ndarray, history_len: int) -> dict[str, np.ndarray]:
  """The latest `history_len` events before each row's cut, as encoder inputs:
  {"items", "ratings" (buckets 1..5): [len(rows), history_len] int32
  right-padded with 0, "genres": [len(rows), history_len, num_genres] float32}."""
  items = np.zeros((len(rows), history_len), np.int32)
  ratings = np.zeros_like(items)
  offsets = timelines.user_offsets
  for i, row in enumerate(rows):
    user, cut = examples.users[row], examples.cuts[row]
    start, stop = offsets[user] + max(cut - history_len, 0), offsets[user] + cut
    items[i, :stop - start] = timelines.item_ids[start:stop]
    ratings[i, :stop - start] = np.clip(np.round(timelines.ratings[start:stop]), 1, 5)
  genres = timelines.items.genres[items].astype(np.float32)
  genres[items == 0] = 0
  return {"items": items, "ratings": ratings, "genres": genres}


class PromptBuilder:
  """Turns Examples into arrays for one method; titles are tokenized once."""

  def __init__(self, timelines: tl.UserTimelines, tokenizer: Tokenizer,
               method: str, history_len: int, prompt_len: int, answer_len: int):
    self.timelines, self.tokenizer = timelines, tokenizer
    self.method, self.history_len = method, history_len
    self.prompt_len, self.answer_len = prompt_len, answer_len
    encode = lambda texts: tokenizer.encode(texts)  # noqa: E731
    self.title_ids = encode([str(t) for t in timelines.items.titles])
    self.genre_names = list(timelines.items.genre_names)
    self.genre_ids = encode(self.genre_names)
    self.sep_ids, = encode([HISTORY_SEP])
    self.head_ids, = encode([HISTORY_HEAD])
    self.tail_ids = {task: encode([f"{HISTORY_TAIL} {PROMPTS[task]}"])[0]
                     for task in TASKS}
    self.task_ids = {task: encode([PROMPTS[task]])[0] for task in TASKS}
    self.bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []

  def history(self, user: int, cut: int) -> np.ndarray:
    """[<= history_len] the latest item ids before `cut`."""
    start = self.timelines.user_offsets[user]
    return self.timelines.item_ids[start + max(cut - self.history_len, 0):start + cut]

  def prompt(self, user: int, cut: int, task: str) -> list[int]:
    if self.method != "text_prompt":
      return self.bos + self.task_ids[task]
    history = []
    for item in self.history(user, cut):
      history += self.title_ids[item] + self.sep_ids
    room = self.prompt_len - len(self.bos) - len(self.head_ids) - len(
        self.tail_ids[task])
    history = history[:-len(self.sep_ids)][-room:] if room > 0 else []
    return self.bos + self.head_ids + history + self.tail_ids[task]

  def answer(self, user: int, cut: int, task: str) -> list[int]:
    if task == "next_title":
      item = self.timelines.item_ids[self.timelines.user_offsets[user] + cut]
      ids = self.title_ids[item]
    else:
      ids = self.genre_ids[favourite_genre_index(self.timelines.items,
                                                 self.history(user, cut))]
    return ids + [self.tokenizer.eos_id]

  def events(self, examples: Examples, rows: np.ndarray) -> dict[str, np.ndarray]:
    return history_events(self.timelines, examples, rows, self.history_len)

  def batch(self, examples: Examples, rows: np.ndarray, with_answers: bool = True
            ) -> dict[str, np.ndarray]:
    """Arrays for `rows`: "prompt"/"prompt_mask" [n, prompt_len] left-padded;
    with answers also "tokens"/"token_mask"/"target_mask" [n, prompt_len +
    answer_len]; with user-embedding methods "events" too."""
    prompts, answers = [], []
    for row in rows:
      user, cut = int(examples.users[row]), int(examples.cuts[row])
      task = TASKS[examples.tasks[row]]
      prompts.append(self.prompt(user, cut, task))
      if with_answers:
        answers.append(self.answer(user, cut, task))
    prompt, prompt_mask = self.tokenizer.pad(prompts, self.prompt_len, left=True)
    out = {"prompt": prompt, "prompt_mask": prompt_mask}
    if with_answers:
      answer, answer_mask = self.tokenizer.pad(answers, self.answer_len, left=False)
      out.update(tokens=np.concatenate([prompt, answer], 1),
                 token_mask=np.concatenate([prompt_mask, answer_mask], 1),
                 target_mask=np.concatenate([np.zeros_like(prompt_mask),
                                             answer_mask], 1))
    if self.method in ("cross_attention", "soft_prompt"):
      out["events"] = self.events(examples, rows)
    return out

  def candidates(self, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Every answer of a task as [k, answer_len] ids + mask (right-padded):
    all item titles (row i = item i; row 0, padding, is empty) or all genres."""
    if task == "next_title":
      ids = [[] if i == 0 else t + [self.tokenizer.eos_id]
             for i, t in enumerate(self.title_ids)]
    else:
      ids = [g + [self.tokenizer.eos_id] for g in self.genre_ids]
    return self.tokenizer.pad(ids, self.answer_len, left=False)

  def longest_prompt(self) -> int:
    """Tokens of the longest possible prompt (before truncation to prompt_len)."""
    bare = len(self.bos) + max(len(v) for v in self.task_ids.values())
    if self.method != "text_prompt":
      return bare
    longest_title = max(len(t) for t in self.title_ids)
    return (len(self.bos) + len(self.head_ids) + max(len(v) for v in
            self.tail_ids.values()) + self.history_len * (longest_title + len(
                self.sep_ids)) - len(self.sep_ids))

  def longest_answer(self) -> int:
    return 1 + max(max(len(t) for t in self.title_ids),
                   max(len(g) for g in self.genre_ids))
