"""Round throughput and memory: the vmapped round (whole cohort, or in chunks)
vs a Python loop over clients and vs Flower, against the machine's measured
matmul peak and memory bandwidth.

  python -m benchmarks.federated.federated_round \
      --out benchmarks/results/federated_round --flower_python=.venv-flower/bin/python

All modes train the foundation's next-item transformer (two small sizes) with
the same jitted client update and FedAvg (server SGD at learning rate 1 on the
mean delta, i.e. the clients' mean parameters); they differ only in how clients
are mapped: `vmapped` is one jitted `vmap` over the cohort; `chunkN` the same
trained N clients at a time (`config.federated.client_chunk`, lax.map over
vmapped chunks); `percore` the host split into one CPU device per core
and the cohort sharded over them, each device training its own chunk
(client_chunk auto: 8 in flight in all); `looped` a Python loop calling the jitted single-client update
once per client, as simulators that loop over clients do; `flower` Flower's
simulation engine running that update in Ray actors (benchmarks/federated/flower_peer.py,
its own environment: requirements-peers.txt; left out without
--flower_python). Each (mode, clients) cell runs in a fresh process, so its
peak RSS is its own, times 5 rounds after a compile round, and saves its final
server model; every mode's is compared with the vmapped one's.

FLOPs per client come from XLA's cost analysis of one local step (the round's
loops cannot be costed whole, see `client_cost`), checked against an analytic
count. The peak is a float32 GEMM and the bandwidth a jitted axpy, measured in
the same run. A throughput microbenchmark at fixed model sizes, so it takes
no experiment config; no setting is chosen.
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

from benchmarks import harness
from infra import results

# no jax, flax or matplotlib at import: flower_peer (in Flower's environment)
# imports `setup` from here, and a `percore` cell sets JAX_NUM_CPU_DEVICES
# before jax starts
FLAGS = (
    harness.Flag("rounds", 5, "Timed rounds per cell."),
    harness.Flag("cohorts", ["16", "64", "256", "1024"], "Clients per round, one "
                 "row each."),
    harness.Flag("flower_python", "", "Python of the environment made from "
                 "requirements-peers.txt; when set, every (size, clients) also runs "
                 "in Flower (benchmarks/federated/flower_peer.py) and its server "
                 "model is checked against ours."),
)
# a cell's process: size, mode, clients, rounds, where to save its parameters
_CELL = """
import sys
from benchmarks.federated import federated_round
federated_round.cell(*sys.argv[1:])
"""

MODES = ("vmapped", "chunk8", "chunk32", "percore", "looped")
DEFAULT_MODE = "chunk8"  # what client_chunk=-1 (auto) picks on one CPU device
# the host split into one CPU device per core (JAX_NUM_CPU_DEVICES=$(nproc)),
# the cohort sharded over them, client_chunk auto (8 clients in flight in all)
BEST_MODE = "percore"
OURS = (DEFAULT_MODE, BEST_MODE)  # the modes the ratio and roofline columns show
# Two sizes of the next-item transformer: "small" is compute-bound per client on
# CPU, "tiny" (a few thousand parameters) shows the per-client dispatch overhead.
SIZES = {
    "small": dict(model=dict(embed_dim=32, num_layers=1, num_heads=2, mlp_dim=128),
                  num_items=1000, max_len=20, examples=8, batch=4),
    "tiny": dict(model=dict(embed_dim=16, num_layers=1, num_heads=2, mlp_dim=32),
                 num_items=100, max_len=10, examples=4, batch=2),
}


def setup(size: str, num_clients: int, seed: int = 0):
  """(state, cohort, example_loss, client, server) for the benchmark model."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import linen as nn
  from federated import algorithms
  from userllm.models import sequence_model as sm

  spec = SIZES[size]
  num_items, max_len, examples = spec["num_items"], spec["max_len"], spec["examples"]
  cfg = sm.SequenceModelConfig(vocab_size=num_items + 1, max_len=max_len,
                               dropout=0.0, **spec["model"])
  model = sm.ItemSequenceTransformer(cfg)
  params = jax.jit(lambda: nn.meta.unbox(model.init(
      jax.random.PRNGKey(seed), jnp.zeros((1, max_len), jnp.int32))["params"]))()
  client = algorithms.ClientSpec(optax.sgd(0.1), local_epochs=1,
                                 batch_size=spec["batch"])
  server = algorithms.ServerSpec(optax.sgd(1.0))  # FedAvg, as Flower's
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


