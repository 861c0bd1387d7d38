"""LoRA vs MoLoRA vs MoDE (vs MoLoRA-SD) at equal trainable parameters on the
five-task multi-task setup (configs/multitask.py). Writes `<out>.json`, `<out>.md`.

    python -m userllm.adapter_benchmark --data synthetic --out benchmarks/adapters_synthetic
    python -m userllm.adapter_benchmark --data movielens --out benchmarks/adapters_ml100k

Every kind runs the `user_llm` workflow in one shared workdir, so the base LM is
pretrained once and each kind trains its own adapters on the frozen base with
the same examples, steps and learning rate (a kind whose `results_<kind>.json`
is already in the workdir is not rerun; `<kind>+<router>` picks a router).
Rows: each kind; the frozen base with no adapter (scored before the first
kind trains: fresh adapters are no-ops); the prior (each task's answers ranked
by training frequency: item popularity for next title, the majority answer
otherwise). Per task the test
headline metric (next title Recall@10, accuracy otherwise; rating also MAE),
their mean, the adapter's trainable parameters (from the tree; the formula's
count is checked equal) and the train-step time: measured after all kinds have
trained, round-robin over the kinds (so every kind sees the same machine load),
the median of jitted steps (forward, backward, Adam on the adapters) on a
batch of the training shape.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import multitask  # noqa: E402
from userllm import workflow  # noqa: E402

KINDS = ("lora", "molora", "mode", "molora_sd")


def config_for(kind: str, args, first: bool = False):
  """The multitask config of one `--kinds` entry: `<kind>` or
  `<kind>+<router>` (e.g. `mode+token_task`: MoDE with the task router)."""
  config = multitask.get_config()
  config.adapter.kind, _, router = kind.partition("+")
  config.adapter.router = router or config.adapter.router
  config.userllm.eval_base = first
  config.userllm.eval_valid = False  # the table reports test; scoring is slow
  if args.data == "movielens":
    config.data.update(source="movielens", dir=args.data_dir)
  for override in args.set:
    key, value = override.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else (
        value.lower() in ("1", "true"))
  return config


def run_kind(kind: str, args, first: bool) -> dict:
  saved = os.path.join(args.workdir, f"results_{kind}.json")
  if os.path.exists(saved):
    with open(saved) as f:
      results = json.load(f)
    results.pop("config")
    return results
  config = config_for(kind, args, first)
  import main  # writes results.json like every other run
  results = main.run_experiment(config, args.workdir)
  with open(saved + ".tmp", "w") as f:
    json.dump({**results, "config": config.to_dict()}, f, indent=2, sort_keys=True)
  os.replace(saved + ".tmp", saved)
  if results["adapter_parameters"] != results["adapter_parameters_formula"]:
    raise AssertionError(f"{kind}: tree count {results['adapter_parameters']} != "
                         f"formula {results['adapter_parameters_formula']}")
  return results


def step_times(kinds, args, results: dict, rounds: int = 3,
               repeats: int = 5) -> dict[str, float]:
  """{kind: median seconds of one train step}, kinds timed round-robin."""
  import numpy as np
  from flax import linen as nn
  from userllm import user_llm as ul
  from userllm.next_item import make_optimizer
  from infra.train_state import TrainState
  first = results[kinds[0]]
  length, vocab = int(first["llm_sequence_length"]), int(first["vocab_size"])
  rng = np.random.default_rng(0)
  steps = {}
  for kind in kinds:
    config = config_for(kind, args)
    batch_size = config.train.batch_size
    tokens = rng.integers(3, vocab, (batch_size, length)).astype(np.int32)
    target = np.zeros((batch_size, length), bool)
    target[:, -8:] = True
    batch = {"tokens": tokens, "token_mask": np.ones_like(target),
             "target_mask": target,
             "task_ids": (np.arange(batch_size) % 5).astype(np.int32)}
    model = ul.UserLLM(ul.UserLLMConfig(
        encoder=None, integration="text",
        llm=workflow.llm_config(config, vocab, "text_prompt")))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), None, tokens[:1],
                                      target[:1], task_ids=batch["task_ids"][:1]
                                      )["params"])
    mask = ul.trainable_mask(params, "adapters")
    tx = ul.masked_optimizer(make_optimizer(config.train), mask)
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                       opt_state=tx.init(params), rng=jax.random.PRNGKey(1))
    steps[kind] = (functools.partial(ul.lm_loss, model, mask), tx, state,
                   jax.device_put(batch))
  times = {kind: [] for kind in kinds}
  for _ in range(rounds):
    for kind in kinds:
      times[kind].append(workflow.step_seconds(*steps[kind], repeats=repeats))
  return {kind: float(np.median(t)) for kind, t in times.items()}


def rows_from(results: dict[str, dict], tasks) -> list[dict]:
  """One row per kind, then `base` and `prior`, with the test metrics."""
  def metrics(r, prefix):  # "test/" must not catch the prior's "test/prior/"
    return {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)
            and (prefix == "test/prior/" or not k.startswith("test/prior/"))}
  rows = []
  for kind, r in results.items():
    rows.append({"kind": kind, "rank": int(r["adapter_rank"]),
                 "experts": int(r["adapter_experts"]),
                 "adapter_parameters": int(r["adapter_parameters"]),
                 "step_ms": 1e3 * r["train_step_seconds"],
                 **metrics(r, "test/")})
  first = next(iter(results.values()))
  rows.append({"kind": "base (no adapter)", **metrics(first, "base/test/")})
  rows.append({"kind": "prior", **metrics(first, "test/prior/")})
  return rows


def standard_error_note(rows: list[dict], tasks, users: int) -> str:
  """The largest binomial standard error sqrt(p (1 - p) / n) of the table's
  rates: a difference smaller than about twice it is within noise."""
  rates = [r[f"{t}/{workflow.HEADLINE[t]}"] for r in rows for t in tasks
           if f"{t}/{workflow.HEADLINE[t]}" in r]
  worst = max(rates, key=lambda p: p * (1 - p))
  error = (worst * (1 - worst) / users) ** 0.5
  return (f"One binomial standard error over {users} users is at most "
          f"{error:.3f} (at rate {worst:.3f}); gaps under about "
          f"{2 * error:.3f} are within noise.")


def write(out: str, rows: list[dict], meta: dict) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json.tmp", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=2)
  os.replace(out + ".json.tmp", out + ".json")
  tasks = meta["tasks"]
  header = [f"{t} {workflow.HEADLINE[t]}" for t in tasks]
  lines = [f"Multi-task adapters, {meta['data']} data, {meta['eval_users']} test "
           f"users, on {meta['device']} (jax {meta['jax']}). Command: "
           f"`{meta['command']}`.", "",
           "| adapter | rank | experts | trainable params | step (ms) | "
           + " | ".join(header) + " | rating MAE | average |",
           "|---" * (7 + len(tasks)) + "|"]
  fmt = lambda r, k, f="{:.3f}": f.format(r[k]) if k in r else "-"  # noqa: E731
  for r in rows:
    cells = [r["kind"], fmt(r, "rank", "{}"), fmt(r, "experts", "{}"),
             fmt(r, "adapter_parameters", "{:,}"), fmt(r, "step_ms", "{:.1f}")]
    cells += [fmt(r, f"{t}/{workflow.HEADLINE[t]}") for t in tasks]
    cells += [fmt(r, "rating/mae"), fmt(r, "average")]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", standard_error_note(rows, tasks, meta["eval_users"])]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", choices=("synthetic", "movielens"), default="synthetic")
  parser.add_argument("--data_dir", default="../shared/data/movielens-100k")
  parser.add_argument("--out", required=True)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--kinds", default=",".join(KINDS),
                      help="comma-separated kinds, each <kind> or <kind>+<router>")
  parser.add_argument("--set", action="append", default=[],
                      help="config override a.b=value (repeatable)")
  args = parser.parse_args(argv)
  args.workdir = args.workdir or os.path.join("runs", os.path.basename(args.out))
  kinds = [k for k in args.kinds.split(",") if k]
  results = {}
  for i, kind in enumerate(kinds):
    results[kind] = run_kind(kind, args, first=i == 0)
  for kind, seconds in step_times(kinds, args, results).items():
    results[kind]["train_step_seconds"] = seconds
  tasks = multitask.get_config().userllm.tasks
  meta = {"data": args.data, "device": f"{jax.devices()[0].platform} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
          "jax": jax.__version__, "tasks": list(tasks),
          "eval_users": int(next(iter(results.values()))["eval_users"]),
          "command": "python -m userllm.adapter_benchmark " + " ".join(
              sys.argv[1:] if argv is None else argv)}
  write(args.out, rows_from(results, tasks), meta)
  print(open(args.out + ".md").read())


if __name__ == "__main__":
  main()
