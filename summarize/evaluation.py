"""Scoring user contexts with the frozen predictor, and UserSumBench's metrics
(the summaries themselves come from summarize/summarizer.py, hierarchical.py
and verifier.py).

Every row of the table is a context per held-out user (a summary, part of the
history as text, or nothing) read by the same frozen predictor, which answers
each probe by the likelihood of each of its options (for titles calibrated:
minus the title's likelihood after the bare question, `Predictor.decide`, so
that a title's own length and wording do not decide):
- `next_title`: the next item's title among `num_options` (the RL task);
- `favourite_genre`: the history's most frequent genre, among all genres;
- `rating`: the user's rating (1..5) of the next item, named in the question;
- `future_genre`: the most frequent genre of the next `future_len` items, asked
  as "Favourite genre:" (the predictor never trained on future labels, and RL
  never on any of these three);
- UserSumBench `quality`: the mean multiple-choice accuracy over each of the
  `future_len` future items; `density`: (quality - chance) per 100 context
  tokens (not given for the empty context).
Accuracies come with binomial standard errors; quality with the standard error
of the per-user mean.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from data import prompts
from infra.errors import DivergedError
from summarize import examples as ex, texts
from userllm.models import decoding, llm
from summarize.corpus import Corpus

TASKS = ("next_title", "favourite_genre", "rating", "future_genre")


@dataclasses.dataclass(frozen=True)
class Probes:
  """The held-out users' questions (fixed by seed, the same for every row).

  future_options: [n, future_len, k] item ids, the true one at future_answer
  [n, future_len]; column 0 is the next item (the `next_title` probe).
  """
  cuts: ex.Cuts
  future_options: np.ndarray
  future_answer: np.ndarray
  genre: np.ndarray  # [n] favourite genre of the history
  future_genre: np.ndarray  # [n] favourite genre of the future events
  rating: np.ndarray  # [n] rating bucket 0..4 of the next item
  next_item: np.ndarray  # [n]


def make_probes(corpus: Corpus, cuts: ex.Cuts, future_len: int,
                num_options: int, distractors: str, seed: int) -> Probes:
  rng = np.random.default_rng(seed)
  n = len(cuts)
  options = np.zeros((n, future_len, num_options), np.int32)
  answer = np.zeros((n, future_len), np.int32)
  genre, future_genre, rating, next_item = (np.zeros(n, np.int32) for _ in range(4))
  for row, (user, cut) in enumerate(zip(cuts.users, cuts.cuts)):
    future_items, future_ratings = corpus.future(int(user), int(cut), future_len)
    for f, item in enumerate(future_items):
      options[row, f] = corpus.options(int(item), num_options, distractors, rng)
      answer[row, f] = int(np.nonzero(options[row, f] == item)[0][0])
    genre[row] = corpus.facts(int(user), int(cut)).genres[0]
    future_genre[row] = prompts.favourite_genre_index(corpus.items, future_items)
    rating[row] = prompts.rating_bucket(future_ratings[0])
    next_item[row] = future_items[0]
  return Probes(cuts, options, answer, genre, future_genre, rating, next_item)


class Predictor:
  """The frozen predictor's option scores over fixed-shape batches (one
  compiled function per shape)."""

  def __init__(self, model: llm.DecoderLM, params, corpus: Corpus,
               batch_size: int, calibrate: bool = False):
    self.params, self.corpus, self.batch_size = params, corpus, batch_size
    self.calibrate = calibrate
    self.prompt_len = ex.predictor_prompt_len(corpus)
    self._score = jax.jit(functools.partial(decoding.score_continuations, model))
    self._baselines = {}

  def decide(self, prompts_: list[list[int]], questions: list[list[int]],
             options: list[list[list[int]]], key) -> np.ndarray:
    """[n, c] the scores the predictor chooses by: each option's
    log-likelihood after its prompt, minus (calibrated) its log-likelihood
    after the bare question (`questions`: [bos] + question ids), which
    removes the options' own prior (e.g. short titles); the bare-question
    scores are computed once per `key`."""
    scores = self.scores(prompts_, options)
    if not self.calibrate:
      return scores
    if key not in self._baselines:
      self._baselines[key] = self.scores(questions, options)
    return scores - self._baselines[key]

  def scores(self, prompts_: list[list[int]], options: list[list[list[int]]]
             ) -> np.ndarray:
    """[n, c] log-likelihood of each prompt's own c options."""
    out = []
    for start in range(0, len(prompts_), self.batch_size):
      rows = list(range(start, min(start + self.batch_size, len(prompts_))))
      rows += [rows[-1]] * (self.batch_size - len(rows))  # fixed shape
      prompt, mask = self.corpus.pad_prompts([prompts_[r] for r in rows],
                                             self.prompt_len)
      flat = [ids for r in rows for ids in options[r]]
      ids, option_mask = self.corpus.pad_answers(flat)
      shape = (len(rows), len(options[rows[0]]), ids.shape[1])
      scores = self._score(self.params, prompt, mask, ids.reshape(shape),
                           option_mask.reshape(shape))
      out.append(np.asarray(scores))
    scores = np.concatenate(out)[:len(prompts_)]
    if not np.all(np.isfinite(scores)):  # never a metric from a broken model
      raise DivergedError(f"the predictor's option scores are not finite "
                          f"({int(np.sum(~np.isfinite(scores)))} of {scores.size})")
    return scores


