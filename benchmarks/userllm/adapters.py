"""LoRA vs MoLoRA vs MoDE (vs MoLoRA-SD) at equal trainable parameters on the
five-task multi-task setup (configs/multitask.py).

    python -m benchmarks.userllm.adapters --config configs/multitask.py \\
      --out benchmarks/results/adapters_synthetic
    python -m benchmarks.userllm.adapters --config configs/multitask.py \\
      --config.data.source=movielens --config.data.dir=../shared/data/movielens-100k \\
      --kinds lora,molora,mode --out benchmarks/results/adapters_ml100k

Every kind runs the `user_llm` workflow in one shared workdir, so the base LM is
pretrained once and each kind trains its own adapters on the frozen base with
the same examples, steps and learning rate (a kind whose `results_<kind>.json`
is already in the workdir is not rerun; `<kind>+<router>` picks a router).
Rows: each kind; the frozen base with no adapter (scored before the first
kind trains: fresh adapters are no-ops); the prior (each task's answers ranked
by training frequency: item popularity for next title, the majority answer
otherwise). Per task the test headline metric (next title Recall@10, accuracy
otherwise; rating also MAE), their mean, the adapter's trainable parameters
(from the tree; the formula's count is checked equal) and the train-step time:
measured after all kinds have trained, round-robin over the kinds (so every
kind sees the same machine load), the median of jitted steps (forward,
backward, Adam on the adapters) on a batch of the training shape. No setting
is chosen: every kind is reported as run, on the test users.
"""

from __future__ import annotations

import copy
import functools
import json
import os

import jax
import numpy as np
from flax import linen as nn

from benchmarks import harness, plots
from infra import optim, results as results_lib, train_loop
from infra.train_state import TrainState
from userllm import builders, evaluation, user_llm as ul, workflow

KINDS = ("lora", "molora", "mode", "molora_sd")
FLAGS = (harness.Flag("kinds", list(KINDS), "Adapter kinds, each <kind> or "
                      "<kind>+<router>."),)


def config_for(base, kind: str, first: bool = False):
  """`base` with the adapter of one `--kinds` entry: `<kind>` or
  `<kind>+<router>` (e.g. `mode+token_task`: MoDE with the task router)."""
  config = copy.deepcopy(base)
  config.adapter.kind, _, router = kind.partition("+")
  config.adapter.router = router or config.adapter.router
  config.userllm.eval_base = first
  config.userllm.eval_valid = False  # the table reports test; scoring is slow
  return config


def run_kind(config, kind: str, workdir: str, mesh) -> dict:
  """The workflow's results for one kind (read back if already saved)."""
  saved = os.path.join(workdir, f"results_{kind}.json")
  if os.path.exists(saved):
    with open(saved) as f:
      results = json.load(f)
    results.pop("config")
    return results
  results = results_lib.write_results(workdir, workflow.run(config, workdir, mesh),
                                      config)
  results_lib.write_json(saved, {**results, "config": config.to_dict()})
  if results["adapter_parameters"] != results["adapter_parameters_formula"]:
    raise AssertionError(f"{kind}: tree count {results['adapter_parameters']} != "
                         f"formula {results['adapter_parameters_formula']}")
  return results


def step_times(configs: dict, results: dict, rounds: int = 3,
               repeats: int = 5) -> dict[str, float]:
  """{kind: median seconds of one train step}, kinds timed round-robin."""
  first = next(iter(results.values()))
  length, vocab = int(first["llm_sequence_length"]), int(first["vocab_size"])
  rng = np.random.default_rng(0)
  steps = {}
  for kind, config in configs.items():
    batch_size = config.train.batch_size
    tokens = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
    target = np.zeros((batch_size, length), bool)
    target[:, -8:] = True
    batch = {"tokens": tokens, "token_mask": np.ones_like(target),
             "target_mask": target,
             "task_ids": (np.arange(batch_size) % 5).astype(np.int32)}
    model = ul.UserLLM(ul.UserLLMConfig(
        encoder=None, integration="text",
        llm=builders.llm_config(config, vocab, "text_prompt")))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), None, tokens[:1],
                                      target[:1], task_ids=batch["task_ids"][:1]
                                      )["params"])
    mask = ul.trainable_mask(params, "adapters")
    tx = ul.masked_optimizer(optim.make_optimizer(config.train), mask)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
    steps[kind] = (train_loop.make_train_step(
        functools.partial(ul.lm_loss, model, mask), tx), state, jax.device_put(batch))
  times = {kind: [] for kind in configs}
  for _ in range(rounds):
    for kind in configs:
      times[kind].append(train_loop.step_seconds(*steps[kind], repeats=repeats))
  return {kind: float(np.median(t)) for kind, t in times.items()}


