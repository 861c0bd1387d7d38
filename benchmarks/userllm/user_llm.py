"""User-LLM vs the text prompt: quality, LLM input tokens, FLOPs and step time
at several history lengths.

    python -m benchmarks.userllm.user_llm --config configs/user_llm.py \
      --out benchmarks/results/user_llm_synthetic
    python -m benchmarks.userllm.user_llm --config configs/user_llm.py \
      --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \
      --out benchmarks/results/user_llm_ml100k

For every method x history length H:
- LLM input tokens: mean real tokens the LLM reads per example (text prompt:
  the serialised history, not truncated; soft prompt: the bare task prompt
  plus the latents; cross-attention: the bare task prompt);
- FLOPs per example of one forward pass, from XLA's cost analysis of the
  compiled computation (LLM alone, and encoder + Perceiver + projector), and
  the analytic count of the LLM's matmuls (`llm.forward_flops`), which should
  agree with XLA's to within the elementwise ops XLA also counts;
- step time: a jitted training step (forward, backward, Adam) at --step_batch
  examples, the median of timed steps after a compile step;
- quality (unless --efficiency_only): the whole `user_llm` workflow for that
  method and H, one shared workdir so the LM pretraining runs once; the
  encoder is pretrained per H. Next-title Recall@1/5/10 by log-likelihood
  ranking of every title, favourite-genre accuracy.

`text_prompt` is given the whole history (its context is sized to H), so its
cost grows with H; `text_prompt@256` is the text prompt at a deployment's
context budget of 256 tokens: the newest events that fit, whatever H is.
The benchmark's synthetic users have long timelines (at least max(H) events)
so that every H is real history, not padding. No setting is chosen: every
method and H is reported as run, on the test users.
"""

from __future__ import annotations

import copy
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks import harness, plots
from data import prompts, sources, splits
from infra import optim, results, train_loop
from infra.errors import ConfigError
from infra.train_state import TrainState
from userllm import builders, user_llm as ul, workflow
from userllm.models import llm as llm_lib

METHODS = ("cross_attention", "soft_prompt", "text_prompt", "text_prompt@256")
FLAGS = (
    harness.Flag("histories", ["50", "100", "200", "500"], "History lengths H."),
    harness.Flag("methods", list(METHODS), "Methods to compare."),
    harness.Flag("efficiency_only", False, "Tokens, FLOPs and step time only."),
    harness.Flag("timed_steps", 5, "Timed steps per cell."),
    harness.Flag("step_batch", 8, "Batch of the timed step and the FLOPs count."),
)


def parse_method(name: str) -> tuple[str, int]:
  """'text_prompt@256' -> ('text_prompt', 256); a bare method -> (method, 0):
  no context budget (the text prompt then holds the whole history)."""
  method, _, budget = name.partition("@")
  if method not in builders.METHODS or (budget and (method != "text_prompt"
                                              or not budget.isdigit())):
    raise ConfigError(f"--methods: unknown method {name!r} (one of {tuple(builders.METHODS)}; "
                     f"text_prompt@<tokens> for a context budget)")
  return method, int(budget or 0)


def xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def long_histories(config, max_history: int):
  """The config with synthetic users long enough that every H is real history
  (at least max(H) + 20 events); MovieLens data is left as it is."""
  config = copy.deepcopy(config)
  if config.data.source == "synthetic":
    config.data.synthetic.update(num_users=1000, min_events=max_history + 20,
                                 mean_extra_events=40.0,
                                 max_events=max_history + 200)
  return config