def _accuracy(hits: np.ndarray) -> tuple[float, float]:
  p = float(np.mean(hits))
  return p, float(np.sqrt(p * (1 - p) / len(hits)))


def score_contexts(predictor: Predictor, probes: Probes,
                   contexts: list[list[int]], num_options: int,
                   next_title_only: bool = False) -> dict[str, float]:
  """Every probe read from `contexts` (one id list per held-out user, cut to
  the corpus's prompt_len): {task: accuracy, task_stderr, quality,
  quality_stderr, context_tokens, density}; `next_title_only` skips the
  genre and rating probes (e.g. for a validation curve)."""
  corpus = predictor.corpus
  contexts = [c[-corpus.prompt_len:] for c in contexts]
  n, future_len = probes.future_answer.shape
  title = lambda item: corpus.answer_ids("next_title", int(item))  # noqa: E731
  contexts = [corpus.bos + c for c in contexts]  # token counts exclude bos
  next_prompts = [c + corpus.question("next_title") for c in contexts]
  bare = lambda q: corpus.bos + q  # noqa: E731  (the calibration's prompt)
  # every future item's options after one prefill of the prompt
  future_scores = predictor.decide(
      next_prompts, [bare(corpus.question("next_title"))] * n,
      [[title(i) for i in probes.future_options[r].reshape(-1)] for r in range(n)],
      (id(probes), "future"))
  future_hits = (future_scores.reshape(probes.future_options.shape).argmax(-1)
                 == probes.future_answer)
  out = {}
  out["next_title"], out["next_title_stderr"] = _accuracy(future_hits[:, 0])
  if not next_title_only:
    out.update(_side_tasks(predictor, probes, contexts))
  per_user = future_hits.mean(1)
  out["quality"] = float(per_user.mean())
  out["quality_stderr"] = float(per_user.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
  tokens = float(np.mean([len(c) - len(corpus.bos) for c in contexts]))
  out["context_tokens"] = tokens
  if tokens > 0:  # undefined for an empty context
    out["density"] = 100.0 * (out["quality"] - 1.0 / num_options) / tokens
  # per user, for paired comparisons of two contexts (popped by the caller)
  out["next_title_hits"] = future_hits[:, 0]
  out["quality_per_user"] = per_user
  return out


def paired_gain(new: np.ndarray, old: np.ndarray) -> tuple[float, float]:
  """Mean and standard error of new - old over the same users ([n] each):
  the user-to-user spread cancels, which two unpaired errors would keep."""
  diff = np.asarray(new, float) - np.asarray(old, float)
  return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def _side_tasks(predictor: Predictor, probes: Probes,
                contexts: list[list[int]]) -> dict[str, float]:
  """Favourite genre, next rating and future genre (never trained on) read
  from `contexts` ([bos] + context ids per user): {task: accuracy,
  task_stderr}. Genre and rating answers are few and short: their prior is
  the base rate (most ratings are 3-4), so they are chosen by plain
  likelihood."""
  corpus, n = predictor.corpus, len(contexts)
  genres = [corpus.answer_ids("favourite_genre", g)
            for g in range(len(corpus.items.genre_names))]
  digits = [corpus.answer_ids("rating", r) for r in range(len(prompts.RATINGS))]
  genre_prompts = [c + corpus.question("favourite_genre") for c in contexts]
  genre_pick = predictor.scores(genre_prompts, [genres] * n).argmax(-1)
  rating_prompts = [c + corpus.question("rating", int(i))
                    for c, i in zip(contexts, probes.next_item)]
  rating_pick = predictor.scores(rating_prompts, [digits] * n).argmax(-1)
  out = {}
  for task, hits in (("favourite_genre", genre_pick == probes.genre),
                     ("rating", rating_pick == probes.rating),
                     ("future_genre", genre_pick == probes.future_genre)):
    out[task], out[f"{task}_stderr"] = _accuracy(hits)
  return out


def hallucination_rate(corpus: Corpus, cuts: ex.Cuts, summaries: list[str]
                       ) -> float:
  """Share of all the summaries' claims that their history does not support."""
  bad = total = 0
  for summary, user, cut in zip(summaries, cuts.users, cuts.cuts):
    b, t = corpus.checker.unsupported(summary, corpus.facts(int(user), int(cut)))
    bad, total = bad + b, total + t
  return bad / max(total, 1)


def title_fidelity(corpus: Corpus, cuts: ex.Cuts, summaries: list[str]
                   ) -> dict[str, float]:
  """How faithfully summaries copy titles from their histories (one summary per
  cut): {"titles_per_summary": title claims per summary, "titles_unsupported":
  share of those titles not in the history (left out when no title was
  written: undefined, not 0), "latest_copied": share of the summaries whose
  `recent` part starts with the history's latest title}."""
  titles = unsupported = latest = 0
  checker = corpus.checker
  for summary, user, cut in zip(summaries, cuts.users, cuts.cuts):
    known = corpus.facts(int(user), int(cut))
    found = [c for c in texts.claims(summary) if c.kind == "title"]
    titles += len(found)
    unsupported += sum(not checker.supported(c, known) for c in found)
    recent = texts.parts_by_head(summary).get(texts.RECENT_HEAD)
    if recent:
      first = texts.claims(recent)[0]
      latest += checker.item_of_title.get(first.text) == known.items[-1]
  n = max(len(summaries), 1)
  fidelity = {"titles_per_summary": titles / n, "latest_copied": latest / n}
  if titles:
    fidelity["titles_unsupported"] = unsupported / titles
  return fidelity


# The title-fidelity figures of the policy warm-up's valid rows, with labels.
FIDELITY = (("greedy_titles_unsupported", "greedy titles unsupported"),
            ("sampled_titles_unsupported", "sampled titles unsupported"),
            ("greedy_latest_copied", "greedy latest copied"),
            ("sampled_latest_copied", "sampled latest copied"),
            ("greedy_titles_per_summary", "greedy titles / summary"),
            ("sampled_titles_per_summary", "sampled titles / summary"))


def fidelity_curve(rows: list[dict]) -> list[dict]:
  """The policy warm-up's valid rows (metrics.jsonl rows, split "valid"), by
  step, as `benchmarks.rlpf --mode=fidelity` plots them: {"step", and each
  FIDELITY key}; a row without the titles per summary is not one. No titles
  written: their unsupported share is undefined (None; title_fidelity leaves
  it out, and older runs logged 0)."""
  per_summary = ("greedy_titles_per_summary", "sampled_titles_per_summary")
  curve = [{"step": r["step"], **{k: r.get(k) for k, _ in FIDELITY}}
           for r in rows if r.get("split") == "valid" and all(k in r for k in per_summary)]
  for r in curve:
    for mode in ("greedy", "sampled"):
      if r[f"{mode}_titles_per_summary"] == 0:
        r[f"{mode}_titles_unsupported"] = None
  return sorted(curve, key=lambda r: r["step"])


def budget_context(corpus: Corpus, item_ids: np.ndarray, ratings: np.ndarray,
                   kind: str, budget: int, rng: np.random.Generator) -> list[int]:
  """The most events of a history (the latest, random or earliest: kind
  last_k | random_k | first_k) whose text fits in `budget` tokens (at least
  one event)."""
  best = ex.history_context(corpus, item_ids, ratings, kind, 1, rng)
  state = rng.bit_generator.state  # the same random draw for every k
  for k in range(2, len(item_ids) + 1):
    rng.bit_generator.state = state
    ids = ex.history_context(corpus, item_ids, ratings, kind, k, rng)
    if len(ids) > budget:
      break
    best = ids
  return best


def within_prompt_effect(written: np.ndarray, values: np.ndarray, group: int
                         ) -> tuple[float, float, int]:
  """The within-prompt worth of writing a part: over prompts whose `group`
  samples include both summaries with it and without it, the mean of
  (mean value with - mean value without), its standard error, and how many
  such prompts. written [n] bool, values [n]; rows prompt-major."""
  w, v = written.reshape(-1, group), values.reshape(-1, group)
  mixed = w.any(1) & ~w.all(1)
  if mixed.sum() < 2:
    return float("nan"), float("nan"), int(mixed.sum())
  with_, without = w[mixed], ~w[mixed]
  gaps = ((v[mixed] * with_).sum(1) / with_.sum(1)
          - (v[mixed] * without).sum(1) / without.sum(1))
  return float(gaps.mean()), float(gaps.std(ddof=1) / np.sqrt(len(gaps))), len(gaps)
