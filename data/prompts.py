"""Examples for the LLM tasks: a user's history before a cut, a task prompt and
the answer, turned into fixed-shape arrays batch by batch.

Tasks (`TASKS`; every answer comes from a closed candidate set, so every task
is scored by ranking its candidates by likelihood):
- `next_title`: the title of the event at the cut;
- `favourite_genre`: the most frequent genre of the shown history;
- `rating`: "Rating of <title>:" -> the user's rating of the item at the cut,
  "1".."5";
- `title_genre`: "Genre of <title>:" -> the first genre of the item at the cut
  (any of its genres counts as correct);
- `summary`: a user-summary-style answer "<g1>, <g2>; <level>": the history's
  two most frequent genres and its mean-rating level (low < 3.3 <= mid < 3.7 <=
  high);
- `last_title`: the title of the history's latest event, a recall task: the
  text prompt can copy it, and a User-LLM trained on it learns to turn user
  tokens into titles (the step `next_title` needs; README, User-LLM).
How a prompt shows the user's history (`HISTORIES`; a User-LLM method picks
one: userllm/builders.py METHODS):
- "text": "Watched: t1; t2; ...; tH. Next title:" with the history's titles
  (and "(rating)" after each with `show_ratings`), left-truncated to
  `prompt_len` tokens (the latest titles kept);
- "events": the bare task prompt ("Next title:"), and the history as events
  (items, rating buckets, genres) beside it, for a user encoder;
- "text_events": both: the text prompt, and the events beside it;
- "none": the bare task prompt only.
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

# task ids are indices here: append, never reorder
TASKS = ("next_title", "favourite_genre", "rating", "title_genre", "summary",
         "last_title")
TITLE_TASKS = ("next_title", "last_title")  # answers: every item's title
PROMPTS = {"next_title": "Next title:", "favourite_genre": "Favourite genre:",
           "rating": "Rating of", "title_genre": "Genre of", "summary": "Summary:",
           "last_title": "Last title:"}
ITEM_TASKS = ("rating", "title_genre")  # the prompt names the item at the cut
HISTORY_HEAD, HISTORY_SEP, HISTORY_TAIL, ITEM_TAIL = "Watched:", ";", ".", ":"
RATINGS = ("1", "2", "3", "4", "5")
LEVELS = ("low", "mid", "high")
LEVEL_EDGES = (3.3, 3.7)  # mean rating: low < 3.3 <= mid < 3.7 <= high
# how a prompt shows the history: (as titles in the text, as events beside it)
HISTORIES = {"text": (True, False), "events": (False, True),
             "text_events": (True, True), "none": (False, False)}


def corpus(timelines: tl.UserTimelines) -> list[str]:
  """The text a vocabulary must cover: every title, genre and prompt word."""
  prompts = ["Watched: A (1); B (5). " + p + " C:" for p in PROMPTS.values()]
  return (prompts + list(timelines.items.genre_names) + ["unknown"]
          + [f"A, B; {level}" for level in LEVELS] + list(RATINGS)
          + [str(t) for t in timelines.items.titles[1:]])


def favourite_genre_index(items: tl.ItemTable, history: np.ndarray) -> int:
  """Index of the genre most frequent in `history` (ties: the lower index)."""
  return int(np.argmax(items.genres[history].sum(axis=0)))


def top_two_genres(items: tl.ItemTable, history: np.ndarray) -> tuple[int, int]:
  """The two most frequent genres of `history` (ties: the lower index)."""
  order = np.argsort(-items.genres[history].sum(axis=0), kind="stable")
  return int(order[0]), int(order[1])


def rating_bucket(rating: float) -> int:
  """A rating as an index into RATINGS (rounded, clipped to 1..5)."""
  return int(np.clip(np.round(rating), 1, 5)) - 1


def rating_level(ratings: np.ndarray) -> int:
  """Index into LEVELS of a history's mean rating."""
  return int(np.searchsorted(LEVEL_EDGES, float(np.mean(ratings)), side="right"))


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
  """Turns Examples into arrays, the history shown `history_as` (HISTORIES);
  titles are tokenized once.

  `prompt_len` is the most context a prompt may take (text prompts keep their
  latest titles) and is trimmed to the longest prompt `tasks` can produce;
  `answer_len` 0 means the longest answer of `tasks` (+ eos). Builders of the
  same shapes over other timelines come from `over(timelines)`.
  """

  def __init__(self, timelines: tl.UserTimelines, tokenizer: Tokenizer,
               history_as: str, history_len: int, prompt_len: int,
               answer_len: int = 0, show_ratings: bool = False, tasks=TASKS):
    if history_as not in HISTORIES:
      raise ValueError(f"history_as={history_as!r} is not one of "
                       f"{tuple(HISTORIES)}")
    self.timelines, self.tokenizer = timelines, tokenizer
    self.history_as, self.history_len = history_as, history_len
    # the history's titles in the prompt; its events beside the prompt
    self.shows_text, self.gives_events = HISTORIES[history_as]
    self.show_ratings = show_ratings
    encode = lambda texts: tokenizer.encode(texts)  # noqa: E731
    self.title_ids = encode([str(t) for t in timelines.items.titles])
    self.title_table, _ = tokenizer.pad(self.title_ids, max(map(len, self.title_ids)),
                                        left=False)  # [items + 1, longest title]
    self.genre_names = list(timelines.items.genre_names)
    self.sep_ids, = encode([HISTORY_SEP])
    self.head_ids, = encode([HISTORY_HEAD])
    self.item_tail_ids, = encode([ITEM_TAIL])
    self.rating_ids = encode([f"({r})" for r in RATINGS])
    self.tail_ids = {task: encode([f"{HISTORY_TAIL} {PROMPTS[task]}"])[0]
                     for task in TASKS}
    self.task_ids = {task: encode([PROMPTS[task]])[0] for task in TASKS}
    self.bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id]
    genre_ids = encode(self.genre_names)
    self.answers = {  # every task's candidate answers, ids + eos
        "next_title": [[] if i == 0 else t + eos for i, t in enumerate(self.title_ids)],
        "favourite_genre": [g + eos for g in genre_ids],
        "title_genre": [g + eos for g in genre_ids],
        "rating": [ids + eos for ids in encode(list(RATINGS))],
        "summary": [ids + eos for ids in encode(self.summary_texts())]}
    self.answers["last_title"] = self.answers["next_title"]
    self.prompt_len = min(prompt_len, self.longest_prompt(tasks))
    self.answer_len = answer_len or self.longest_answer(tasks)

  def over(self, timelines: tl.UserTimelines) -> "PromptBuilder":
    """A builder of the same history and shapes reading `timelines` (e.g. the
    full timelines, whose held-out events the training split lacks)."""
    return PromptBuilder(timelines, self.tokenizer, self.history_as, self.history_len,
                         self.prompt_len, self.answer_len, self.show_ratings)

  def summary_texts(self) -> list[str]:
    """Every summary answer; index (g1 * G + g2) * len(LEVELS) + level."""
    g = self.genre_names
    return [f"{g[a]}, {g[b]}; {level}" for a in range(len(g)) for b in range(len(g))
            for level in LEVELS]

  def _events(self, user: int, cut: int) -> slice:
    start = self.timelines.user_offsets[user]
    return slice(start + max(cut - self.history_len, 0), start + cut)

  def history(self, user: int, cut: int) -> np.ndarray:
    """[<= history_len] the latest item ids before `cut`."""
    return self.timelines.item_ids[self._events(user, cut)]

  def target_item(self, user: int, cut: int) -> int:
    return int(self.timelines.item_ids[self.timelines.user_offsets[user] + cut])

  def label(self, user: int, cut: int, task: str) -> int:
    """Index of the right answer among `self.answers[task]`."""
    items = self.timelines.items
    if task == "next_title":
      return self.target_item(user, cut)
    if task == "last_title":
      return int(self.history(user, cut)[-1])
    if task == "favourite_genre":
      return favourite_genre_index(items, self.history(user, cut))
    if task == "title_genre":
      return int(np.argmax(items.genres[self.target_item(user, cut)]))
    if task == "rating":
      offset = self.timelines.user_offsets[user] + cut
      return rating_bucket(self.timelines.ratings[offset])
    first, second = top_two_genres(items, self.history(user, cut))
    level = rating_level(self.timelines.ratings[self._events(user, cut)])
    return (first * len(self.genre_names) + second) * len(LEVELS) + level

  def task_prompt(self, user: int, cut: int, task: str, after_history: bool
                  ) -> list[int]:
    """The question: "[. ]Next title:" or "[. ]Rating of <title>:"."""
    ids = list(self.tail_ids[task] if after_history else self.task_ids[task])
    if task in ITEM_TASKS:
      ids += self.title_ids[self.target_item(user, cut)] + self.item_tail_ids
    return ids

  def prompt(self, user: int, cut: int, task: str) -> list[int]:
    if not self.shows_text:
      return self.bos + self.task_prompt(user, cut, task, after_history=False)
    history = []
    events = self._events(user, cut)
    for item, rating in zip(self.timelines.item_ids[events],
                            self.timelines.ratings[events]):
      history += self.title_ids[item]
      if self.show_ratings:
        history += self.rating_ids[rating_bucket(rating)]
      history += self.sep_ids
    question = self.task_prompt(user, cut, task, after_history=True)
    room = self.prompt_len - len(self.bos) - len(self.head_ids) - len(question)
    history = history[:-len(self.sep_ids)][-room:] if room > 0 else []
    return self.bos + self.head_ids + history + question

  def answer(self, user: int, cut: int, task: str) -> list[int]:
    return self.answers[task][self.label(user, cut, task)]

  def events(self, examples: Examples, rows: np.ndarray) -> dict[str, np.ndarray]:
    """history_events, plus "titles" [n, history_len, longest title] each
    event's title ids (0-padded; read by User-LLM with item_text) and
    "next_item" [n]: the item at each cut (the event the history leads to; read
    only by User-LLM's auxiliary loss)."""
    out = history_events(self.timelines, examples, rows, self.history_len)
    out["titles"] = self.title_table[out["items"]]
    offsets = self.timelines.user_offsets[examples.users[rows]]
    out["next_item"] = self.timelines.item_ids[offsets + examples.cuts[rows]].astype(
        np.int32)
    return out

  def batch(self, examples: Examples, rows: np.ndarray, with_answers: bool = True
            ) -> dict[str, np.ndarray]:
    """Arrays for `rows`: "prompt"/"prompt_mask" [n, prompt_len] left-padded,
    "task_ids" [n]; with answers also "tokens"/"token_mask"/"target_mask" [n,
    prompt_len + answer_len]; with the history as events, "events" too."""
    prompts, answers = [], []
    for row in rows:
      user, cut = int(examples.users[row]), int(examples.cuts[row])
      task = TASKS[examples.tasks[row]]
      prompts.append(self.prompt(user, cut, task))
      if with_answers:
        answers.append(self.answer(user, cut, task))
    prompt, prompt_mask = self.tokenizer.pad(prompts, self.prompt_len, left=True)
    out = {"prompt": prompt, "prompt_mask": prompt_mask,
           "task_ids": np.asarray(examples.tasks[rows], np.int32)}
    if with_answers:
      answer, answer_mask = self.tokenizer.pad(answers, self.answer_len, left=False)
      out.update(tokens=np.concatenate([prompt, answer], 1),
                 token_mask=np.concatenate([prompt_mask, answer_mask], 1),
                 target_mask=np.concatenate([np.zeros_like(prompt_mask),
                                             answer_mask], 1))
    if self.gives_events:
      out["events"] = self.events(examples, rows)
    return out

  def candidates(self, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Every answer of a task as [k, answer_len] ids + mask (right-padded),
    row i = answer i (`label`); for the TITLE_TASKS row i is item i (row 0,
    the padding item, is empty)."""
    return self.tokenizer.pad(self.answers[task], self.answer_len, left=False)

  def longest_prompt(self, tasks=TASKS) -> int:
    """Tokens of the longest possible prompt of `tasks` (before truncation to
    prompt_len)."""
    longest_title = max(len(t) for t in self.title_ids)
    item_part = longest_title + len(self.item_tail_ids)
    def question(ids):
      return max(len(ids[t]) + (item_part if t in ITEM_TASKS else 0) for t in tasks)
    if not self.shows_text:
      return len(self.bos) + question(self.task_ids)
    per_event = longest_title + len(self.sep_ids) + (
        max(len(r) for r in self.rating_ids) if self.show_ratings else 0)
    return (len(self.bos) + len(self.head_ids) + question(self.tail_ids)
            + self.history_len * per_event - len(self.sep_ids))

  def longest_answer(self, tasks=TASKS) -> int:
    return max(len(ids) for task in tasks for ids in self.answers[task])
