"""RLPF's recipe chosen on validation users only, from the runs already made.

  python -m benchmarks.summarize.rlpf_select

Every candidate RL setting below was run on the same warm-ups (the same
initial policy and predictor) and each run recorded two things: its RL
stage's validation curve (next-title accuracy of its greedy summaries on the
run's validation users, `rlpf/metrics.jsonl`) and its test table. The recipe
in configs/ was first chosen by the test figures; this benchmark chooses
again by the validation figure alone (the mean over a setting's seeds of its
final validation accuracy) and reports the chosen setting's test figures,
beside the setting the test figures had chosen. It reads the committed
artifacts (benchmarks/results/rlpf_quality_default.json and
rlpf_quality_movielens.json), runs nothing, and so re-selects among the same
candidates: the test users have been seen before, which no re-selection can
undo; only new users could.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from benchmarks import harness, plots
from infra import results

# data set -> (artifact, {setting: its runs}, the setting the test figures chose)
GROUPS = {
    "synthetic (configs/rlpf.py)": (
        "rlpf_quality_default.json", {
            "length_beta=0.001": ("default_seed0", "default_seed1", "default_seed2"),
            "length_beta=0.005": ("beta5e-3_seed0", "beta5e-3_seed1",
                                  "beta5e-3_seed2"),
            "kl_coef=0.05, lr=1e-4": ("kl0.05_lr1e-4",),
            "reward=probability, baseline=rloo": ("probability_rloo4",),
        }, "length_beta=0.001"),
    "MovieLens-100K (configs/rlpf_movielens.py)": (
        "rlpf_quality_movielens.json", {
            "history_lm_weight=1.0": ("history_lm_seed0", "history_lm_seed1",
                                      "history_lm_seed2"),
            "history_lm_weight=0 (title pieces only)": ("title_pieces_only",),
        }, "history_lm_weight=1.0"),
}
FIGURES = ("next_title", "gain_over_initial", "quality_gain_over_initial")


def final_valid(run: dict) -> float:
  """The last validation next-title accuracy of a run's RL stage."""
  rows = [r for r in run["curve"] if r.get("split") == "valid"]
  if not rows:
    raise ValueError("a run without validation rows")
  return float(rows[-1]["next_title"])


def setting_figures(runs: list[dict]) -> dict:
  """A setting's figures over its runs (seeds): the mean final validation
  accuracy, and the mean of each test figure with its standard error (over
  seeds when there are several; one run's own paired standard error
  otherwise)."""
  out = {"runs": len(runs), "valid": float(np.mean([final_valid(r) for r in runs])),
         "valid_users": int(runs[0]["config"]["data"]["valid_users"]),
         "test_users": int(runs[0]["test_users"])}
  for name in FIGURES:
    values = [r["rows"]["rlpf"][name] for r in runs]
    if len(values) > 1:
      out[name], out[f"{name}_stderr"] = harness.mean_and_stderr(values)
      out[f"{name}_stderr_is"] = "over seeds"
    else:
      out[name] = float(values[0])
      out[f"{name}_stderr"] = float(runs[0]["rows"]["rlpf"].get(f"{name}_stderr",
                                                               math.nan))
      out[f"{name}_stderr_is"] = "paired over test users"
  return out


def measure(run: harness.Run) -> dict:
  groups = {}
  for group, (artifact, settings, earlier) in GROUPS.items():
    with open(os.path.join(harness.REPO, harness.RESULTS, artifact)) as f:
      recorded = json.load(f)["runs"]
    figures = {s: setting_figures([recorded[name] for name in names])
               for s, names in settings.items()}
    candidates = {s: harness.Scored(f["valid"], f) for s, f in figures.items()}
    chosen, test = run.choose(group, "RL setting", "valid next-title accuracy "
                              "(mean over seeds, final step)", candidates)
    groups[group] = {
        "artifact": f"{harness.RESULTS}/{artifact}",
        "valid": {s: f["valid"] for s, f in figures.items()},
        "runs": {s: list(names) for s, names in settings.items()},
        "chosen": chosen, "chosen_test": test,
        "earlier": earlier, "earlier_test": figures[earlier],
        "valid_users": test["valid_users"], "test_users": test["test_users"]}
  return {"groups": groups}


def _cell(figures: dict, name: str) -> str:
  return f"{figures[name]:+.3f} ± {figures[f'{name}_stderr']:.3f}"


def present(payload: dict):
  lines = ["RLPF's RL setting chosen by the validation users' next-title "
           "accuracy alone (the mean over a setting's seeds at the final step), "
           "among runs on the same warm-ups; the test figures of the chosen "
           "setting, and of the setting the test figures had chosen. Gains are "
           "RLPF minus the initial policy, paired over the same test users; ± is "
           "the standard error over seeds (one run: paired over test users).", ""]
  for group, g in payload["groups"].items():
    lines += [f"### {group}", "",
              f"{g['valid_users']} validation users, {g['test_users']} test "
              f"users; runs from `{g['artifact']}`.", ""]
    lines += results.markdown_table(
        ["setting", "runs", "valid next title", "chosen on valid",
         "chosen on test (earlier)"],
        [[s, len(g["runs"][s]), f"{v:.3f}", "yes" if s == g["chosen"] else "",
          "yes" if s == g["earlier"] else ""] for s, v in g["valid"].items()])
    lines += [""] + results.markdown_table(
        ["chosen by", "setting", "test RLPF next title", "next title gain",
         "UserSumBench quality gain"],
        [[by, g[setting_key], f"{g[test_key]['next_title']:.3f}",
          _cell(g[test_key], "gain_over_initial"),
          _cell(g[test_key], "quality_gain_over_initial")]
         for by, setting_key, test_key in (("validation users", "chosen", "chosen_test"),
                                           ("test users (earlier)", "earlier",
                                            "earlier_test"))]) + [""]
  return lines, plot(payload["groups"])


def plot(groups: dict):
  fig, axes = plots.panels(len(groups), width=5.0)
  for ax, (group, g) in zip(np.atleast_1d(axes), groups.items()):
    names = list(g["valid"])
    ax.bar(range(len(names)), [g["valid"][n] for n in names],
           color=["C1" if n == g["chosen"] else "C0" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("valid next-title accuracy\n(mean over seeds, final step)")
    ax.set_title(group, fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