def measure_cell(size: str, mode: str, num_clients: int, rounds: int,
                 params_out: str = "") -> dict:
  """Times `rounds` rounds after one warm-up (compile) round, in this process;
  saves the final server parameters (leaves in tree order) to `params_out`."""
  import jax
  import numpy as np
  from federated import algorithms

  state, cohort, example_loss, client, server, num_params = setup(size,
                                                                   num_clients)
  if mode == "percore":
    round_fn, state, cohort = _per_core_round(example_loss, client, server, state,
                                              cohort)
    compiled = round_fn.lower(state, cohort).compile()
  elif mode != "looped":
    chunk = int(mode[len("chunk"):]) if mode.startswith("chunk") else 0
    round_fn = jax.jit(algorithms.make_round(example_loss, client, server,
                                             client_chunk=min(chunk, num_clients)))
    compiled = round_fn.lower(state, cohort).compile()
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
  if params_out:
    np.savez(params_out, *[np.asarray(x) for x in jax.tree.leaves(state.params)])
  return {"size": size, "mode": mode, "clients": num_clients, "rounds_timed": rounds,
          "round_seconds": seconds, "clients_per_second": num_clients / seconds,
          "first_round_seconds": first_round,
          "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "xla_temp_mib": xla_temp / 2**20, "num_params": num_params,
          "client_loss": float(metrics["client_loss"])}


def _per_core_round(example_loss, client, server, state, cohort):
  """(round_fn, state, cohort) as the federated workflow runs them on a mesh
  of this process's CPU devices (one per core, see main's --cell): state
  replicated, the cohort split over `data`, client_chunk auto."""
  import jax
  import ml_collections
  from jax.sharding import NamedSharding, PartitionSpec as P
  from federated import algorithms, workflow
  from infra import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))
  replicated, split = NamedSharding(mesh, P()), mesh_lib.batch_sharding(mesh)
  round_fn = jax.jit(algorithms.make_round(
      example_loss, client, server,
      client_chunk=workflow.resolve_client_chunk(-1, mesh),
      client_shards=mesh.shape["data"]),
      in_shardings=(replicated, split), out_shardings=(replicated, None))
  return round_fn, jax.device_put(state, replicated), jax.device_put(cohort, split)


