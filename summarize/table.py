"""The RLPF table: one row per context of each held-out user (nothing, the
whole history, last / random / first k events at the RLPF summaries' token
budget, the initial policy's summaries, the time-hierarchical summarizer with
and without its verifier, RLPF's summaries), every probe answered by the same
frozen predictor; RLPF against the initial policy paired over the same users.

Result keys follow the house scheme `<split>/<row>/<task>/<metric>`:
`test/rlpf/next_title/accuracy` (+ `accuracy_stderr`, `gain_over_initial`),
`test/rlpf/usersumbench/quality` (+ `density`, `quality_gain_over_initial`),
`test/rlpf/context/tokens`, `test/rlpf/summary/hallucination`,
`test/rlpf/summary/writes_recent`, ...
"""

from __future__ import annotations

import json
import os

import numpy as np

from infra import results
from summarize import evaluation, examples as ex, hierarchical, texts, verifier
from summarize.corpus import Corpus
from summarize.summarizer import Summarizer

ROWS = ("none", "full_history", "last_k", "random_k", "first_k", "initial_policy",
        "hierarchical", "hierarchical_verified", "rlpf")
SUMMARY_ROWS = ("initial_policy", "hierarchical", "hierarchical_verified", "rlpf")
BUDGET_ROWS = ("last_k", "random_k", "first_k")

# score_contexts' and the rows' figures -> (task, metric) of the result key
_ACCURACY_TASKS = ("next_title", "favourite_genre", "rating", "future_genre")
_KEYS = {
    **{t: (t, "accuracy") for t in _ACCURACY_TASKS},
    **{f"{t}_stderr": (t, "accuracy_stderr") for t in _ACCURACY_TASKS},
    "gain_over_initial": ("next_title", "gain_over_initial"),
    "gain_over_initial_stderr": ("next_title", "gain_over_initial_stderr"),
    "quality": ("usersumbench", "quality"),
    "quality_stderr": ("usersumbench", "quality_stderr"),
    "density": ("usersumbench", "density"),
    "quality_gain_over_initial": ("usersumbench", "quality_gain_over_initial"),
    "quality_gain_over_initial_stderr": ("usersumbench",
                                         "quality_gain_over_initial_stderr"),
    "context_tokens": ("context", "tokens"),
    "budget": ("context", "budget"),
}


def summaries(config, corpus: Corpus, policy, initial_params, rl_params,
              cuts: ex.Cuts) -> dict[str, tuple[list[str], dict]]:
  """{summary row: (each cut's summary text, extra figures)} for SUMMARY_ROWS:
  greedy summaries of the initial and the RL policy, and the hierarchical
  summarizer (the initial policy on chunks, then merged) before and after
  its verifier; the extras are its verifier's shares."""
  e = config.eval
  initial = Summarizer(policy, initial_params, corpus, e.batch_size)
  trained = Summarizer(policy, rl_params, corpus, e.batch_size)
  merge, merged = hierarchical.summaries(initial, cuts, config.summary.chunk_len)
  verified, shares = verifier.verified_summaries(
      initial, cuts, merge, merged, e.verifier_tries, config.seed + 7)
  out = {"initial_policy": (initial.summaries(cuts), {}),
         "rlpf": (trained.summaries(cuts), {}),
         "hierarchical": (merged, {}),
         "hierarchical_verified": (verified, shares)}
  examples = {name: texts_[:3] for name, (texts_, _) in out.items()}
  print("[eval] example summaries: " + json.dumps(examples, indent=1), flush=True)
  return out


def contexts(config, corpus: Corpus, cuts: ex.Cuts,
             written: dict[str, tuple[list[str], dict]]
             ) -> dict[str, tuple[list[list[int]], dict]]:
  """{row: (context ids per cut, extra figures)} for ROWS: the summaries (with
  their hallucination rate and which parts they write), and parts of the
  history as text at the RLPF summaries' mean token budget."""
  rows = {}
  for name, (texts_, extra) in written.items():
    figures = {"hallucination": evaluation.hallucination_rate(corpus, cuts, texts_),
               **{f"writes_{head}": share
                  for head, share in texts.part_shares(texts_).items()}, **extra}
    rows[name] = ([corpus.summary_context(corpus.summary_ids(t)[:-1])
                   for t in texts_], figures)
  budget = int(round(np.mean([len(c) for c in rows["rlpf"][0]])))
  rng = np.random.default_rng(config.seed + 8)
  histories = [corpus.history(int(u), int(c)) for u, c in zip(cuts.users, cuts.cuts)]
  rows["none"] = ([[] for _ in histories], {})
  rows["full_history"] = ([corpus.history_ids(*h) for h in histories], {})
  for kind in BUDGET_ROWS:
    rows[kind] = ([evaluation.budget_context(corpus, *h, kind, budget, rng)
                   for h in histories], {"budget": float(budget)})
  return rows


