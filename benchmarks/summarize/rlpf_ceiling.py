"""How much the histories hold: RLPF's next-title question answered without
an LLM, from the same history.

  python -m benchmarks.summarize.rlpf_ceiling \
      --runs=synthetic=runs/rlpf_syn,movielens=runs/rlpf_ml \
      --out benchmarks/results/rlpf_ceiling

Answers each finished run's next-title question (its test users, cuts and
options, rebuilt from its config) from the same N-event history: by the
user's genre taste, and by item co-occurrence counted over the training
users' timelines; beside the run's own predictor rows, it says how much of
what the history holds the predictor reads. No setting is chosen.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness, plots
from benchmarks.summarize import rlpf_runs
from benchmarks.summarize.rlpf_runs import ROW_LABELS
from infra import results


def reference_hits(timelines, users, corpus, cuts, probes, seed: int
                   ) -> dict[str, np.ndarray]:
  """{reader: [n, future_len] bool} whether each non-LLM reader picks the true
  option of each future probe from the cut's history (ties broken at random).

  genre_taste: an option's genres weighted by their share of the history's
  events; co_occurrence: how many of the history's items share a training
  user's timeline with the option, per training event of the option."""
  genres = timelines.items.genres.astype(np.float64)  # [items + 1, genres]
  co = np.zeros((len(genres), len(genres)))
  for user in users.train:
    seen = np.unique(timelines.user_items(int(user)))
    co[np.ix_(seen, seen)] += 1.0
  np.fill_diagonal(co, 0.0)
  rng = np.random.default_rng(seed)
  options = probes.future_options  # [n, f, k]
  hits = {"genre_taste": [], "co_occurrence": []}
  for row, (user, cut) in enumerate(zip(cuts.users, cuts.cuts)):
    history, _ = corpus.history(int(user), int(cut))
    taste = genres[history].mean(0)
    opts = options[row]
    scores = {"genre_taste": genres[opts] @ taste / np.maximum(genres[opts].sum(-1), 1),
              "co_occurrence": co[np.unique(history)][:, opts].sum(0)
                               / (corpus.popularity[opts] + 1.0)}
    for name, score in scores.items():
      noise = rng.random(score.shape) * 1e-9 * (1 + np.abs(score).max())
      hits[name].append((score + noise).argmax(-1) == probes.future_answer[row])
  return {name: np.array(h) for name, h in hits.items()}


def readers_of(name: str, workdir: str) -> dict[str, dict]:
  """{reader: {next_title, quality and their standard errors}} of one run:
  chance, the non-LLM readers, and the run's own predictor rows."""
  import ml_collections
  from summarize import workflow
  saved = rlpf_runs.read_results(workdir)
  config = ml_collections.ConfigDict(saved["config"])
  timelines, users, corpus = workflow.setup(config, workdir, quiet=True)
  cuts, probes = workflow.held_out(config, timelines, users.test, corpus, "test")
  readers = {"chance": np.full(probes.future_answer.shape, 1.0 / config.rl.num_options)}
  readers.update(reference_hits(timelines, users, corpus, cuts, probes, config.seed))
  rows = {}
  for reader, hits in readers.items():
    first, per_user = hits[:, 0].astype(float), hits.mean(1)
    rows[reader] = {"next_title": first.mean(),
                    "next_title_stderr": first.std(ddof=1) / np.sqrt(len(first)),
                    "quality": per_user.mean(),
                    "quality_stderr": per_user.std(ddof=1) / np.sqrt(len(per_user))}
  predictor = rlpf_runs.test_rows(saved)
  for row in ("none", "full_history", "initial_policy", "rlpf"):
    rows[f"predictor: {ROW_LABELS[row]}"] = {
        k: predictor[row][k] for k in ("next_title", "next_title_stderr",
                                       "quality", "quality_stderr")}
  print(f"[ceiling] {name}: {len(rows)} readers", flush=True)
  return rows


def measure(run: harness.Run) -> dict:
  return {"runs": {name: readers_of(name, workdir)
                   for name, workdir in rlpf_runs.workdirs(run.args.runs).items()}}


def present(payload: dict):
  lines = ["The table's next-title question answered without an LLM, from the same "
           "history; ± is one standard error.", ""]
  lines += results.markdown_table(
      ["data", "reader", "next title", "all future probes (quality)"],
      [[name, reader, f"{r['next_title']:.3f} ± {r['next_title_stderr']:.3f}",
        f"{r['quality']:.3f} ± {r['quality_stderr']:.3f}"]
       for name, rows in payload["runs"].items() for reader, r in rows.items()])
  fig, axes = plots.panels(len(payload["runs"]), width=5.0)
  for ax, (name, rows) in zip(axes, payload["runs"].items()):
    labels = list(rows)
    ax.barh(labels, [rows[k]["next_title"] for k in labels],
            xerr=[rows[k]["next_title_stderr"] for k in labels],
            color=["C7" if k == "chance" else "C0" if ":" not in k else "C1"
                   for k in labels])
    ax.set_xlabel("next-title accuracy (4 options)")
    ax.set_title(f"{name}: non-LLM readers (blue) vs the predictor (orange)", fontsize=8)
    ax.tick_params(labelsize=6)
  return lines, fig


EXPERIMENT = harness.Experiment(measure, present, flags=(rlpf_runs.RUNS,))

if __name__ == "__main__":
  harness.main(EXPERIMENT)