def _xla_cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def client_cost(size: str) -> dict:
  """FLOPs and bytes of one client's round: its local steps x one step's.

  XLA's cost analysis counts a while loop's body once (not times its trip
  count), so the compiled round, whose local steps and chunks are loops, cannot
  be costed whole; one local step (value_and_grad of the batch loss, no loop)
  can. The analytic count of the same step checks it: 3x the forward pass's
  matmul FLOPs (forward, and backward's two matmuls per forward one), per
  layer 8 L d^2 (q, k, v, out) + 4 L^2 d (scores, weighted values) + 4 L d m
  (MLP), plus 2 L d V for the item logits, over `batch` windows of L = max_len.
  """
  import jax
  import jax.numpy as jnp
  state, cohort, example_loss, client, _, _ = setup(size, 1)
  spec, model = SIZES[size], SIZES[size]["model"]
  batch = cohort["examples"][0][:spec["batch"]]
  step = jax.jit(jax.value_and_grad(
      lambda p: jnp.mean(example_loss(p, batch, jax.random.PRNGKey(0)))))
  cost = _xla_cost(step.lower(state.params).compile())
  steps = -(-spec["examples"] // spec["batch"])
  length, d, m = spec["max_len"], model["embed_dim"], model["mlp_dim"]
  vocab = state.params["item_embed"]["embedding"].shape[0]
  forward = spec["batch"] * (model["num_layers"] * (
      8 * length * d * d + 4 * length * length * d + 4 * length * d * m)
                             + 2 * length * d * vocab)
  return {"steps": steps, "xla_flops": steps * float(cost["flops"]),
          "xla_bytes": steps * float(cost["bytes accessed"]),
          "analytic_flops": steps * 3 * forward}


def shared_step_ceiling(size: str, windows=(32, 128, 512), repeats: int = 50) -> dict:
  """The model's own training step with ONE set of parameters over a large
  batch (the round's examples pooled), on one device: what the round's
  FLOPs cost at their most efficient batching, as if its clients shared
  weights. Best over `windows` batch sizes:
  {"clients_per_second": client-equivalents (a client's local steps x its
  batch per window), "gflops_per_second" (XLA's FLOPs of the step)}."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  state, _, example_loss, _, _, _ = setup(size, 1)
  spec = SIZES[size]
  steps = -(-spec["examples"] // spec["batch"])
  best = {"clients_per_second": 0.0}
  for n in windows:
    batch = jnp.asarray(np.random.default_rng(n).integers(
        1, spec["num_items"] + 1, (n, spec["max_len"] + 1)), jnp.int32)
    step = jax.jit(lambda p, b: jax.tree.map(
        lambda w, g: w - 0.1 * g, p, jax.grad(lambda q: jnp.mean(
            example_loss(q, b, jax.random.PRNGKey(0))))(p)))
    flops = float(_xla_cost(step.lower(state.params, batch).compile())["flops"])
    seconds = _best_seconds(lambda p: step(p, batch)["item_embed"]["embedding"],
                            state.params, repeats)
    clients = n / spec["batch"] / steps / seconds
    if clients > best["clients_per_second"]:
      best = {"clients_per_second": clients, "windows": n,
              "gflops_per_second": flops / seconds / 1e9}
  return best


def matmul_shape_gflops(size: str, chunk: int = 8, repeats: int = 200) -> float:
  """GFLOP/s of the round's largest matmul at its own shape: a chunk of
  clients' item logits, [chunk, batch x length, width] x [chunk, width, items]
  (small, batched: XLA runs it on one core, below the square GEMM's peak)."""
  import jax
  import jax.numpy as jnp
  spec = SIZES[size]
  m, k, n = spec["batch"] * spec["max_len"], spec["model"]["embed_dim"], spec["num_items"]
  a = jax.random.normal(jax.random.PRNGKey(0), (chunk, m, k), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (chunk, k, n), jnp.float32)
  matmul = jax.jit(lambda x: jnp.einsum("cmk,ckn->cmn", x, b))
  return 2 * chunk * m * k * n / _best_seconds(matmul, a, repeats) / 1e9


def gemm_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
  """float32 GFLOP/s of a jitted n x n matmul on this machine (the best of
  `repeats` timed calls after a warm-up)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  return 2 * n ** 3 / _best_seconds(jax.jit(lambda x: x @ x), a, repeats) / 1e9


def _best_seconds(fn, x, repeats: int) -> float:
  """The fastest of `repeats` timed calls of fn(x), after one warm-up call."""
  fn(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    began = time.perf_counter()
    fn(x).block_until_ready()
    best = min(best, time.perf_counter() - began)
  return best


def markdown(payload: dict) -> list[str]:
  cells, modes, cohorts = payload["cells"], payload["modes"], payload["cohorts"]
  by_key = {(c["size"], c["mode"], c["clients"]): c for c in cells}
  flower = "flower" in modes
  lines = [
      f"Federated round throughput on {payload['cpu_count']} CPU cores. Measured "
      f"in the same run: float32 matmul peak (1024 x 1024, jitted) "
      f"{payload['gemm_gflops']:.1f} GFLOP/s; memory bandwidth (jitted 0.5x + "
      f"0.25, in place) {payload['cache_stream_gbs']:.1f} GB/s over 8 MiB "
      f"(cache-resident), {payload['stream_gbs']:.1f} GB/s over 256 MiB (DRAM). "
      f"`{DEFAULT_MODE}` is the default on one CPU device (client_chunk auto); "
      f"`{BEST_MODE}` splits the host into {payload['cpu_count']} CPU devices "
      "(JAX_NUM_CPU_DEVICES) and shards the cohort over them, each device "
      "training its share of the 8 clients in flight; the ratio and roofline "
      f"columns show both, {DEFAULT_MODE} first. GFLOP/s = "
      "clients x a client's FLOPs (XLA's cost analysis of one local step x its "
      "steps) / round time; roofline = min(peak, bandwidth x the step's FLOPs / "
      "bytes accessed).", ""]
  ours_names = ", ".join(OURS)
  ratios = ["looped"] + (["flower"] if flower else [])
  header = (["clients / round"] + [f"{m} clients/s" for m in modes]
            + [f"{ours_names} / {r}" for r in ratios]
            + [f"{ours_names} GFLOP/s", "% of peak", "% of cache roofline",
               "% of DRAM roofline", f"peak RSS MiB ({', '.join(modes)})",
               "vmapped / chunk8 XLA temp (MiB)"]
            + (["max abs(Flower - vmapped) params"] if flower else [])
            + [f"{ours_names} % of the shared-parameter step"])
  for size, spec in SIZES.items():
    model = spec["model"]
    params = next(c["num_params"] for c in cells if c["size"] == size)
    cost, roof = payload["client_cost"][size], payload["roofline_gflops"][size]
    shared = payload["shared_step"][size]
    lines += [
        f"**{size}** model: next-item transformer, {params:,} parameters (width "
        f"{model['embed_dim']}, {model['num_layers']} layer, {spec['num_items']} "
        f"items, length {spec['max_len']}); each client {spec['examples']} "
        f"examples, batch {spec['batch']}, 1 local epoch "
        f"({-(-spec['examples'] // spec['batch'])} local steps). FLOPs per "
        f"client: {cost['xla_flops'] / 1e6:.2f} M (XLA), "
        f"{cost['analytic_flops'] / 1e6:.2f} M (analytic matmuls); "
        f"{cost['xla_flops'] / cost['xla_bytes']:.2f} FLOP / byte; roofline "
        f"{roof['cache_stream_gbs']:.0f} GFLOP/s from cache, "
        f"{roof['stream_gbs']:.0f} from DRAM. Its largest matmul at the "
        f"round's own shape (a chunk of 8 clients' item logits) runs at "
        f"{payload['matmul_shape_gflops'][size]:.0f} GFLOP/s; its training step "
        f"with one set of parameters over a pooled batch of {shared['windows']} "
        f"windows on one device (what the round would cost if its clients shared "
        f"weights) at {shared['clients_per_second']:.0f} clients/s "
        f"({shared['gflops_per_second']:.0f} GFLOP/s); the last column is the "
        "round's share of that.", ""]
    rows = []
    for n in cohorts:
      row = {m: by_key[(size, m, n)] for m in modes}
      ours = [row[m] for m in OURS]
      both = lambda f: ", ".join(f(c) for c in ours)  # noqa: E731
      gflops = lambda c: c["gflops_per_second"]  # noqa: E731
      rows.append(
          [n] + [f"{row[m]['clients_per_second']:.0f}" for m in modes]
          + [both(lambda c, r=r: f"{c['clients_per_second'] / row[r]['clients_per_second']:.1f}x")
             for r in ratios]
          + [both(lambda c: f"{gflops(c):.1f}"),
             both(lambda c: f"{100 * gflops(c) / payload['gemm_gflops']:.0f}%"),
             both(lambda c: f"{100 * gflops(c) / roof['cache_stream_gbs']:.0f}%"),
             both(lambda c: f"{100 * gflops(c) / roof['stream_gbs']:.0f}%"),
             " / ".join(f"{row[m]['peak_rss_mib']:.0f}" for m in modes),
             f"{row['vmapped']['xla_temp_mib']:.1f} / {row['chunk8']['xla_temp_mib']:.1f}"]
          + ([f"{row['flower']['max_param_diff_vs_vmapped']:.1e}"] if flower else [])
          + [both(lambda c: f"{100 * c['clients_per_second'] / shared['clients_per_second']:.0f}%")])
    lines += results.markdown_table(header, rows) + [""]
  return lines


def stream_bandwidth_gbs(mib: int = 256, repeats: int = 10) -> float:
  """GB/s of a jitted `0.5 x + 0.25` over a float32 array of `mib` MiB (read +
  write), in place (the input donated, as a STREAM kernel writes an existing
  array: a fresh output buffer per call would time page faults too), the best
  of `repeats` timed calls: the memory side of the roofline."""
  import jax
  import jax.numpy as jnp
  axpy = jax.jit(lambda v: 0.5 * v + 0.25, donate_argnums=0)
  state = {"x": jnp.ones((mib * 2**20 // 4,), jnp.float32)}

  def step(_):  # keeps the donated result as the next call's input
    state["x"] = axpy(state["x"])
    return state["x"]
  return 2 * state["x"].size * 4 / _best_seconds(step, None, repeats) / 1e9


def _max_param_difference(a_path: str, b_path: str) -> float:
  """max |a - b| over every parameter of two saved server models."""
  import numpy as np
  with np.load(a_path) as a, np.load(b_path) as b:
    if sorted(a.files) != sorted(b.files):
      raise ValueError(f"{a_path} and {b_path} hold different parameter lists")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


def cell(size: str, mode: str, clients: str, rounds: str, params_out: str) -> None:
  """One (size, mode, clients) cell in this process (a fresh one, so its peak
  RSS is its own): prints its measurements as one JSON line."""
  if mode == "percore":  # before jax starts: one CPU device per core
    os.environ["JAX_NUM_CPU_DEVICES"] = str(os.cpu_count())
  print(json.dumps(measure_cell(size, mode, int(clients), int(rounds), params_out)))


def _run_cell(size: str, mode: str, n: int, rounds: int, params_out: str,
              flower_python: str) -> dict:
  """One cell in a fresh process."""
  if mode == "flower":
    command = [flower_python, "-m", "benchmarks.federated.flower_peer",
               f"--size={size}", f"--clients={n}", f"--rounds={rounds}",
               f"--params_out={params_out}"]
  else:
    command = [sys.executable, "-c", _CELL, size, mode, str(n), str(rounds), params_out]
  env = {**os.environ, "PYTHONPATH": harness.REPO}
  out = subprocess.run(command, capture_output=True, text=True, cwd=harness.REPO,
                       env=env)
  if out.returncode:
    raise RuntimeError(f"{size}/{mode}/{n} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def measure(run: harness.Run) -> dict:
  import tempfile
  cohorts = [int(n) for n in run.args.cohorts]
  modes = MODES + (("flower",) if run.args.flower_python else ())
  cells = []
  with tempfile.TemporaryDirectory() as scratch:
    for size, n in itertools.product(SIZES, cohorts):
      for mode in modes:
        saved = os.path.join(scratch, f"{size}-{n}-{mode}.npz")
        cell_row = _run_cell(size, mode, n, run.args.rounds, saved,
                             run.args.flower_python)
        if mode != "vmapped":
          cell_row["max_param_diff_vs_vmapped"] = _max_param_difference(
              saved, os.path.join(scratch, f"{size}-{n}-vmapped.npz"))
        print(f"{size:5s} {mode:8s} {n:4d} clients: "
              f"{cell_row['clients_per_second']:8.1f} clients/s, peak RSS "
              f"{cell_row['peak_rss_mib']:.0f} MiB, max |params - vmapped| "
              f"{cell_row.get('max_param_diff_vs_vmapped', 0.0):.1e}", flush=True)
        cells.append(cell_row)
  machine = {"gemm_gflops": gemm_peak_gflops(), "stream_gbs": stream_bandwidth_gbs(256),
             "cache_stream_gbs": stream_bandwidth_gbs(8, repeats=50)}
  client_costs = {size: client_cost(size) for size in SIZES}
  for c in cells:
    c["gflops_per_second"] = (c["clients"] * client_costs[c["size"]]["xla_flops"]
                              / c["round_seconds"] / 1e9)
  return {**machine, "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "modes": list(modes), "cohorts": cohorts, "client_cost": client_costs,
          "shared_step": {size: shared_step_ceiling(size) for size in SIZES},
          "matmul_shape_gflops": {size: matmul_shape_gflops(size) for size in SIZES},
          "roofline_gflops": {
              size: {memory: roofline_gflops(cost, machine, machine[memory])
                     for memory in ("cache_stream_gbs", "stream_gbs")}
              for size, cost in client_costs.items()},
          "cells": cells}


def roofline_gflops(cost: dict, machine: dict, bandwidth_gbs: float) -> float:
  """A client step's attainable GFLOP/s: min(matmul peak, bandwidth x its
  arithmetic intensity, XLA's FLOPs over its bytes accessed)."""
  return min(machine["gemm_gflops"],
             bandwidth_gbs * cost["xla_flops"] / cost["xla_bytes"])


def present(payload: dict):
  return markdown(payload), plot(payload["cells"], payload["modes"])


def plot(cells: list[dict], modes=MODES):
  from benchmarks import plots
  fig, axes = plots.panels(len(SIZES))
  for ax, size in zip(axes, SIZES):
    for mode in modes:
      rows = sorted((c for c in cells if c["size"] == size and c["mode"] == mode),
                    key=lambda c: c["clients"])
      ax.plot([c["clients"] for c in rows], [c["clients_per_second"] for c in rows],
              "o-", label=mode)
    ax.set(xscale="log", yscale="log", xlabel="clients per round",
           ylabel="clients / s", title=f"{size} model")
    ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
