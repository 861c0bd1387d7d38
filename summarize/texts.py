"""The text of user summarisation: a history as text, programmatic summaries,
the predictor's questions, and the claims of a summary checked against the
history it summarises.

A summary is a few " | "-separated parts, each a head word and its claims
(no title or genre of either data set holds "|" or ";"):
  "likes Drama, Comedy | rates high | recent The Silent Storm; Red Moon |
   saw Old Harbour"
- `likes`: genres, claimed to be among the history's three most frequent;
- `rates`: the history's mean-rating level (low < 3.3 <= mid < 3.7 <= high);
- `recent`: titles of the latest events, newest first;
- `saw`: titles of earlier events.
Programmatic summaries (`programmatic_summary`) draw which parts to write, and
how many claims, from a `Style`: they warm up the policy (a from-scratch LM has
no zero-shot summaries) and teach the predictor to read summaries. Any text the
policy writes is parsed by `claims`; `supported` checks each claim against the
history, which the hallucination rate and the verifier read.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data import prompts
from data import timelines as tl

GENRES_HEAD, RATING_HEAD, RECENT_HEAD, SAW_HEAD = "likes", "rates", "recent", "saw"
PART_SEP, GENRE_SEP, TITLE_SEP = " | ", ", ", "; "
HISTORY_HEAD = prompts.HISTORY_HEAD  # "Watched:"
SUMMARY_HEAD, MERGE_HEAD, CHUNK_SEP = "Summary:", "Summaries:", " # "
LEVELS = prompts.LEVELS
SUPPORTED_TOP_GENRES = 3  # a `likes` genre must be among the history's top 3
# the predictor's questions (data/prompts.py's wording); "rating" names the item
QUESTIONS = {"next_title": "Next title:", "favourite_genre": "Favourite genre:",
             "rating": "Rating of"}


@dataclasses.dataclass(frozen=True)
class Facts:
  """What a history supports.

  genres: genre indices by count, most frequent first (ties: lower index),
  only genres that occur; level: index into LEVELS of the mean rating;
  items: item ids in time order.
  """
  genres: tuple[int, ...]
  level: int
  items: tuple[int, ...]


def facts(items: tl.ItemTable, item_ids: np.ndarray, ratings: np.ndarray) -> Facts:
  counts = items.genres[item_ids].sum(axis=0)
  order = np.argsort(-counts, kind="stable")
  return Facts(tuple(int(g) for g in order if counts[g] > 0),
               prompts.rating_level(ratings), tuple(int(i) for i in item_ids))


def history_text(items: tl.ItemTable, item_ids: np.ndarray, ratings: np.ndarray
                 ) -> str:
  """"Watched: A (4); B (5)." (oldest first; rating rounded to 1..5)."""
  events = [f"{items.titles[i]} ({prompts.rating_bucket(r) + 1})"
            for i, r in zip(item_ids, ratings)]
  return f"{HISTORY_HEAD} {TITLE_SEP.join(events)}."


@dataclasses.dataclass(frozen=True)
class Style:
  """Which parts a programmatic summary writes, and how many claims each."""
  genres: int  # 0..3 top genres
  rating: bool
  recent: int  # latest titles
  saw: int  # earlier titles, drawn at random


def sample_style(rng: np.random.Generator, probabilities: dict) -> Style:
  """A random Style: each part present with its probability in
  `probabilities` ({"genres", "rating", "recent", "saw"}), with 1..3 genres
  and 1..2 titles; at least one part."""
  while True:
    style = Style(
        genres=int(rng.integers(1, 4)) if rng.random() < probabilities["genres"] else 0,
        rating=bool(rng.random() < probabilities["rating"]),
        recent=int(rng.integers(1, 3)) if rng.random() < probabilities["recent"] else 0,
        saw=int(rng.integers(1, 3)) if rng.random() < probabilities["saw"] else 0)
    if style.genres or style.rating or style.recent or style.saw:
      return style


def programmatic_summary(items: tl.ItemTable, known: Facts, style: Style,
                         rng: np.random.Generator) -> str:
  """A summary of `known` in `style`; every claim it makes is supported."""
  parts = []
  if style.genres and known.genres:
    parts.append(f"{GENRES_HEAD} " + GENRE_SEP.join(
        items.genre_names[g] for g in known.genres[:style.genres]))
  if style.rating:
    parts.append(f"{RATING_HEAD} {LEVELS[known.level]}")
  recent = list(known.items[::-1][:style.recent])
  if recent:
    parts.append(f"{RECENT_HEAD} " + TITLE_SEP.join(str(items.titles[i])
                                                    for i in recent))
  earlier = list(known.items[:len(known.items) - len(recent)])
  if style.saw and earlier:
    picked = rng.choice(len(earlier), min(style.saw, len(earlier)), replace=False)
    parts.append(f"{SAW_HEAD} " + TITLE_SEP.join(
        str(items.titles[earlier[i]]) for i in sorted(picked)))
  return PART_SEP.join(parts) if parts else f"{RATING_HEAD} {LEVELS[known.level]}"


@dataclasses.dataclass(frozen=True)
class Claim:
  kind: str  # "genre" | "level" | "title" | "unparsed"
  text: str


def claims(summary: str) -> list[Claim]:
  """The claims of a summary's text; a part with no known head word is one
  "unparsed" claim (never supported)."""
  out = []
  for part in summary.split(PART_SEP.strip()):
    part = part.strip()
    if not part:
      continue
    head, _, rest = part.partition(" ")
    if head == GENRES_HEAD:
      out += [Claim("genre", g.strip()) for g in rest.split(GENRE_SEP.strip())]
    elif head == RATING_HEAD:
      out.append(Claim("level", rest.strip()))
    elif head in (RECENT_HEAD, SAW_HEAD):
      out += [Claim("title", t.strip()) for t in rest.split(TITLE_SEP.strip())]
    else:
      out.append(Claim("unparsed", part))
  return out


PART_HEADS = (GENRES_HEAD, RATING_HEAD, RECENT_HEAD, SAW_HEAD)


def parts_by_head(summary: str) -> dict[str, str]:
  """{head word: that part's text} of the parts a summary writes (the head is
  any word before a part's first space; PART_HEADS are the known ones)."""
  return {part.strip().partition(" ")[0]: part
          for part in summary.split(PART_SEP.strip())}


def parts_written(summary: str) -> set[str]:
  """The head words of the parts a summary writes."""
  return set(parts_by_head(summary))


def part_shares(summaries: list[str]) -> dict[str, float]:
  """{head: share of the summaries that write that part} for the four heads
  (likes, rates, recent, saw): what a summarizer chooses to say."""
  heads = [parts_written(s) for s in summaries]
  return {head: float(np.mean([head in h for h in heads])) if heads else 0.0
          for head in PART_HEADS}


class ClaimChecker:
  """Checks claims against a history's Facts by name lookup."""

  def __init__(self, items: tl.ItemTable):
    self.genre_index = {name: g for g, name in enumerate(items.genre_names)}
    self.item_of_title = {str(t): i for i, t in enumerate(items.titles) if i}

  def supported(self, claim: Claim, known: Facts) -> bool:
    if claim.kind == "genre":
      g = self.genre_index.get(claim.text)
      return g is not None and g in known.genres[:SUPPORTED_TOP_GENRES]
    if claim.kind == "level":
      return claim.text == LEVELS[known.level]
    if claim.kind == "title":
      return self.item_of_title.get(claim.text) in known.items
    return False

  def unsupported(self, summary: str, known: Facts) -> tuple[int, int]:
    """(claims not supported by `known`, all claims) of a summary."""
    found = claims(summary)
    return sum(not self.supported(c, known) for c in found), len(found)

  def keep_supported(self, summary: str, known: Facts) -> str:
    """The summary with its unsupported claims (and parts left empty) removed."""
    parts = []
    for part in summary.split(PART_SEP.strip()):
      head, _, _ = part.strip().partition(" ")
      kept = [c.text for c in claims(part) if self.supported(c, known)]
      if kept:
        sep = GENRE_SEP if head == GENRES_HEAD else TITLE_SEP
        parts.append(f"{head} {sep.join(kept)}")
    return PART_SEP.join(parts)


def vocabulary_corpus(items: tl.ItemTable) -> list[str]:
  """The text a vocabulary for summarisation must cover."""
  words = [HISTORY_HEAD + " A (1); B (5).", SUMMARY_HEAD, MERGE_HEAD + " a # b",
           f"{GENRES_HEAD} A, B | {RATING_HEAD} mid | {RECENT_HEAD} C; D | {SAW_HEAD} E"]
  words += list(QUESTIONS.values()) + list(LEVELS) + list(prompts.RATINGS)
  return words + list(items.genre_names) + [str(t) for t in items.titles[1:]]
