"""The tokenised text of one data set for summarisation: histories, policy
and predictor prompts, summaries and answers as token ids.

Token layout (every piece tokenised on its own, so a summary's ids are the same
whether it was written by the policy or programmatically):
- policy prompt: [bos] + ids(history text) + ids("Summary:"), or for a merge
  [bos] + ids("Summaries: s1 # s2 # ...") + ids("Summary:"); the answer is a
  summary (bos only where the tokenizer has one: Gemma's);
- predictor prompt: [bos] + context + ids(question), the context being ids("Summary:")
  + summary ids, or ids(history text), or nothing; answers are titles, genre
  names or rating digits (each + eos), scored among a closed set of options.
Prompts are left-padded and answers right-padded (data/vocab.Tokenizer.pad).
"""

from __future__ import annotations

import numpy as np

from data import prompts
from data import timelines as tl
from data.vocab import Tokenizer
from summarize import texts

POPULARITY_BINS = 10  # distractors are drawn from the answer's popularity bin


class Corpus:
  """The tokenised text of one data set for summarisation.

  Args:
    timelines: the full timelines (cuts index them).
    tokenizer: the SentencePiece vocabulary.
    history_len: N, the most events a history holds.
    summary_len: the most tokens a summary holds (eos included).
    prompt_len: the most tokens a policy prompt or predictor context takes.
    popularity: [num_items + 1] event counts of the training users (distractors).
  """

  def __init__(self, timelines: tl.UserTimelines, tokenizer: Tokenizer,
               history_len: int, summary_len: int, prompt_len: int,
               popularity: np.ndarray):
    self.timelines, self.tokenizer = timelines, tokenizer
    self.items = timelines.items
    self.history_len, self.summary_len = history_len, summary_len
    self.eos = tokenizer.eos_id
    # Gemma's tokenizer has a bos that starts every prompt; ours has none
    self.bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    encode = tokenizer.encode
    self.title_ids = encode([str(t) for t in self.items.titles])
    self.genre_ids = encode(list(self.items.genre_names))
    self.rating_ids = encode(list(prompts.RATINGS))
    self.summary_head, = encode([texts.SUMMARY_HEAD])
    self.question_ids = {t: ids for t, ids in zip(
        texts.QUESTIONS, encode(list(texts.QUESTIONS.values())))}
    self.prompt_len = prompt_len
    self.answer_len = 1 + max(len(t) for t in self.title_ids + self.genre_ids)
    self.popularity = popularity.astype(np.float64)
    ranks = np.argsort(np.argsort(-self.popularity[1:], kind="stable"))
    self.popularity_bin = np.concatenate(
        [[-1], ranks * POPULARITY_BINS // max(len(ranks), 1)])
    self.checker = texts.ClaimChecker(self.items)

  # -- events
  def history(self, user: int, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, ratings) of the latest history_len events before `cut`."""
    start = self.timelines.user_offsets[user]
    events = slice(start + max(cut - self.history_len, 0), start + cut)
    return self.timelines.item_ids[events], self.timelines.ratings[events]

  def future(self, user: int, cut: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, ratings) of the `length` events from `cut` on."""
    start = self.timelines.user_offsets[user] + cut
    stop = min(start + length, self.timelines.user_offsets[user]
               + self.timelines.lengths[user])
    return self.timelines.item_ids[start:stop], self.timelines.ratings[start:stop]

  def facts(self, user: int, cut: int) -> texts.Facts:
    return texts.facts(self.items, *self.history(user, cut))

  # -- text pieces
  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode([text])[0] if text else []

  def history_ids(self, item_ids: np.ndarray, ratings: np.ndarray) -> list[int]:
    return self.encode(texts.history_text(self.items, item_ids, ratings))

  def policy_prompt(self, user: int, cut: int) -> list[int]:
    return self.bos + self.history_ids(*self.history(user, cut)) + self.summary_head

  def chunk_prompt(self, item_ids: np.ndarray, ratings: np.ndarray) -> list[int]:
    """The policy prompt of part of a history."""
    return self.bos + self.history_ids(item_ids, ratings) + self.summary_head

  def merge_prompt(self, chunk_summaries: list[str]) -> list[int]:
    joined = texts.CHUNK_SEP.join(s or "none" for s in chunk_summaries)
    return self.bos + self.encode(f"{texts.MERGE_HEAD} {joined}") + self.summary_head

  def summary_context(self, summary_ids: list[int]) -> list[int]:
    return self.summary_head + list(summary_ids)

  def question(self, task: str, item: int = 0) -> list[int]:
    """The predictor's question; "rating" asks about `item`."""
    if task == "rating":
      return self.encode(f"{texts.QUESTIONS['rating']} {self.items.titles[item]}:")
    return list(self.question_ids[task])

  # -- answers and options
  def options(self, true_item: int, count: int, kind: str,
              rng: np.random.Generator) -> np.ndarray:
    """[count] item ids: `true_item` and count - 1 distinct distractors from
    the catalogue (kind in DISTRACTORS), in random order."""
    num = len(self.items.titles)
    pool = np.arange(1, num)
    if kind == "popularity_matched":
      same = pool[self.popularity_bin[pool] == self.popularity_bin[true_item]]
      pool = same if len(same) >= count else pool
    pool = pool[pool != true_item]
    weights = None
    if kind == "popularity":
      weights = self.popularity[pool] + 1.0
      weights = weights / weights.sum()
    picked = rng.choice(pool, count - 1, replace=False, p=weights)
    return rng.permutation(np.concatenate([[true_item], picked])).astype(np.int32)

  def answer_ids(self, task: str, label: int) -> list[int]:
    """A task's answer (+ eos): a title (label = item id), a genre name (label
    = genre index) or a rating digit (label = bucket 0..4)."""
    table = {"next_title": self.title_ids, "favourite_genre": self.genre_ids,
             "future_genre": self.genre_ids, "rating": self.rating_ids}[task]
    return table[label] + [self.eos]

  def pad_answers(self, answers: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer.pad(answers, self.answer_len, left=False)

  # -- summaries
  def summary_ids(self, summary: str) -> list[int]:
    """A summary's ids + eos, cut to summary_len (eos kept last)."""
    return self.encode(summary)[:self.summary_len - 1] + [self.eos]

  def decode_summaries(self, ids: np.ndarray) -> list[str]:
    """[n, summary_len] generated ids (0 after eos) -> texts."""
    return [self.tokenizer.decode(row) for row in np.asarray(ids)]

  def chunk_summaries(self, user: int, cut: int, chunk_len: int, style_of,
                      rng: np.random.Generator) -> list[str]:
    """Programmatic summaries of the history's consecutive `chunk_len`-event
    chunks (oldest first), each in the style `style_of(rng)` draws."""
    item_ids, ratings = self.history(user, cut)
    out = []
    for start in range(0, len(item_ids), chunk_len):
      chunk = texts.facts(self.items, item_ids[start:start + chunk_len],
                          ratings[start:start + chunk_len])
      out.append(texts.programmatic_summary(self.items, chunk, style_of(rng), rng))
    return out

  def pad_prompts(self, rows: list[list[int]], length: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer.pad(rows, length, left=True)
