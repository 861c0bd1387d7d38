"""RLPF: the quality table of finished runs, and the speed of rollouts and RL steps.

  # the table (+ RL curves) of finished `rlpf` workdirs, one per data set
  python -m benchmarks.rlpf --mode=table \\
      --runs=synthetic=runs/rlpf_syn,movielens=runs/rlpf_ml --out benchmarks/rlpf_quality
  # rollout throughput and RL step time at a config's shapes (fresh parameters)
  python -m benchmarks.rlpf --mode=speed --out benchmarks/rlpf_speed
  # how much the histories hold: non-LLM readers of the table's question
  python -m benchmarks.rlpf --mode=ceiling \
      --runs=synthetic=runs/rlpf_syn,movielens=runs/rlpf_ml --out benchmarks/rlpf_ceiling
  # what RL's samples write and what each part earns in the reward
  python -m benchmarks.rlpf --mode=rollouts --runs=synthetic=runs/rlpf_syn \
      --out benchmarks/rlpf_rollouts
  # how faithfully the initial policy copies titles over its warm-up
  python -m benchmarks.rlpf --mode=fidelity --runs=synthetic=runs/rlpf_syn \
      --out benchmarks/rlpf_fidelity

`table` reads each workdir's results.json (written by
`python main.py --config configs/rlpf.py ...`) and its RL stage's
metrics.jsonl, and writes `<out>.json`, `<out>.md` and `<out>.png` (accuracy
against context tokens per row; the RL task's accuracy and the KL over RL
steps). `speed` times, on this machine, the jitted sampling of a batch of
summaries (generated tokens/s, eos ignored: every row runs `summary_len`
steps) and one whole RL step (rollout, predictor scores, policy, reference and
value passes, update) at the config's shapes, the median of `--repeats`.
`ceiling` answers each run's next-title question (its test users, cuts and
options, rebuilt from its config) without an LLM, from the same N-event
history: by the user's genre taste, and by item co-occurrence counted over the
training users' timelines; beside the run's own predictor rows, it says how
much of what the history holds the predictor reads. `rollouts` is where RL's
signal is: it samples `--samples` summaries per training prompt (as an RL step
does, at the RL temperature) from each run's initial and RL policies, reads
them with the run's predictor, and says for each part (likes, rates, recent,
saw) how often it is written and what writing it is worth in the run's reward,
within a prompt (the difference REINFORCE's gradient follows). `fidelity`
reads the `[policy]` warm-up's valid rows of each workdir (only its policy
stage need be done): the share of the valid users' greedy and sampled titles
not in their histories, and of summaries whose `recent` part starts with the
latest title, over warm-up steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import linen as nn

from benchmarks import report
from infra import results as results_lib

_MODE = flags.DEFINE_enum("mode", "table", ["table", "speed", "ceiling", "rollouts",
                                           "fidelity"],
                         "What to measure.")
_RUNS = flags.DEFINE_string("runs", "synthetic=runs/rlpf_syn",
                            "name=workdir,... of finished rlpf runs (table).")
_OUT = flags.DEFINE_string("out", "benchmarks/rlpf_quality", "Output path prefix.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (speed).")
_PROMPTS = flags.DEFINE_integer("prompts", 512, "Training prompts (rollouts).")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Summaries sampled per prompt (rollouts).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature "
                                  "(rollouts; 0: each run's config.rl.temperature).")

ROW_LABELS = {
    "none": "no context", "full_history": "full history (N events)",
    "last_k": "last-k events at RLPF's budget",
    "random_k": "random-k events at RLPF's budget",
    "first_k": "first-k events at RLPF's budget",
    "initial_policy": "initial policy's summary",
    "hierarchical": "time-hierarchical summarizer",
    "hierarchical_verified": "hierarchical + verifier", "rlpf": "RLPF summary"}
TASKS = (("next_title", "next title (RL task)"), ("favourite_genre", "favourite genre"),
         ("rating", "rating"), ("future_genre", "future genre"),
         ("quality", "UserSumBench quality"))


def read_run(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  rows = {}
  for key, value in results.items():
    if key.startswith("test/") and key.count("/") == 2:
      _, row, metric = key.split("/")
      rows.setdefault(row, {})[metric] = value
  curve = [r for r in report.read_metrics(os.path.join(workdir, "rlpf"))]
  return {"rows": rows, "curve": curve, "test_users": results["test_users"],
          "length_target": results["length_target"],
          "config": {k: results["config"][k] for k in ("data", "rl", "summary", "rl_train")}}


def markdown_table(name: str, run: dict) -> list[str]:
  def cell(scores, key):
    err = scores.get(f"{key}_stderr")
    return f"{scores[key]:.3f}" + (f" ± {err:.3f}" if err is not None else "")
  lines = [f"### {name} ({int(run['test_users'])} held-out test users, N = "
           f"{run['config']['data']['history_len']})", "",
           "| context | tokens | " + " | ".join(t for _, t in TASKS)
           + " | density | hallucination |",
           "|---" * (len(TASKS) + 4) + "|"]
  for row, label in ROW_LABELS.items():
    s = run["rows"].get(row)
    if s is None:
      continue
    density = f"{s['density']:.2f}" if "density" in s else "-"
    hall = f"{s['hallucination']:.3f}" if "hallucination" in s else "-"
    lines.append(f"| {label} | {s['context_tokens']:.1f} | "
                 + " | ".join(cell(s, t) for t, _ in TASKS)
                 + f" | {density} | {hall} |")
  written = [(label, run["rows"][row]) for row, label in ROW_LABELS.items()
             if "writes_recent" in run["rows"].get(row, {})]
  if written:  # what each summarizer chooses to say
    lines += ["", "| summary | writes likes | writes rates | writes recent | writes saw |",
              "|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(f"{s[f'writes_{h}']:.2f}" for h in
                                         ("likes", "rates", "recent", "saw")) + " |"
              for label, s in written]
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
  lines = ["| run | RL setting (reward, baseline, KL weight, lr, length beta) | seed "
           "| RLPF tokens | next title | paired gain, next title | paired gain, quality "
           "| hallucination initial -> RLPF | writes recent |",
           "|---|---|---|---|---|---|---|---|---|"]
  by_setting = {}
  for name, run in runs.items():
    rl, first = run["rows"].get("rlpf", {}), run["rows"].get("initial_policy", {})
    if "quality_gain_over_initial" not in rl:
      continue
    setting, seed = rl_setting(run), run["config"]["rl"].get("seed", 0)
    by_setting.setdefault(setting, {})[seed] = rl  # a seed run twice counts once
    lines.append(
        f"| {name} | {setting} | {seed} | {rl['context_tokens']:.1f} | "
        f"{rl['next_title']:.3f} ± {rl['next_title_stderr']:.3f} | "
        f"{rl['gain_over_initial']:+.3f} ± {rl['gain_over_initial_stderr']:.3f} | "
        f"{rl['quality_gain_over_initial']:+.3f} ± {rl['quality_gain_over_initial_stderr']:.3f} | "
        f"{first['hallucination']:.3f} -> {rl['hallucination']:.3f} | "
        f"{first['writes_recent']:.2f} -> {rl['writes_recent']:.2f} |")
  for setting, by_seed in by_setting.items():
    seeds = list(by_seed.values())
    if len(seeds) < 2:
      continue
    def mean(key):
      values = np.array([s[key] for s in seeds])
      return f"{values.mean():+.3f} ± {values.std(ddof=1) / np.sqrt(len(values)):.3f}"
    lines.append(f"| mean over {len(seeds)} seeds | {setting} | - | - | - | "
                 f"{mean('gain_over_initial')} | {mean('quality_gain_over_initial')} | - | - |")
  return lines if len(lines) > 2 else []


def table(out: str) -> None:
  runs = {}
  for item in _RUNS.value.split(","):
    name, workdir = item.split("=")
    runs[name] = read_run(workdir)
  lines = [f"RLPF and its baselines, scored by the same frozen predictor "
           f"(`python -m benchmarks.rlpf --mode=table --runs={_RUNS.value} "
           f"--out {out}`). ± is one standard error.", ""]
  comparison = comparison_table(runs)
  if len(runs) > 1 and comparison:
    lines += ["### RL settings compared (the same test users)", ""] + comparison + [""]
  for name, run in runs.items():
    lines += markdown_table(name, run) + [""]
  results_lib.write_report(out, {"device": report.device(), "runs": runs}, lines)
  fig, axes = report.figure(2 + len(runs), width=4.6)
  for i, (name, run) in enumerate(runs.items()):
    ax = axes[i]
    for j, (row, label) in enumerate(ROW_LABELS.items()):
      s = run["rows"].get(row)
      if s is None:
        continue
      ax.errorbar(max(s["context_tokens"], 1.0), s["next_title"],
                  yerr=s["next_title_stderr"], fmt="o", color=f"C{j}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("context tokens (log)")
    ax.set_ylabel("next-title accuracy (4 options)")
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
  report.save(fig, out)
  print("\n".join(lines))


def speed(out: str) -> None:
  from configs import rlpf as rlpf_config
  from summarize import rlpf, workflow
  from infra.train_state import TrainState
  from userllm.models import decoding, llm
  config = rlpf_config.get_config()
  cfg = workflow.llm_config(config, config.data.vocab_size)
  model = llm.DecoderLM(cfg)
  rl = workflow.rl_config(config, length_target=10.0)
  b, p, s = config.rl_train.batch_size, config.summary.prompt_len, rl.summary_len
  prompt = jax.random.randint(jax.random.PRNGKey(0), (b, p), 3, cfg.vocab_size)
  mask = jnp.ones((b, p), bool)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), prompt[:1], mask[:1])["params"])
  value_model = rlpf.ValueModel(cfg)
  head = value_model.init(jax.random.PRNGKey(2), prompt[:1], mask[:1])["params"]["head"]
  state_params = {"policy": params, "reference": params, "predictor": params,
                  "value": {"trunk": params, "head": head}}
  tx = rlpf.rl_optimizer(optax.adam(1e-4), state_params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=state_params,
                     opt_state=tx.init(state_params), rng=jax.random.PRNGKey(3))
  step = jax.jit(rlpf.make_rl_step(model, value_model, model, tx, rl, [3, 4], [5, 6],
                                   eos_id=-1))  # no eos: every row runs s tokens
  options = jnp.ones((b, config.rl.num_options, 8), jnp.int32)
  batch = {"prompt": prompt, "prompt_mask": mask, "options": options,
           "option_mask": options > 0, "answer": jnp.zeros(b, jnp.int32)}

  def timed(fn):
    jax.block_until_ready(fn())
    times = []
    for _ in range(_REPEATS.value):
      began = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - began)
    return float(np.median(times))

  rows = b * rl.group_size
  many = jnp.repeat(prompt, rl.group_size, 0)
  gen = timed(lambda: decoding.generate(
      model, params, many, jnp.ones_like(many, bool), jax.random.PRNGKey(4),
      max_new_tokens=s, temperature=1.0, eos_id=-1))
  step_s = timed(lambda: step(state, batch)[1]["loss"])
  result = {"device": report.device(), "batch": b, "group_size": rl.group_size,
            "sequences": rows, "prompt_len": p, "summary_len": s,
            "vocab": cfg.vocab_size, "embed_dim": cfg.embed_dim,
            "num_layers": cfg.num_layers, "rollout_seconds": gen,
            "generated_tokens_per_second": rows * s / gen,
            "rl_step_seconds": step_s, "rollout_share_of_step": gen / step_s}
  md = [f"RLPF speed at configs/rlpf.py's shapes (`python -m benchmarks.rlpf "
        f"--mode=speed --out {out}`), {result['device']}: {rows} sequences "
        f"({b} prompts x {rl.group_size}) of {p} prompt + {s} summary tokens, "
        f"a {cfg.num_layers}-layer {cfg.embed_dim}-wide LM, vocabulary {cfg.vocab_size}.", "",
        "| measure | value |", "|---|---|",
        f"| rollout (sampling {s} tokens, KV cache, in jit) | {gen * 1e3:.0f} ms |",
        f"| generated tokens/s | {result['generated_tokens_per_second']:.0f} |",
        f"| one RL step (rollout + predictor + update) | {step_s * 1e3:.0f} ms |",
        f"| rollout share of the step | {gen / step_s:.0%} |"]
  results_lib.write_report(out, result, md)
  fig, axes = report.figure(1)
  axes[0].barh(["rollout", "rest of the RL step"], [gen, step_s - gen])
  axes[0].set_xlabel("seconds")
  axes[0].set_title(f"RL step {step_s:.2f} s; {result['generated_tokens_per_second']:.0f}"
                    " generated tokens/s", fontsize=9)
  report.save(fig, out)
  print("\n".join(md))


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


def ceiling(out: str) -> None:
  import ml_collections
  from summarize import workflow
  result, lines = {"device": report.device(), "runs": {}}, [
      "The table's next-title question answered without an LLM, from the same "
      f"history (`python -m benchmarks.rlpf --mode=ceiling --runs={_RUNS.value} "
      f"--out {out}`); ± is one standard error.", "",
      "| data | reader | next title | all future probes (quality) |", "|---|---|---|---|"]
  for item in _RUNS.value.split(","):
    name, workdir = item.split("=")
    with open(os.path.join(workdir, "results.json")) as f:
      saved = json.load(f)
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
    for row in ("none", "full_history", "initial_policy", "rlpf"):
      rows[f"predictor: {ROW_LABELS[row]}"] = {
          k: saved[f"test/{row}/{k}"] for k in ("next_title", "next_title_stderr",
                                                "quality", "quality_stderr")}
    result["runs"][name] = rows
    for reader, r in rows.items():
      lines.append(f"| {name} | {reader} | {r['next_title']:.3f} ± "
                   f"{r['next_title_stderr']:.3f} | {r['quality']:.3f} ± "
                   f"{r['quality_stderr']:.3f} |")
  results_lib.write_report(out, result, lines)
  fig, axes = report.figure(len(result["runs"]), width=4.6)
  for ax, (name, rows) in zip(axes, result["runs"].items()):
    labels = list(rows)
    ax.barh(labels, [rows[k]["next_title"] for k in labels],
            xerr=[rows[k]["next_title_stderr"] for k in labels],
            color=["C7" if k == "chance" else "C0" if ":" not in k else "C1"
                   for k in labels])
    ax.set_xlabel("next-title accuracy (4 options)")
    ax.set_title(f"{name}: non-LLM readers (blue) vs the predictor (orange)", fontsize=8)
    ax.tick_params(labelsize=6)
  report.save(fig, out)
  print("\n".join(lines))


def sample_rollouts(t, config, params: dict, prompts: int, samples: int, seed: int
                    ) -> dict[str, np.ndarray]:
  """RL-step rollouts of `params` (a policy) on `prompts` training cuts, each
  `samples` times: {"correct", "probability", "length", "finished",
  "unsupported_all" and "unsupported_<part>" (the share of its claims the
  history does not support; nan: none written), and one bool per part}
  [prompts x samples]."""
  from summarize import examples as ex, rlpf, texts, workflow
  cfg = dataclasses.replace(workflow.rl_config(config, t.length_target),
                            group_size=samples, reward="probability",
                            temperature=_TEMPERATURE.value or config.rl.temperature)
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


def rollouts(out: str) -> None:
  import ml_collections
  from infra import mesh as mesh_lib
  from summarize import evaluation, rlpf, texts, workflow
  result = {"device": report.device(), "prompts": _PROMPTS.value,
            "samples": _SAMPLES.value, "runs": {}}
  lines = [f"What RL's samples write, and what writing each part is worth "
           f"(`python -m benchmarks.rlpf --mode=rollouts --runs={_RUNS.value} "
           f"--prompts={_PROMPTS.value} --samples={_SAMPLES.value} "
           f"--temperature={_TEMPERATURE.value} --out {out}`): "
           f"{_SAMPLES.value} summaries sampled per training prompt at "
           f"{'the RL temperature' if not _TEMPERATURE.value else _TEMPERATURE.value}, "
           f"{_PROMPTS.value} prompts, read by the run's frozen "
           "predictor. *Worth* is within a prompt: the mean over prompts whose "
           "samples both write and omit the part of (mean with - mean without), "
           "± one standard error, over n such prompts; the reward is the run's "
           "(its prediction term and length term).", "",
           "*At the KL optimum*: how often the policy maximising E[reward] - "
           "kl_coef x KL(policy || this policy) would write the part, from its "
           "share and reward worth (rlpf.kl_regularised_share); greedy summaries "
           "write it only above 0.5.", "",
           "| run | policy | part | written | its claims unsupported | reward worth | "
           "correct worth | probability worth | tokens worth | n | at the KL optimum |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for item in _RUNS.value.split(","):
    name, workdir = item.split("=")
    with open(os.path.join(workdir, "results.json")) as f:
      config = ml_collections.ConfigDict(json.load(f)["config"])
    t = workflow.train(config, workdir, mesh_lib.make_mesh(config.mesh))
    cfg = workflow.rl_config(config, t.length_target)
    result["runs"][name] = {}
    for policy, params in (("initial", t.initial_params), ("rlpf", t.rl_params)):
      r = sample_rollouts(t, config, params, _PROMPTS.value, _SAMPLES.value,
                          config.seed + 11)
      prediction = r["correct"] if cfg.reward == "correct" else r["probability"]
      r["reward"] = np.asarray(rlpf.rewards(prediction, r["length"], r["finished"], cfg))
      if not np.all(np.isfinite(r["probability"])):
        raise SystemExit(f"{name} ({workdir}), {policy} policy: the predictor's "
                         "scores are not finite; no figures are reported")
      summary = {k: float(r[k].mean()) for k in ("reward", "correct", "probability",
                                                 "length")}
      # nan: a summary without claims (unsupported share undefined)
      summary["unsupported_all"] = float(np.nanmean(r["unsupported_all"]))
      summary["parts"] = {}
      for head in texts.PART_HEADS:
        part = {"written": float(r[head].mean()),
                "unsupported": float(np.nanmean(r[f"unsupported_{head}"]))}
        for value in ("reward", "correct", "probability", "length"):
          mean, err, n = evaluation.within_prompt_effect(r[head], r[value],
                                                         _SAMPLES.value)
          part[f"{value}_worth"], part[f"{value}_worth_stderr"], part["n"] = mean, err, n
        part["kl_optimum_share"] = (
            rlpf.kl_regularised_share(part["written"], part["reward_worth"], cfg.kl_coef)
            if 0 < part["written"] < 1 and np.isfinite(part["reward_worth"])
            else float("nan"))
        summary["parts"][head] = part
        lines.append(
            f"| {name} | {policy} | {head} | {part['written']:.2f} | "
            f"{part['unsupported']:.2f} | " + " | ".join(
                f"{part[f'{v}_worth']:+.3f} ± {part[f'{v}_worth_stderr']:.3f}"
                for v in ("reward", "correct", "probability")) +
            f" | {part['length_worth']:+.1f} | {part['n']} | "
            f"{part['kl_optimum_share']:.2f} (kl_coef {cfg.kl_coef:g}) |")
      result["runs"][name][policy] = summary
      print(f"[rollouts] {name} {policy}: reward {summary['reward']:.3f}, correct "
            f"{summary['correct']:.3f}, tokens {summary['length']:.1f}, unsupported "
            f"{summary['unsupported_all']:.3f}", flush=True)
  lines += ["", "| run | policy | reward | correct | probability | tokens | "
            "unsupported claims |", "|---|---|---|---|---|---|---|"]
  for name, policies in result["runs"].items():
    for policy, s in policies.items():
      lines.append(f"| {name} | {policy} | {s['reward']:.3f} | {s['correct']:.3f} | "
                   f"{s['probability']:.3f} | {s['length']:.1f} | "
                   f"{s['unsupported_all']:.3f} |")
  results_lib.write_report(out, result, lines)
  fig, axes = report.figure(2 * len(result["runs"]), width=4.2)
  heads = list(texts.PART_HEADS)
  for i, (name, policies) in enumerate(result["runs"].items()):
    share_ax, worth_ax = axes[2 * i], axes[2 * i + 1]
    for j, (policy, s) in enumerate(policies.items()):
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
  report.save(fig, out)
  print("\n".join(lines))


def fidelity(out: str) -> None:
  from summarize import evaluation
  runs = {}
  for item in _RUNS.value.split(","):
    name, workdir = item.split("=")
    rows = report.read_metrics(os.path.join(workdir, "policy"))
    runs[name] = evaluation.fidelity_curve(rows)
    if not runs[name]:
      raise SystemExit(f"{workdir}/policy/metrics.jsonl: no valid rows with title "
                       "fidelity (a run from before it was reported?)")
  lines = ["How faithfully the initial policy's summaries copy titles over its "
           f"warm-up (`python -m benchmarks.rlpf --mode=fidelity --runs={_RUNS.value} "
           f"--out {out}`): the run's valid users, greedy and sampled at the RL "
           "temperature (summarize.evaluation.title_fidelity).", ""]
  for name, curve in runs.items():
    lines += [f"### {name}", ""] + results_lib.markdown_table(
        ["step"] + [label for _, label in evaluation.FIDELITY],
        [[r["step"]] + ["-" if r[k] is None else f"{r[k]:.3f}" for k, _ in evaluation.FIDELITY]
         for r in curve]) + [""]
  results_lib.write_report(out, {"device": report.device(), "runs": runs}, lines)
  fig, (unsupported_ax, latest_ax) = report.figure(2, width=4.6)
  for i, (name, curve) in enumerate(runs.items()):
    for ax, key in ((unsupported_ax, "titles_unsupported"), (latest_ax, "latest_copied")):
      for mode, style in (("greedy", "o-"), ("sampled", "s--")):
        points = [(r["step"], r[f"{mode}_{key}"]) for r in curve
                  if r[f"{mode}_{key}"] is not None]
        ax.plot(*zip(*points), style, color=f"C{i}", label=f"{name} {mode}")
  unsupported_ax.set_ylabel("share of titles not in the history")
  latest_ax.set_ylabel("summaries whose recent part starts\nwith the latest title")
  for ax in (unsupported_ax, latest_ax):
    ax.set_xlabel("policy warm-up step")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
  report.save(fig, out)
  print("\n".join(lines))


def main(argv):
  del argv
  os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
  {"table": table, "speed": speed, "ceiling": ceiling,
   "rollouts": rollouts, "fidelity": fidelity}[_MODE.value](_OUT.value)


if __name__ == "__main__":
  app.run(main)
