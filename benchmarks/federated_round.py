"""Round throughput and memory: the vmapped round (whole cohort, or in chunks)
vs a Python loop over clients, against the machine's measured matmul peak.

  python -m benchmarks.federated_round --out benchmarks/federated_round

Both rounds train the foundation's next-item transformer (a small config) with
the same client update, aggregation and server step (`federated/algorithms.py`);
they differ only in how clients are mapped: one jitted `vmap` over the cohort,
or a Python loop calling the jitted single-client update once per client, as
frameworks that simulate clients one at a time do; `chunkN` is the vmapped
round trained N clients at a time (`config.federated.client_chunk`, lax.map
over vmapped chunks). Each (mode, clients) cell runs in a fresh process so its
peak RSS is its own. FLOPs per round are XLA's cost analysis of the compiled
round; the peak is a float32 GEMM microbenchmark in the same run, so "% of
peak" says how far the round is from what this CPU's matmul reaches. Writes
`<out>.json`, `<out>.md` and `<out>.png`. A throughput microbenchmark of one round at fixed model sizes, so
it takes no experiment config: the sizes below are the experiment.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time

from absl import app, flags

_OUT = flags.DEFINE_string("out", "benchmarks/federated_round",
                           "Path prefix of the .json and .md outputs.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per cell.")
_CELL = flags.DEFINE_string("cell", "", "Internal: size:mode:clients, one cell in "
                            "this process.")

MODES = ("vmapped", "chunk8", "chunk32", "looped")
COHORTS = (16, 64, 256, 1024)
# Two sizes of the next-item transformer: "small" is compute-bound per client on
# CPU, "tiny" (a few thousand parameters) shows the per-client dispatch overhead.
SIZES = {
    "small": dict(model=dict(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=128),
                  num_items=1000, max_len=20, examples=8, batch=4),
    "tiny": dict(model=dict(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32),
                 num_items=100, max_len=10, examples=4, batch=2),
}


def _setup(size: str, num_clients: int, seed: int = 0):
  """(state, cohort, example_loss, client, server) for the benchmark model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import linen as nn
  from federated import algorithms
  from userllm import sequence_model as sm

  spec = SIZES[size]
  num_items, max_len, examples = spec["num_items"], spec["max_len"], spec["examples"]
  cfg = sm.SequenceModelConfig(vocab_size=num_items + 1, max_len=max_len,
                               dropout=0.0, **spec["model"])
  model = sm.ItemSequenceTransformer(cfg)
  params = jax.jit(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(seed), jnp.zeros((1, max_len), jnp.int32))["params"]))()
  client = algorithms.ClientSpec(optax.sgd(0.1), local_epochs=1,
                                 batch_size=spec["batch"])
  server = algorithms.ServerSpec(optax.adam(1e-2))
  state = algorithms.init_server_state(params, client, server,
                                      jax.random.PRNGKey(seed), num_clients)
  rng = np.random.default_rng(seed)
  cohort = {
      "examples": jnp.asarray(rng.integers(
          1, num_items + 1, (num_clients, examples, max_len + 1)), jnp.int32),
      "num_examples": jnp.full((num_clients,), examples, jnp.int32),
      "client_ids": jnp.arange(num_clients, dtype=jnp.int32),
      "client_rows": jnp.arange(num_clients, dtype=jnp.int32)}
  example_loss = functools.partial(sm.next_item_example_losses, model)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  return state, cohort, example_loss, client, server, num_params


def measure_cell(size: str, mode: str, num_clients: int, rounds: int) -> dict:
  """Times `rounds` rounds after one warm-up (compile) round, in this process."""
  import jax
  from federated import algorithms

  state, cohort, example_loss, client, server, num_params = _setup(size,
                                                                   num_clients)
  flops = float("nan")
  if mode != "looped":
    chunk = int(mode[len("chunk"):]) if mode.startswith("chunk") else 0
    round_fn = jax.jit(algorithms.make_round(example_loss, client, server,
                                             client_chunk=min(chunk, num_clients)))
    compiled = round_fn.lower(state, cohort).compile()
    xla_temp = compiled.memory_analysis().temp_size_in_bytes
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get(
        "flops", float("nan")))
  else:
    round_fn = algorithms.make_looped_round(example_loss, client, server)
    one = jax.jit(algorithms.make_client_update(example_loss, client))
    compiled = one.lower(state.params, (), cohort["examples"][0],
                         cohort["num_examples"][0], state.rng).compile()
    xla_temp = compiled.memory_analysis().temp_size_in_bytes
  began = time.perf_counter()
  state, metrics = round_fn(state, cohort)
  jax.block_until_ready((state, metrics))
  first_round = time.perf_counter() - began
  began = time.perf_counter()
  for _ in range(rounds):
    state, metrics = round_fn(state, cohort)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - began) / rounds
  return {"size": size, "mode": mode, "clients": num_clients, "rounds_timed": rounds,
          "round_seconds": seconds, "clients_per_second": num_clients / seconds,
          "first_round_seconds": first_round,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "xla_temp_mib": xla_temp / 2**20, "num_params": num_params,
          "round_flops": flops, "gflops_per_second": flops / seconds / 1e9,
          "client_loss": float(metrics["client_loss"])}


