"""The time-hierarchical summarizer: the policy summarises each chunk of a
history (oldest first), then merges the chunk summaries into one."""

from __future__ import annotations

from summarize import examples as ex
from summarize.summarizer import Summarizer


def merge_prompts(summarizer: Summarizer, cuts: ex.Cuts, chunk_len: int
                  ) -> list[list[int]]:
  """The time-hierarchical summarizer's first level: the policy summarises
  each `chunk_len`-event chunk of a history (oldest first); returns each
  user's merge prompt "Summaries: s1 # s2 # ... Summary:"."""
  corpus = summarizer.corpus
  chunk_prompts, owners = [], []
  for row, (user, cut) in enumerate(zip(cuts.users, cuts.cuts)):
    item_ids, ratings = corpus.history(int(user), int(cut))
    for start in range(0, len(item_ids), chunk_len):
      chunk = slice(start, start + chunk_len)
      chunk_prompts.append(corpus.chunk_prompt(item_ids[chunk], ratings[chunk]))
      owners.append(row)
  chunk_texts = corpus.decode_summaries(summarizer.write(chunk_prompts))
  grouped = [[] for _ in range(len(cuts))]
  for row, text in zip(owners, chunk_texts):
    grouped[row].append(text)
  return [corpus.merge_prompt(g) for g in grouped]


def summaries(summarizer: Summarizer, cuts: ex.Cuts, chunk_len: int
              ) -> tuple[list[list[int]], list[str]]:
  """(each cut's merge prompt, its merged greedy summary)."""
  merge = merge_prompts(summarizer, cuts, chunk_len)
  return merge, summarizer.corpus.decode_summaries(summarizer.write(merge))