def score(config, corpus: Corpus, scorer: evaluation.Predictor,
          probes: evaluation.Probes, cuts: ex.Cuts,
          written: dict[str, tuple[list[str], dict]]) -> dict[str, dict]:
  """{row: {figure: value}} for ROWS in order; RLPF's row also holds its
  paired gain over the initial policy on next title and on quality."""
  rows = contexts(config, corpus, cuts, written)
  table, per_user = {}, {}
  for name in ROWS:
    ids, extra = rows[name]
    scores = evaluation.score_contexts(scorer, probes, ids, config.rl.num_options)
    per_user[name] = {"": scores.pop("next_title_hits"),  # the RL task
                      "quality_": scores.pop("quality_per_user")}
    table[name] = {**scores, **extra}
  for prefix, values in per_user["rlpf"].items():  # paired over the same users
    gain, err = evaluation.paired_gain(values, per_user["initial_policy"][prefix])
    table["rlpf"][f"{prefix}gain_over_initial"] = gain
    table["rlpf"][f"{prefix}gain_over_initial_stderr"] = err
  for name, figures in table.items():
    print(f"[eval] {name:22s} " + " ".join(
        f"{k}={v:.3f}" for k, v in figures.items() if not k.endswith("stderr")),
        flush=True)
  return table


def result_keys(split: str, table: dict[str, dict]) -> dict[str, float]:
  """The table's figures under `<split>/<row>/<task>/<metric>`: accuracies
  under their task, UserSumBench's under `usersumbench`, the context's size
  under `context`, and what a summary writes under `summary`."""
  out = {}
  for row, figures in table.items():
    for name, value in figures.items():
      task, metric = _KEYS.get(name, ("summary", name))
      out[results.key(split, row, task, metric)] = float(value)
  return out


def rows_of(saved: dict, split: str = "test") -> dict[str, dict]:
  """The inverse of `result_keys`: {row: {figure: value}} of a run's
  results.json (what the RLPF benchmarks tabulate)."""
  figures = {key: name for name, key in _KEYS.items()}
  rows = {}
  for key, value in saved.items():
    parts = key.split("/")
    if len(parts) == 4 and parts[0] == split:
      _, row, task, metric = parts
      name = figures.get((task, metric), metric if task == "summary" else None)
      if name is not None:
        rows.setdefault(row, {})[name] = value
  return rows


def write_markdown(workdir: str, table: dict[str, dict], users: int) -> str:
  """<workdir>/table.md: the rows with their standard errors."""
  def cell(figures, name):
    err = figures.get(f"{name}_stderr")
    return f"{figures[name]:.3f}" + (f" ± {err:.3f}" if err is not None else "")

  def optional(figures, name, digits):
    return f"{figures[name]:.{digits}f}" if name in figures else "-"

  rows = [[name, f"{f['context_tokens']:.1f}", cell(f, "next_title"),
           cell(f, "favourite_genre"), cell(f, "rating"), cell(f, "future_genre"),
           cell(f, "quality"), optional(f, "density", 2),
           optional(f, "hallucination", 3)] for name, f in table.items()]
  lines = [f"Held-out test users: {users}. Every probe is answered by the same "
           "frozen predictor; ± is one standard error.", ""]
  lines += results.markdown_table(
      ["context", "tokens", "next title (RL task)", "favourite genre", "rating",
       "future genre", "UserSumBench quality", "density", "hallucination"], rows)
  s = table.get("rlpf", {})
  if "gain_over_initial" in s:
    lines += ["", f"RLPF - initial policy on next title (paired): "
              f"{s['gain_over_initial']:+.3f} ± {s['gain_over_initial_stderr']:.3f}; "
              f"on UserSumBench quality (paired): {s['quality_gain_over_initial']:+.3f} "
              f"± {s['quality_gain_over_initial_stderr']:.3f}"]
  path = os.path.join(workdir, "table.md")
  results.write_markdown(path, lines)
  return path