def efficiency(config, timelines, method: str, history: int, timed_steps: int,
               workdir: str, step_batch: int, budget: int = 0) -> dict:
  """Tokens, FLOPs and step time of `method` at `history` events (a text
  prompt cut to `budget` tokens when > 0)."""
  config.userllm.method, config.userllm.history_len = method, history
  tokenizer = builders.tokenizer_for(config, workdir, timelines)
  builder = prompts.PromptBuilder(timelines, tokenizer,
                                  builders.METHODS[method].history, history,
                                  budget or 10**6)
  model = builders.build_model(config, timelines, tokenizer.vocab_size, method)
  batch_size = step_batch
  long_users = np.nonzero(timelines.lengths > history)[0]
  users = np.resize(long_users if len(long_users) else np.argsort(
      -timelines.lengths)[:1], batch_size)
  examples = prompts.Examples(users.astype(np.int32),
                              np.minimum(timelines.lengths[users] - 1,
                                         history).astype(np.int32),
                              np.zeros(batch_size, np.int32))
  batch = builder.batch(examples, np.arange(batch_size))
  real_prompt = float(batch["prompt_mask"].sum(1).mean())
  # the fixed-shape prompt is the longest real one in the batch
  width = int(batch["prompt_mask"].sum(1).max())
  for key in ("tokens", "token_mask", "target_mask"):
    batch[key] = batch[key][:, builder.prompt_len - width:]
  train_batch = {k: batch[k] for k in ("tokens", "token_mask", "target_mask",
                                        "events") if k in batch}
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), train_batch.get("events"),
                                    batch["tokens"], batch["token_mask"])["params"])
  conditioning = model.apply({"params": params}, train_batch.get("events"),
                             method=model.conditioning)
  llm = llm_lib.DecoderLM(model.config.llm)
  seq = batch["tokens"].shape[1]
  latents = model.config.num_latents or history
  soft = latents if method == "soft_prompt" else 0
  cross = latents if method == "cross_attention" else 0
  llm_xla = xla_flops(lambda p, b, c: llm.apply({"params": p}, b["tokens"],
                                                b["token_mask"], **c)[0],
                      params["llm"], train_batch, conditioning) / batch_size
  user_xla = 0.0
  if model.config.uses_user:
    user_xla = xla_flops(lambda p, e: model.apply({"params": p}, e,
                                                  method=model.conditioning),
                         params, train_batch["events"]) / batch_size
  mask = ul.trainable_mask(params, "full")
  tx = ul.masked_optimizer(optim.make_optimizer(config.train), mask)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
  step_seconds = train_loop.step_seconds(
      train_loop.make_train_step(functools.partial(ul.lm_loss, model, mask), tx),
      state, jax.device_put(train_batch), timed_steps)
  return {"llm_input_tokens": real_prompt + soft, "llm_sequence": seq + soft,
          "llm_flops_xla": llm_xla, "user_flops_xla": user_xla,
          "llm_flops_analytic": llm_lib.forward_flops(model.config.llm, seq + soft,
                                                   cross),
          "step_seconds": step_seconds, "batch_size": batch_size}


QUALITY_KEYS = ("test/model/next_title/recall@1", "test/model/next_title/recall@5",
                "test/model/next_title/recall@10",
                "test/model/favourite_genre/accuracy",
                "test/prior/next_title/recall@10", "train_seconds", "eval_users")


def quality(config, method: str, history: int, workdir: str,
            tokens_per_event: float, mesh, budget: int = 0) -> dict:
  """The whole workflow for `method` at `history` events (shared workdir)."""
  config.userllm.method, config.userllm.history_len = method, history
  # no budget: context for the whole history, 1.25x its mean length in tokens
  # (the rare longer prompt loses its oldest titles)
  config.userllm.text_prompt_len = budget or (
      int(history * tokens_per_event * 1.25) + 16)
  results = workflow.run(config, workdir, mesh)
  return {k: results[k] for k in QUALITY_KEYS}


def text_tokens_per_event(config, timelines, workdir: str) -> float:
  """Mean tokens an event adds to a text prompt (its title and a separator)."""
  tokenizer = builders.tokenizer_for(config, workdir, timelines)
  lengths = np.array([len(ids) + 1 for ids in tokenizer.encode(
      [str(t) for t in timelines.items.titles])])
  return float(lengths[timelines.item_ids].mean())


