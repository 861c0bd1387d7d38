"""Where RL's signal is: what RLPF's sampled summaries write, and what
writing each part is worth in the reward.

  python -m benchmarks.summarize.rlpf_rollouts --runs=synthetic=runs/rlpf_syn \
      --out benchmarks/results/rlpf_rollouts

Samples `--samples` summaries per training prompt (as an RL step does, at the
RL temperature or `--temperature`) from each finished run's initial and RL
policies, reads them with the run's predictor, and says for each part (likes,
rates, recent, saw) how often it is written and what writing it is worth in
the run's reward, within a prompt (the difference REINFORCE's gradient
follows), and how often the KL-regularised optimum would write it. No setting
is chosen.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from benchmarks import harness, plots
from benchmarks.summarize import rlpf_runs
from infra import results

FLAGS = (
    rlpf_runs.RUNS,
    harness.Flag("prompts", 512, "Training prompts."),
    harness.Flag("samples", 8, "Summaries sampled per prompt."),
    harness.Flag("temperature", 0.0, "Sampling temperature (0: each run's "
                 "config.rl.temperature)."),
)
WORTHS = ("reward", "correct", "probability", "length")


def sample_rollouts(t, config, params: dict, prompts: int, samples: int, seed: int,
                    temperature: float) -> dict[str, np.ndarray]:
  """RL-step rollouts of `params` (a policy) on `prompts` training cuts, each
  `samples` times at `temperature` (0: the run's config.rl.temperature):
  {"correct", "probability", "length", "finished",
  "unsupported_all" and "unsupported_<part>" (the share of its claims the
  history does not support; nan: none written), and one bool per part}
  [prompts x samples]."""
  from summarize import examples as ex, rlpf, texts, workflow
  cfg = dataclasses.replace(workflow.rl_config(config, t.length_target),
                            group_size=samples, reward="probability",
                            temperature=temperature or config.rl.temperature)
  roll = jax.jit(rlpf.make_rollout(t.policy, t.predictor, cfg,
                                   **workflow.rl_prompt_ids(config, t.corpus)))
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(t.cuts), prompts, replace=False)
  checker, chunk, out = texts.ClaimChecker(t.corpus.items), 16, []
  for start in range(0, prompts, chunk):
    batch = ex.rl_batch(t.corpus, t.cuts, rows[start:start + chunk], rng,
                        config.rl.num_options, config.rl.distractors)
    r = jax.device_get(roll({"policy": params, "predictor": t.predictor_params},
                            batch, jax.random.PRNGKey(seed * 1000 + start)))
    summaries = t.corpus.decode_summaries(r["summary"])
    users = np.repeat(rows[start:start + chunk], samples)
    known = [t.corpus.facts(int(t.cuts.users[row]), int(t.cuts.cuts[row]))
             for row in users]
    # {head or "all": [n] share of its claims the history does not support}
    unsupported = {"all": [checker.unsupported(x, k) for x, k in zip(summaries, known)]}
    parts = [texts.parts_by_head(x) for x in summaries]
    for head in texts.PART_HEADS:
      unsupported[head] = [checker.unsupported(p.get(head, ""), k)
                           for p, k in zip(parts, known)]
    out.append({"correct": r["correct"], "probability": r["prediction"],
                "length": r["length"], "finished": r["finished"],
                **{f"unsupported_{head}": np.array([u / n if n else np.nan
                                                    for u, n in counts])
                   for head, counts in unsupported.items()},
                **{head: np.array([head in p for p in parts])
                   for head in texts.PART_HEADS}})
  return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def policy_summary(r: dict, cfg, samples: int) -> dict:
  """A policy's mean reward, correctness, probability and length, its share
  of unsupported claims, and per part: how often written, its claims'
  unsupported share, its within-prompt worth and its KL-optimum share."""
  from summarize import evaluation, rlpf, texts
  summary = {k: float(r[k].mean()) for k in WORTHS}
  summary["kl_coef"] = cfg.kl_coef
  # nan: a summary without claims (unsupported share undefined)
  summary["unsupported_all"] = float(np.nanmean(r["unsupported_all"]))
  summary["parts"] = {}
  for head in texts.PART_HEADS:
    part = {"written": float(r[head].mean()),
            "unsupported": float(np.nanmean(r[f"unsupported_{head}"]))}
    for value in WORTHS:
      mean, err, n = evaluation.within_prompt_effect(r[head], r[value], samples)
      part[f"{value}_worth"], part[f"{value}_worth_stderr"], part["n"] = mean, err, n
    part["kl_optimum_share"] = (
        rlpf.kl_regularised_share(part["written"], part["reward_worth"], cfg.kl_coef)
        if 0 < part["written"] < 1 and np.isfinite(part["reward_worth"])
        else float("nan"))
    summary["parts"][head] = part
  return summary


def measure(run: harness.Run) -> dict:
  import ml_collections
  from infra import mesh as mesh_lib
  from summarize import rlpf, workflow
  args, out = run.args, {}
  for name, workdir in rlpf_runs.workdirs(args.runs).items():
    config = ml_collections.ConfigDict(rlpf_runs.read_results(workdir)["config"])
    t = workflow.train(config, workdir, mesh_lib.make_mesh(config.mesh))
    cfg = workflow.rl_config(config, t.length_target)
    out[name] = {}
    for policy, params in (("initial", t.initial_params), ("rlpf", t.rl_params)):
      r = sample_rollouts(t, config, params, args.prompts, args.samples,
                          config.seed + 11, args.temperature)
      if not np.all(np.isfinite(r["probability"])):
        raise FloatingPointError(f"{name} ({workdir}), {policy} policy: the "
                                 "predictor's scores are not finite")
      prediction = r["correct"] if cfg.reward == "correct" else r["probability"]
      r["reward"] = np.asarray(rlpf.rewards(prediction, r["length"], r["finished"], cfg))
      s = out[name][policy] = policy_summary(r, cfg, args.samples)
      print(f"[rollouts] {name} {policy}: reward {s['reward']:.3f}, correct "
            f"{s['correct']:.3f}, tokens {s['length']:.1f}, unsupported "
            f"{s['unsupported_all']:.3f}", flush=True)
  return {"prompts": args.prompts, "samples": args.samples,
          "temperature": args.temperature, "runs": out}


def present(payload: dict):
  samples, prompts = payload["samples"], payload["prompts"]
  temperature = payload.get("temperature")  # artifacts before it was recorded: none
  at = ("the RL temperature" if not temperature else f"temperature {temperature}")
  lines = [f"What RL's samples write, and what writing each part is worth: "
           f"{samples} summaries sampled per training prompt at {at}, {prompts} "
           "prompts, read by the run's frozen predictor. *Worth* is within a "
           "prompt: the mean over prompts whose samples both write and omit the "
           "part of (mean with - mean without), ± one standard error, over n such "
           "prompts; the reward is the run's (its prediction term and length term).",
           "", "*At the KL optimum*: how often the policy maximising E[reward] - "
           "kl_coef x KL(policy || this policy) would write the part, from its "
           "share and reward worth (rlpf.kl_regularised_share); greedy summaries "
           "write it only above 0.5.", ""]
  cells, totals = [], []
  for name, policies in payload["runs"].items():
    for policy, s in policies.items():
      kl = s.get("kl_coef")  # artifacts before it was recorded: none
      for head, part in s["parts"].items():
        cells.append([name, policy, head, f"{part['written']:.2f}",
                      f"{part['unsupported']:.2f}"]
                     + [f"{part[f'{v}_worth']:+.3f} ± {part[f'{v}_worth_stderr']:.3f}"
                        for v in ("reward", "correct", "probability")]
                     + [f"{part['length_worth']:+.1f}", part["n"], _kl_optimum(part, kl)])
      totals.append([name, policy, f"{s['reward']:.3f}", f"{s['correct']:.3f}",
                     f"{s['probability']:.3f}", f"{s['length']:.1f}",
                     f"{s['unsupported_all']:.3f}"])
  lines += results.markdown_table(
      ["run", "policy", "part", "written", "its claims unsupported", "reward worth",
       "correct worth", "probability worth", "tokens worth", "n",
       "at the KL optimum"], cells)
  lines += [""] + results.markdown_table(
      ["run", "policy", "reward", "correct", "probability", "tokens",
       "unsupported claims"], totals)
  return lines, plot(payload["runs"])


def _kl_optimum(part: dict, kl_coef) -> str:
  """The part's share at the KL optimum (artifacts from before it was
  reported have none, nor their kl_coef)."""
  if "kl_optimum_share" not in part:
    return "-"
  return f"{part['kl_optimum_share']:.2f}" + (
      f" (kl_coef {kl_coef:g})" if kl_coef is not None else "")


def plot(runs: dict):
  """Per run: the share of samples writing each part, and its reward worth."""
  fig, axes = plots.panels(2 * len(runs), width=4.6)
  for i, (name, policies) in enumerate(runs.items()):
    share_ax, worth_ax = axes[2 * i], axes[2 * i + 1]
    for j, (policy, s) in enumerate(policies.items()):
      heads = list(s["parts"])
      x = np.arange(len(heads)) + 0.4 * j
      share_ax.bar(x, [s["parts"][h]["written"] for h in heads], 0.4, label=policy)
      worth_ax.bar(x, [s["parts"][h]["reward_worth"] for h in heads], 0.4,
                   yerr=[s["parts"][h]["reward_worth_stderr"] for h in heads],
                   label=policy)
    for ax, label in ((share_ax, "share of samples writing it"),
                      (worth_ax, "reward worth (within prompt)")):
      ax.set_xticks(np.arange(len(heads)) + 0.2, heads)
      ax.set_ylabel(label)
      ax.set_title(name, fontsize=8)
      ax.legend(fontsize=7)
    worth_ax.axhline(0, color="k", lw=0.5)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