def rows_from(results: dict[str, dict]) -> list[dict]:
  """One row per kind, then `base` and `prior`, with the test metrics keyed
  `<task>/<metric>` (and `average`)."""
  def metrics(r, scorer):
    prefix = f"test/{scorer}/"
    out = {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}
    out["average"] = out.pop("all/average")
    return out
  rows = []
  for kind, r in results.items():
    rows.append({"kind": kind, "rank": int(r["adapter_rank"]),
                 "experts": int(r["adapter_experts"]),
                 "adapter_parameters": int(r["adapter_parameters"]),
                 "step_ms": 1e3 * r["train_step_seconds"], **metrics(r, "model")})
  first = next(iter(results.values()))
  rows.append({"kind": "base (no adapter)", **metrics(first, "base")})
  rows.append({"kind": "prior", **metrics(first, "prior")})
  return rows


def standard_error_note(rows: list[dict], tasks, users: int) -> str:
  """The largest binomial standard error sqrt(p (1 - p) / n) of the table's
  rates: a difference smaller than about twice it is within noise."""
  rates = [r[f"{t}/{evaluation.HEADLINE[t]}"] for r in rows for t in tasks
           if f"{t}/{evaluation.HEADLINE[t]}" in r]
  worst = max(rates, key=lambda p: p * (1 - p))
  error = (worst * (1 - worst) / users) ** 0.5
  return (f"One binomial standard error over {users} users is at most "
          f"{error:.3f} (at rate {worst:.3f}); gaps under about "
          f"{2 * error:.3f} are within noise.")


def measure(run: harness.Run) -> dict:
  base = run.config
  configs = {kind: config_for(base, kind, first=i == 0)
             for i, kind in enumerate(run.args.kinds)}
  by_kind = {kind: run_kind(config, kind, run.workdir, run.mesh())
             for kind, config in configs.items()}
  for kind, seconds in step_times(configs, by_kind).items():
    by_kind[kind]["train_step_seconds"] = seconds
  meta = {"data": base.data.source, "jax": jax.__version__,
          "tasks": list(base.userllm.tasks),
          "eval_users": int(next(iter(by_kind.values()))["eval_users"])}
  return {"meta": meta, "rows": rows_from(by_kind)}


def write(out: str, rows: list[dict], meta: dict) -> None:
  """`<out>.json`, `.md` and `.png` of rows already scored (`rows_from`)."""
  harness.write(EXPERIMENT, out, {"meta": meta, "rows": rows})


def present(payload: dict):
  meta, rows = payload["meta"], payload["rows"]
  tasks = meta["tasks"]
  header = (["adapter", "rank", "experts", "trainable params", "step (ms)"]
            + [f"{t} {evaluation.HEADLINE[t]}" for t in tasks]
            + ["rating MAE", "average"])
  fmt = lambda r, k, f="{:.3f}": f.format(r[k]) if k in r else "-"  # noqa: E731
  cells = [[r["kind"], fmt(r, "rank", "{}"), fmt(r, "experts", "{}"),
            fmt(r, "adapter_parameters", "{:,}"), fmt(r, "step_ms", "{:.1f}")]
           + [fmt(r, f"{t}/{evaluation.HEADLINE[t]}") for t in tasks]
           + [fmt(r, "rating/mae"), fmt(r, "average")] for r in rows]
  lines = ([f"Multi-task adapters, {meta['data']} data, {meta['eval_users']} test "
            "users.", ""] + results_lib.markdown_table(header, cells)
           + ["", standard_error_note(rows, tasks, meta["eval_users"])])
  return lines, plot(rows, tasks, meta)


def plot(rows: list[dict], tasks, meta: dict):
  """Grouped bars: every task's headline metric (and the average) per adapter."""
  metrics = [f"{t}/{evaluation.HEADLINE[t]}" for t in tasks] + ["average"]
  fig, (ax,) = plots.panels(1, width=max(6.0, 1.1 * len(metrics)))
  width = 0.8 / max(len(rows), 1)
  for i, row in enumerate(rows):
    ax.bar([m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))],
           [row.get(k, float("nan")) for k in metrics], width, label=row["kind"])
  ax.set_xticks(range(len(metrics)),
                [k.replace("/", "\n") for k in metrics], fontsize=7)
  ax.set(ylabel="score (higher is better)",
         title=f"multi-task adapters, {meta['data']} data")
  ax.legend(fontsize=7, ncol=2)
  return fig


EXPERIMENT = harness.Experiment(measure, present, config="configs/multitask.py",
                                flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