def measure(run: harness.Run) -> dict:
  args = run.args
  histories = [int(h) for h in args.histories]
  methods = [(name, *parse_method(name)) for name in args.methods]
  config = long_histories(run.config, max(histories))
  timelines = sources.load_timelines(config.data)
  train_timelines = splits.leave_last_out(timelines).train
  workdir = os.path.join(run.workdir, config.data.source)
  os.makedirs(workdir, exist_ok=True)
  tokens_per_event = text_tokens_per_event(config, train_timelines, workdir)
  rows = []
  for history in histories:
    for name, method, budget in methods:
      print(f"[benchmark] {name} H={history}", flush=True)
      row = {"method": name, "history": history,
             **efficiency(config, train_timelines, method, history, args.timed_steps,
                          workdir, args.step_batch, budget)}
      if not args.efficiency_only:
        row.update(quality(config, method, history, workdir, tokens_per_event,
                           run.mesh(), budget))
      rows.append(row)
      print(row, flush=True)
  meta = {"data": config.data.source, "jax": jax.__version__,
          "python": platform.python_version(), "config": config.to_dict()}
  return {"meta": meta, "rows": rows}


def present(payload: dict):
  meta, rows = payload["meta"], payload["rows"]
  header = ["method", "history", "R@1", "R@5", "R@10", "genre acc",
            "LLM input tokens", "LLM GFLOPs (XLA)", "LLM GFLOPs (analytic)",
            "encoder+Perceiver GFLOPs", "total GFLOPs", "step (ms)"]
  def fmt(r, k):  # a test accuracy ± its binomial standard error
    if k not in r:
      return "-"
    se = np.sqrt(r[k] * (1 - r[k]) / r["eval_users"])
    return f"{r[k]:.3f} ± {se:.3f}"
  total = lambda x: x["llm_flops_xla"] + x["user_flops_xla"]  # noqa: E731
  cells = [[r["method"], r["history"]] + [fmt(r, k) for k in QUALITY_KEYS[:4]]
           + [f"{r['llm_input_tokens']:.0f}", f"{r['llm_flops_xla'] / 1e9:.4f}",
              f"{r['llm_flops_analytic'] / 1e9:.4f}",
              f"{r['user_flops_xla'] / 1e9:.4f}", f"{total(r) / 1e9:.4f}",
              f"{1e3 * r['step_seconds']:.1f}"] for r in rows]
  by = {(r["method"], r["history"]): r for r in rows}
  ratios = []
  for (method, history), r in sorted(by.items()):
    if method.startswith("text_prompt"):
      continue
    for (text_method, text_history), text in sorted(by.items()):
      if text_method.startswith("text_prompt") and text_history == history:
        ratios.append(f"- H={history}: {text_method} / {method} = "
                      f"{text['llm_flops_xla'] / r['llm_flops_xla']:.1f}x LLM "
                      f"FLOPs, {total(text) / total(r):.1f}x total FLOPs")
  lines = ([f"User-LLM benchmark, {meta['data']} data.", "",
            "FLOPs are per example, one forward pass; step time is one training "
            f"step (forward, backward, Adam) at batch "
            f"{rows[0]['batch_size'] if rows else '-'}.", ""]
           + results.markdown_table(header, cells) + [""] + ratios
           + sorted({f"- H={r['history']}: popularity (the prior) next-title "
                     f"R@10 {r[QUALITY_KEYS[4]]:.3f} on the same test users"
                     for r in rows if QUALITY_KEYS[4] in r}))
  return lines, plot(rows)


def plot(rows: list[dict]):
  """Per method against H: total forward GFLOPs (LLM + user encoder), and the
  quality columns the rows hold (efficiency-only rows have none)."""
  panels = [("total GFLOPs / example", lambda r: (r["llm_flops_xla"]
                                                  + r["user_flops_xla"]) / 1e9)]
  for key, label in ((QUALITY_KEYS[2], "next-title Recall@10"),
                     (QUALITY_KEYS[3], "favourite-genre accuracy")):
    if any(key in r for r in rows):
      panels.append((label, lambda r, key=key: r.get(key, float("nan"))))
  fig, axes = plots.panels(len(panels), width=4.6)
  for ax, (label, value) in zip(axes, panels):
    for method in dict.fromkeys(r["method"] for r in rows):
      mine = sorted((r for r in rows if r["method"] == method),
                    key=lambda r: r["history"])
      ax.plot([r["history"] for r in mine], [value(r) for r in mine], "o-",
              label=method)
    ax.set(xlabel="history length H (events)", ylabel=label)
    if label.startswith("total"):
      ax.set_yscale("log")
  axes[0].legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/user_llm.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
