"""The self-critique verifier of summaries: claims checked against the raw
history (texts.ClaimChecker), rewrites, and cutting what stays unsupported."""

from __future__ import annotations

from summarize import examples as ex
from summarize.summarizer import Summarizer


def verified_summaries(summarizer: Summarizer, cuts: ex.Cuts,
                       prompts_: list[list[int]], summaries: list[str],
                       tries: int, seed: int) -> tuple[list[str], dict]:
  """The self-critique verifier: each summary's claims are checked against
  the raw history (texts.ClaimChecker); a summary with unsupported claims is
  written again from its prompt (sampled, up to `tries` times, keeping the
  draft with the fewest unsupported claims), and what is still unsupported
  after that is cut out. Returns (summaries, {"verifier_rewritten": share of
  summaries rewritten, "verifier_cut": share still cut after the retries})."""
  corpus = summarizer.corpus
  checker = corpus.checker
  known = [corpus.facts(int(u), int(c)) for u, c in zip(cuts.users, cuts.cuts)]
  best = list(summaries)
  bad = [checker.unsupported(s, k)[0] for s, k in zip(best, known)]
  rewritten = sum(b > 0 for b in bad)
  for attempt in range(tries):
    todo = [i for i, b in enumerate(bad) if b > 0]
    if not todo:
      break
    drafts = corpus.decode_summaries(summarizer.write(
        [prompts_[i] for i in todo], temperature=1.0, seed=seed + attempt + 1))
    for i, draft in zip(todo, drafts):
      count = checker.unsupported(draft, known[i])[0]
      if count < bad[i]:
        best[i], bad[i] = draft, count
  final = [checker.keep_supported(s, k) if b else s
           for s, k, b in zip(best, known, bad)]
  n = max(len(final), 1)
  return final, {"verifier_rewritten": rewritten / n,
                 "verifier_cut": sum(b > 0 for b in bad) / n}
