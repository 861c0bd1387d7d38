"""RLPF's quality table of finished runs, and their RL curves.

  python -m benchmarks.summarize.rlpf_table \\
      --runs=synthetic=runs/rlpf_syn,movielens=runs/rlpf_ml \\
      --out benchmarks/results/rlpf_quality

Reads each workdir's results.json (written by `python main.py --config
configs/rlpf.py ...`) and its RL stage's metrics.jsonl: per run, every
context row (no context, the full history, last/random/first-k events at
RLPF's budget, the initial policy's, the hierarchical summarizer's and RLPF's
summaries) scored by the same frozen predictor on its test users, with what
each summarizer writes; with several runs, a comparison of their RL settings
(paired gains over the initial policy, and the mean over runs that differ
only in rl.seed). The figure: accuracy against context tokens per run, and
the RL task's accuracy and the KL over RL steps. No setting is chosen here:
every run is reported as given.
"""

from __future__ import annotations

from benchmarks import harness, plots
from benchmarks.summarize import rlpf_runs
from benchmarks.summarize.rlpf_runs import ROW_LABELS, TASKS
from infra import results


def measure(run: harness.Run) -> dict:
  return {"runs": {name: rlpf_runs.read_run(workdir)
                   for name, workdir in rlpf_runs.workdirs(run.args.runs).items()}}


def _with_stderr(scores: dict, key: str) -> str:
  err = scores.get(f"{key}_stderr")
  return f"{scores[key]:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def run_table(name: str, run: dict) -> list[str]:
  """A run's context rows by task, what each summarizer writes, and RL's
  paired gain over the initial policy."""
  lines = [f"### {name} ({int(run['test_users'])} held-out test users, N = "
           f"{run['config']['data']['history_len']})", ""]
  cells = []
  for row, label in ROW_LABELS.items():
    s = run["rows"].get(row)
    if s is not None:
      cells.append([label, f"{s['context_tokens']:.1f}"]
                   + [_with_stderr(s, t) for t, _ in TASKS]
                   + [f"{s['density']:.2f}" if "density" in s else "-",
                      f"{s['hallucination']:.3f}" if "hallucination" in s else "-"])
  lines += results.markdown_table(["context", "tokens"] + [t for _, t in TASKS]
                                  + ["density", "hallucination"], cells)
  written = [(label, run["rows"][row]) for row, label in ROW_LABELS.items()
             if "writes_recent" in run["rows"].get(row, {})]
  if written:  # what each summarizer chooses to say
    parts = ("likes", "rates", "recent", "saw")
    lines += [""] + results.markdown_table(
        ["summary"] + [f"writes {p}" for p in parts],
        [[label] + [f"{s[f'writes_{p}']:.2f}" for p in parts] for label, s in written])
  rl = run["rows"].get("rlpf", {})
  if "gain_over_initial" in rl:
    lines += ["", f"RLPF - initial policy, next title, paired over the same users: "
              f"{rl['gain_over_initial']:+.3f} ± {rl['gain_over_initial_stderr']:.3f}."]
    if "quality_gain_over_initial" in rl:  # runs before it was reported have none
      lines[-1] += (f" On UserSumBench quality (the next {run['config']['data']['future_len']}"
                    f" items), paired: {rl['quality_gain_over_initial']:+.3f} ± "
                    f"{rl['quality_gain_over_initial_stderr']:.3f}.")
  return lines


def rl_setting(run: dict) -> str:
  """The RL stage's setting in words: what the comparison table's rows vary."""
  rl, train = run["config"]["rl"], run["config"]["rl_train"]
  baseline = rl["baseline"] + (f" x {rl['group_size']}" if rl["baseline"] in ("rloo", "grpo")
                               else "")
  return (f"{rl['reward']}, {baseline}, kl {rl['kl_coef']:g}, lr {train['learning_rate']:g}, "
          f"beta {rl['length_beta']:g}")


