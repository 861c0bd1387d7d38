"""Round throughput and memory: the vmapped round (whole cohort, or in chunks)
vs a Python loop over clients and vs Flower, against the machine's measured
matmul peak and memory bandwidth.

  python -m benchmarks.federated_round --out benchmarks/federated_round \
      --flower_python=.venv-flower/bin/python

All modes train the foundation's next-item transformer (two small sizes) with
the same jitted client update and FedAvg (server SGD at learning rate 1 on the
mean delta, i.e. the clients' mean parameters); they differ only in how clients
are mapped: `vmapped` is one jitted `vmap` over the cohort; `chunkN` the same
trained N clients at a time (`config.federated.client_chunk`, lax.map over
vmapped chunks); `percore` the host split into one CPU device per core
and the cohort sharded over them, each device training its own chunk
(client_chunk auto: 8 in flight in all); `looped` a Python loop calling the jitted single-client update
once per client, as simulators that loop over clients do; `flower` Flower's
simulation engine running that update in Ray actors (benchmarks/flower_peer.py,
its own environment: requirements-peers.txt; left out without
--flower_python). Each (mode, clients) cell runs in a fresh process, so its
peak RSS is its own, times 5 rounds after a compile round, and saves its final
server model; every mode's is compared with the vmapped one's.

FLOPs per client come from XLA's cost analysis of one local step (the round's
loops cannot be costed whole, see `client_cost`), checked against an analytic
count. The peak is a float32 GEMM and the bandwidth a jitted axpy, measured in
the same run. Writes `<out>.json`, `<out>.md` and `<out>.png`. A throughput
microbenchmark at fixed model sizes, so it takes no experiment config.
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
_COHORTS = flags.DEFINE_list("cohorts", ["16", "64", "256", "1024"],
                             "Clients per round, one row each.")
_CELL = flags.DEFINE_string("cell", "", "Internal: size:mode:clients, one cell in "
                            "this process.")
_PARAMS_OUT = flags.DEFINE_string("params_out", "", "Internal: where a cell saves "
                                  "its final server parameters (.npz).")
_FLOWER_PYTHON = flags.DEFINE_string(
    "flower_python", "", "Python of the environment made from "
    "requirements-peers.txt; when set, every (size, clients) also runs in Flower "
    "(benchmarks/flower_peer.py) and its server model is checked against ours.")

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


def _markdown(cells: list[dict], header: dict) -> str:
  by_key = {(c["size"], c["mode"], c["clients"]): c for c in cells}
  modes = header["modes"]
  flower = "flower" in modes
  lines = [
      f"Federated round throughput on {header['device']} "
      f"({header['cpu_count']} CPU cores), jax {header['jax']}. Command: "
      f"`{header['command']}`. Measured in the same run: float32 matmul peak "
      f"(1024 x 1024, jitted) {header['gemm_gflops']:.1f} GFLOP/s; memory "
      f"bandwidth (jitted 0.5x + 0.25, in place) {header['cache_stream_gbs']:.1f} GB/s over 8 MiB "
      f"(cache-resident), {header['stream_gbs']:.1f} GB/s over 256 MiB (DRAM). "
      f"`{DEFAULT_MODE}` is the default on one CPU device (client_chunk auto); "
      f"`{BEST_MODE}` splits the host into {header['cpu_count']} CPU devices "
      "(JAX_NUM_CPU_DEVICES) and shards the cohort over them, each device "
      "training its share of the 8 clients in flight; the ratio and roofline "
      f"columns show both, {DEFAULT_MODE} first. GFLOP/s = "
      "clients x a client's FLOPs (XLA's cost analysis of one local step x its "
      "steps) / round time; roofline = min(peak, bandwidth x the step's FLOPs / "
      "bytes accessed).", ""]
  for size, spec in SIZES.items():
    model = spec["model"]
    params = next(c["num_params"] for c in cells if c["size"] == size)
    cost, roof = header["client_cost"][size], header["roofline_gflops"][size]
    ratios = ["looped"] + (["flower"] if flower else [])
    ours_names = ", ".join(OURS)
    shared = header["shared_step"][size]["clients_per_second"]
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
        f"{header['matmul_shape_gflops'][size]:.0f} GFLOP/s; its training step "
        f"with one set of parameters over a pooled batch of "
        f"{header['shared_step'][size]['windows']} windows on one device (what "
        f"the round would cost if its clients shared weights) at "
        f"{header['shared_step'][size]['clients_per_second']:.0f} clients/s "
        f"({header['shared_step'][size]['gflops_per_second']:.0f} GFLOP/s); the "
        f"last column is the round's share of that.", "",
        "| clients / round | " + " | ".join(f"{m} clients/s" for m in modes)
        + "".join(f" | {ours_names} / {r}" for r in ratios)
        + f" | {ours_names} GFLOP/s | % of peak | % of cache roofline | "
        "% of DRAM roofline | peak RSS MiB ("
        + ", ".join(modes) + ") | vmapped / chunk8 XLA temp (MiB) |"
        + (" max abs(Flower - vmapped) params |" if flower else "")
        + f" {ours_names} % of the shared-parameter step |",
        "|---" * (len(modes) + len(ratios) + 8 + flower) + "|"]
    for n in header["cohorts"]:
      row = {m: by_key[(size, m, n)] for m in modes}
      ours = [row[m] for m in OURS]
      both = lambda f: ", ".join(f(c) for c in ours)  # noqa: E731
      gflops = lambda c: c["gflops_per_second"]  # noqa: E731
      lines.append(
          f"| {n} | " + " | ".join(f"{row[m]['clients_per_second']:.0f}" for m in modes)
          + "".join(" | " + both(lambda c: f"{c['clients_per_second'] / row[r]['clients_per_second']:.1f}x")
                    for r in ratios)
          + " | " + both(lambda c: f"{gflops(c):.1f}")
          + " | " + both(lambda c: f"{100 * gflops(c) / header['gemm_gflops']:.0f}%")
          + " | " + both(lambda c: f"{100 * gflops(c) / roof['cache_stream_gbs']:.0f}%")
          + " | " + both(lambda c: f"{100 * gflops(c) / roof['stream_gbs']:.0f}%")
          + " | " + " / ".join(f"{row[m]['peak_rss_mib']:.0f}" for m in modes)
          + f" | {row['vmapped']['xla_temp_mib']:.1f} / "
          f"{row['chunk8']['xla_temp_mib']:.1f} |"
          + (f" {row['flower']['max_param_diff_vs_vmapped']:.1e} |" if flower else "")
          + " " + both(lambda c: f"{100 * c['clients_per_second'] / shared:.0f}%") + " |")
    lines.append("")
  return "\n".join(lines)


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


def _run_cell(repo: str, size: str, mode: str, n: int, params_out: str) -> dict:
  """One cell in a fresh process (so its peak RSS is its own)."""
  if mode == "flower":
    command = [_FLOWER_PYTHON.value, "-m", "benchmarks.flower_peer", f"--size={size}",
               f"--clients={n}", f"--rounds={_ROUNDS.value}"]
  else:
    command = [sys.executable, "-m", "benchmarks.federated_round",
               f"--cell={size}:{mode}:{n}", f"--rounds={_ROUNDS.value}"]
  command.append(f"--params_out={params_out}")
  env = {**os.environ, "PYTHONPATH": repo}
  out = subprocess.run(command, capture_output=True, text=True, cwd=repo, env=env)
  if out.returncode:
    raise RuntimeError(f"{size}/{mode}/{n} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _max_param_difference(a_path: str, b_path: str) -> float:
  """max |a - b| over every parameter of two saved server models."""
  import numpy as np
  with np.load(a_path) as a, np.load(b_path) as b:
    if sorted(a.files) != sorted(b.files):
      raise ValueError(f"{a_path} and {b_path} hold different parameter lists")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


def main(argv) -> None:
  del argv
  if _CELL.value:
    size, mode, clients = _CELL.value.split(":")
    if mode == "percore":  # before jax starts: one CPU device per core
      os.environ["JAX_NUM_CPU_DEVICES"] = str(os.cpu_count())
    print(json.dumps(measure_cell(size, mode, int(clients), _ROUNDS.value,
                                  _PARAMS_OUT.value)))
    return
  import tempfile
  cohorts = [int(n) for n in _COHORTS.value]
  modes = MODES + (("flower",) if _FLOWER_PYTHON.value else ())
  cells = []
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as scratch:
    for size, n in itertools.product(SIZES, cohorts):
      for mode in modes:
        saved = os.path.join(scratch, f"{size}-{n}-{mode}.npz")
        cell = _run_cell(repo, size, mode, n, saved)
        if mode != "vmapped":
          cell["max_param_diff_vs_vmapped"] = _max_param_difference(
              saved, os.path.join(scratch, f"{size}-{n}-vmapped.npz"))
        print(f"{size:5s} {mode:8s} {n:4d} clients: "
              f"{cell['clients_per_second']:8.1f} clients/s, peak RSS "
              f"{cell['peak_rss_mib']:.0f} MiB, max |params - vmapped| "
              f"{cell.get('max_param_diff_vs_vmapped', 0.0):.1e}", flush=True)
        cells.append(cell)
  import jax
  from infra import results as results_lib
  command = "python -m benchmarks.federated_round --out " + _OUT.value
  if _FLOWER_PYTHON.value:
    command += " --flower_python=" + _FLOWER_PYTHON.value
  if cohorts != [16, 64, 256, 1024]:
    command += " --cohorts=" + ",".join(map(str, cohorts))
  header = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "gemm_gflops": gemm_peak_gflops(),
            "stream_gbs": stream_bandwidth_gbs(256),
            "cache_stream_gbs": stream_bandwidth_gbs(8, repeats=50),
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "command": command, "modes": list(modes), "cohorts": cohorts}
  header["client_cost"] = {size: client_cost(size) for size in SIZES}
  header["shared_step"] = {size: shared_step_ceiling(size) for size in SIZES}
  header["matmul_shape_gflops"] = {size: matmul_shape_gflops(size) for size in SIZES}
  for cell in cells:
    cost = header["client_cost"][cell["size"]]
    cell["gflops_per_second"] = (cell["clients"] * cost["xla_flops"]
                                 / cell["round_seconds"] / 1e9)
  header["roofline_gflops"] = {
      size: {memory: roofline_gflops(cost, header, header[memory])
             for memory in ("cache_stream_gbs", "stream_gbs")}
      for size, cost in header["client_cost"].items()}
  markdown = _markdown(cells, header)
  results_lib.write_report(_OUT.value, {**header, "cells": cells},
                           markdown.splitlines())
  plot(_OUT.value, cells, modes)
  print(markdown)


def roofline_gflops(cost: dict, header: dict, bandwidth_gbs: float) -> float:
  """A client step's attainable GFLOP/s: min(matmul peak, bandwidth x its
  arithmetic intensity, XLA's FLOPs over its bytes accessed)."""
  return min(header["gemm_gflops"],
             bandwidth_gbs * cost["xla_flops"] / cost["xla_bytes"])


def plot(out: str, cells: list[dict], modes=MODES) -> None:
  from benchmarks import report
  fig, axes = report.figure(len(SIZES))
  for ax, size in zip(axes, SIZES):
    for mode in modes:
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