def gemm_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
  """float32 GFLOP/s of a jitted n x n matmul on this machine (the best of
  `repeats` timed calls after a warm-up)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    began = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - began)
  return 2 * n ** 3 / best / 1e9


def _markdown(cells: list[dict], header: dict) -> str:
  by_key = {(c["size"], c["mode"], c["clients"]): c for c in cells}
  lines = [
      f"Federated round throughput on {header['device']} "
      f"({header['cpu_count']} CPU cores), jax {header['jax']}. Command: "
      f"`{header['command']}`. Measured float32 matmul peak (1024 x 1024, "
      f"jitted): {header['gemm_gflops']:.1f} GFLOP/s.", ""]
  for size, spec in SIZES.items():
    model = spec["model"]
    params = next(c["num_params"] for c in cells if c["size"] == size)
    lines += [
        f"**{size}** model: next-item transformer, {params:,} parameters (width "
        f"{model['embed_dim']}, {model['num_layers']} layer, {spec['num_items']} "
        f"items, length {spec['max_len']}); each client {spec['examples']} "
        f"examples, batch {spec['batch']}, 1 local epoch "
        f"({-(-spec['examples'] // spec['batch'])} local steps).", "",
        "| clients / round | " + " | ".join(f"{m} clients/s" for m in MODES)
        + " | best vmapped / looped | vmapped GFLOP/s (% of peak) | "
        "vmapped peak RSS (MiB) | looped peak RSS (MiB) | vmapped XLA temp (MiB) "
        "| chunk8 XLA temp (MiB) |",
        "|---" * (len(MODES) + 7) + "|"]
    for n in COHORTS:
      row = {m: by_key[(size, m, n)] for m in MODES}
      best = max(row[m]["clients_per_second"] for m in MODES if m != "looped")
      v = row["vmapped"]
      lines.append(
          f"| {n} | " + " | ".join(f"{row[m]['clients_per_second']:.0f}" for m in MODES)
          + f" | {best / row['looped']['clients_per_second']:.1f}x | "
          f"{v['gflops_per_second']:.2f} "
          f"({100 * v['gflops_per_second'] / header['gemm_gflops']:.0f}%) | "
          f"{v['peak_rss_mib']:.0f} | {row['looped']['peak_rss_mib']:.0f} | "
          f"{v['xla_temp_mib']:.1f} | {row['chunk8']['xla_temp_mib']:.1f} |")
    lines.append("")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  if _CELL.value:
    size, mode, clients = _CELL.value.split(":")
    print(json.dumps(measure_cell(size, mode, int(clients), _ROUNDS.value)))
    return
  cells = []
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for size, n, mode in itertools.product(SIZES, COHORTS, MODES):
    out = subprocess.run([sys.executable, "-m", "benchmarks.federated_round",
                          f"--cell={size}:{mode}:{n}", f"--rounds={_ROUNDS.value}"],
                         capture_output=True, text=True, check=True, cwd=repo)
    cell = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{size:5s} {mode:8s} {n:4d} clients: {cell['clients_per_second']:8.1f} "
          f"clients/s, peak RSS {cell['peak_rss_mib']:.0f} MiB", flush=True)
    cells.append(cell)
  import jax
  from infra import results as results_lib
  header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "gemm_gflops": gemm_peak_gflops(),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "command": "python -m benchmarks.federated_round --out " + _OUT.value}
  markdown = _markdown(cells, header)
  results_lib.write_report(_OUT.value, {**header, "cells": cells},
                           markdown.splitlines())
  plot(_OUT.value, cells)
  print(markdown)


def plot(out: str, cells: list[dict]) -> None:
  from benchmarks import report
  fig, axes = report.figure(len(SIZES))
  for ax, size in zip(axes, SIZES):
    for mode in MODES:
      rows = sorted((c for c in cells if c["size"] == size and c["mode"] == mode),
                    key=lambda c: c["clients"])
      ax.plot([c["clients"] for c in rows], [c["clients_per_second"] for c in rows],
              "o-", label=mode)
    ax.set(xscale="log", yscale="log", xlabel="clients per round",
           ylabel="clients / s", title=f"{size} model")
    ax.legend(fontsize=8)
  report.save(fig, out)


if __name__ == "__main__":
  app.run(main)