def comparison_table(runs: dict) -> list[str]:
  """One line per run: its RL setting and what RL changed against the initial
  policy, paired over the same test users; runs that differ only in rl.seed
  get a line with the mean of their paired gains (± their spread / sqrt(seeds))."""
  cells, by_setting = [], {}
  for name, run in runs.items():
    rl, first = run["rows"].get("rlpf", {}), run["rows"].get("initial_policy", {})
    if "quality_gain_over_initial" not in rl:
      continue
    setting, seed = rl_setting(run), run["config"]["rl"].get("seed", 0)
    by_setting.setdefault(setting, {})[seed] = rl  # a seed run twice counts once
    cells.append([
        name, setting, seed, f"{rl['context_tokens']:.1f}",
        f"{rl['next_title']:.3f} ± {rl['next_title_stderr']:.3f}",
        f"{rl['gain_over_initial']:+.3f} ± {rl['gain_over_initial_stderr']:.3f}",
        f"{rl['quality_gain_over_initial']:+.3f} ± {rl['quality_gain_over_initial_stderr']:.3f}",
        f"{first['hallucination']:.3f} -> {rl['hallucination']:.3f}",
        f"{first['writes_recent']:.2f} -> {rl['writes_recent']:.2f}"])
  for setting, by_seed in by_setting.items():
    seeds = list(by_seed.values())
    if len(seeds) < 2:
      continue
    def mean(key):
      mean_, stderr = harness.mean_and_stderr([s[key] for s in seeds])
      return f"{mean_:+.3f} ± {stderr:.3f}"
    cells.append([f"mean over {len(seeds)} seeds", setting, "-", "-", "-",
                  mean("gain_over_initial"), mean("quality_gain_over_initial"), "-", "-"])
  if not cells:
    return []
  return results.markdown_table(
      ["run", "RL setting (reward, baseline, KL weight, lr, length beta)", "seed",
       "RLPF tokens", "next title", "paired gain, next title", "paired gain, quality",
       "hallucination initial -> RLPF", "writes recent"], cells)


def present(payload: dict):
  runs = payload["runs"]
  lines = ["RLPF and its baselines, scored by the same frozen predictor. ± is one "
           "standard error.", ""]
  comparison = comparison_table(runs)
  if len(runs) > 1 and comparison:
    lines += ["### RL settings compared (the same test users)", ""] + comparison + [""]
  for name, run in runs.items():
    lines += run_table(name, run) + [""]
  return lines, plot(runs)


def plot(runs: dict):
  """Per run, next-title accuracy against context tokens; then the RL task's
  accuracy and the KL over RL steps (two panels a row)."""
  fig, axes = plots.panels(len(runs) + 2, width=5.0)
  for i, (name, run) in enumerate(runs.items()):
    ax = axes[i]
    for j, (row, label) in enumerate(ROW_LABELS.items()):
      s = run["rows"].get(row)
      if s is None:
        continue
      ax.errorbar(max(s["context_tokens"], 1.0), s["next_title"],
                  yerr=s["next_title_stderr"], fmt="o", color=f"C{j}", label=label)
    ax.set_xscale("log")
    ax.set(xlabel="context tokens (log)", ylabel="next-title accuracy (4 options)")
    ax.set_title(name, fontsize=9)
    if i == 0:
      ax.legend(fontsize=6)
  accuracy_ax, kl_ax = axes[-2], axes[-1]
  for i, (name, run) in enumerate(runs.items()):
    train = [r for r in run["curve"] if r["split"] == "rlpf"]
    steps = [r["step"] for r in train]
    accuracy_ax.plot(steps, [r["accuracy"] for r in train], color=f"C{i}", label=name)
    valid = [r for r in run["curve"] if r["split"] == "valid"]
    accuracy_ax.plot([r["step"] for r in valid], [r["next_title"] for r in valid], "s--",
                     color=f"C{i}", lw=0.8)
    kl_ax.plot(steps, [r["kl"] for r in train], color=f"C{i}", label=name)
  accuracy_ax.set_title("RL task accuracy: sampled training batches (lines), "
                        "valid users' greedy summaries (squares)", fontsize=7)
  kl_ax.set_title("KL(policy || initial policy) per summary", fontsize=8)
  kl_ax.set_yscale("log")
  for ax in (accuracy_ax, kl_ax):
    ax.set_xlabel("RL step")
    ax.legend(fontsize=6)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=(rlpf_runs.RUNS,))

if __name__ == "__main__":
  harness.main(EXPERIMENT)
