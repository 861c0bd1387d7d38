"""Ahead-of-time compilation of a jitted step for a TPU slice, on any host.

What MaxText's `train_compile.py` does: libtpu describes a slice's chips
without having them (`jax.experimental.topologies.get_topology_desc`), a mesh
is laid over those descriptions, the step is lowered against abstract inputs
(`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s: no weights, no
data) and compiled by the TPU compiler. The compiled program then says what
one chip holds (`memory_analysis`) and what XLA's cost model expects of it
(`cost_analysis`), and a program that needs more HBM than a chip has fails to
compile with the compiler's own out-of-memory message (`DoesNotFit`).

Needs `jax[tpu]` (libtpu) for TPU slices: requirements-tpu-aot.txt says how
to install it beside the CPU stack. The same functions compile for any mesh
(the tests use 8 fake CPU devices), where XLA:CPU reports memory and FLOPs
but no step time.

Every figure is per chip: the compiled program is one chip's (SPMD), so its
memory and its `flops` are one chip's share (a matmul over 8 chips reports
1/8 of its FLOPs); `optimal_seconds` is XLA's estimate of one step's time,
not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra import mesh as mesh_lib
from infra.train_state import TrainState

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU chip: HBM bytes, peak dense bf16 FLOP/s, HBM bytes/s."""
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_second: float


# Per chip, from the Cloud TPU system architecture pages
# (cloud.google.com/tpu/docs/v5e, .../v4, .../v6e): v5e 16 GiB HBM at 819
# GB/s and 197 TFLOP/s bf16; v4 32 GiB at 1,200 GB/s and 275 TFLOP/s (one
# megacore = 2 TensorCores, one JAX device); v6e (Trillium) 32 GiB at 1,640
# GB/s and 918 TFLOP/s.
CHIPS = {
    "v5e": Chip(16 * GiB, 197e12, 819e9),
    "v4": Chip(32 * GiB, 275e12, 1200e9),
    "v6e": Chip(32 * GiB, 918e12, 1640e9),
}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice as libtpu names it: `topology` ("v5e:2x4"), the chip
  config ("megacore": a v4 chip's two TensorCores are one device) and the
  chips each host holds (MaxText's accelerator_to_spec_map)."""
  chip: str
  topology: str
  chip_config: str = "default"
  chips_per_host: tuple[int, int, int] = (2, 2, 1)

  @property
  def spec(self) -> Chip:
    return CHIPS[self.chip]


# Cloud's names count TensorCores for v4 (v4-8: 4 chips) and chips for v5e/v6e.
SLICES = {
    "v5e-8": Slice("v5e", "v5e:2x4"),
    "v5e-16": Slice("v5e", "v5e:4x4"),
    "v4-8": Slice("v4", "v4:2x2x1", chip_config="megacore"),
    "v6e-8": Slice("v6e", "v6e:2x4"),
}


class DoesNotFit(Exception):
  """The compiler ran out of a chip's memory; the message is its own."""


def topology_devices(name: str) -> list:
  """The devices of slice `name` (SLICES) as libtpu describes them, on a host
  without TPUs. Raises ValueError naming the slice when libtpu is missing or
  does not know the topology."""
  if name not in SLICES:
    raise ValueError(f"unknown slice {name!r}; slices are {sorted(SLICES)}")
  s = SLICES[name]
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(
        topology_name=s.topology, platform="tpu", chip_config_name=s.chip_config,
        chips_per_host_bounds=s.chips_per_host, num_slices=1,
        wrap=(False, False, False)).devices)
  except Exception as e:  # libtpu absent, or a topology it does not know
    raise ValueError(f"slice {name} ({s.topology}): libtpu gives no devices "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                     "install requirements-tpu-aot.txt") from None


def slice_mesh(devices: list, data: int, model: int) -> Mesh:
  """The workflows' ('data', 'model') mesh (infra/mesh.py) over `devices`."""
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=data, model=model)),
                            devices)


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` (a pytree of arrays or structs) carrying
  `shardings` (a matching pytree of NamedShardings, or one for every leaf).
  Raises jax's IndivisibleError (a ValueError) for a dimension the mesh does
  not divide, as placing a real array there (`train_loop.create_state`) does."""
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, shapes)

  def place(x, sharding):
    sharding.shard_shape(x.shape)  # raises where the real placement would
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(place, shapes, shardings)


def boxed_train_state(init_params: Callable[[jax.Array], Any], tx):
  """The shapes of the TrainState `train_loop.create_state` builds
  (`jax.eval_shape`: nothing materialised), its leaves still boxed with
  their logical axis names. `init_params`: rng -> parameters, boxed where
  they have axis names (bare leaves are replicated, as create_state
  replicates them)."""
  def boxed_state():
    rng = jax.random.PRNGKey(0)
    params = init_params(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=rng)
  return jax.eval_shape(boxed_state)


def place_train_state(boxed, mesh: Mesh, rules=mesh_lib.LOGICAL_RULES):
  """(abstract TrainState, its shardings) of `boxed_train_state`'s shapes on
  `mesh`, `rules` mapping logical axes to mesh axes."""
  shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
  return with_shardings(nn.meta.unbox(boxed), shardings), shardings


def abstract_train_state(init_params: Callable[[jax.Array], Any], tx, mesh: Mesh,
                         rules=mesh_lib.LOGICAL_RULES):
  """(abstract TrainState, its shardings): what `train_loop.create_state`
  builds, from shapes alone."""
  return place_train_state(boxed_train_state(init_params, tx), mesh, rules)


def chip_bytes(x) -> int:
  """Bytes one chip holds of an abstract array with a sharding (its shard)."""
  shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def largest_arrays(tree, count: int = 3) -> list[dict]:
  """The `count` largest leaves of an abstract pytree: path, shape, dtype,
  PartitionSpec over the mesh axes and the bytes one chip holds."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  leaves.sort(key=lambda kv: -math.prod(kv[1].shape) * jnp.dtype(kv[1].dtype).itemsize)
  return [{"path": jax.tree_util.keystr(path, simple=True, separator="/"),
           "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name,
           "spec": str(x.sharding.spec if x.sharding is not None else P()),
           "chip_bytes": chip_bytes(x)} for path, x in leaves[:count]]


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """One compiled step, per chip. `flops` and `bytes_accessed`: this chip's
  share of the step's, by XLA's cost analysis; `optimal_seconds`: that
  analysis's own step-time estimate as the backend reports it (None where
  it gives none, as XLA:CPU; libtpu 0.0.42 reports negative values for
  whole training steps, which `step_seconds` then ignores)."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int  # outputs that reuse a donated argument's buffer
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  optimal_seconds: float | None
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """What the chip's memory must hold at once (MaxText's estimate:
    arguments + outputs + temporaries - aliased + generated code)."""
    return (self.argument_bytes + self.output_bytes + self.temp_bytes
            - self.alias_bytes + self.code_bytes)

  def step_seconds(self, chip: Chip) -> tuple[float, str]:
    """(estimated step time, its source): XLA's `optimal_seconds` when it
    is a positive time, else the roofline of XLA's counts on `chip`,
    max(FLOPs / peak, bytes accessed / HBM bandwidth). An estimate, never a
    measurement."""
    if self.optimal_seconds is not None and self.optimal_seconds > 0:
      return float(self.optimal_seconds), "xla"
    return max(self.flops / chip.peak_bf16_flops,
               self.bytes_accessed / chip.hbm_bytes_per_second), "roofline"

  def mfu_bound(self, chip: Chip) -> float:
    """FLOPs / (estimated step time x peak FLOP/s), per chip: the model
    FLOPs utilisation the step would reach if it took that long."""
    seconds, _ = self.step_seconds(chip)
    return self.flops / (seconds * chip.peak_bf16_flops)


OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|Ran out of memory|exceeded.*hbm",
                           re.IGNORECASE)


def compile_step(fn: Callable, args: tuple, in_shardings, out_shardings,
                 donate_argnums=(), compiler_options: dict | None = None
                 ) -> CompileReport:
  """Lowers `jax.jit(fn, ...)` against `args` (abstract, with shardings) and
  compiles it for their devices (with XLA `compiler_options`, e.g. libtpu's
  flags). Raises DoesNotFit with the compiler's message when the program
  needs more memory than a device has."""
  began = time.perf_counter()
  jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=donate_argnums)
  try:
    compiled = jitted.lower(*args).compile(compiler_options)
  except Exception as e:  # XlaRuntimeError, whose module path varies by jaxlib
    if OUT_OF_MEMORY.search(str(e)):
      raise DoesNotFit(out_of_memory_line(str(e))) from None
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return CompileReport(
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      flops=float(cost.get("flops", 0.0)),
      bytes_accessed=float(cost.get("bytes accessed", 0.0)),
      optimal_seconds=cost.get("optimal_seconds"),
      compile_seconds=time.perf_counter() - began)


def out_of_memory_line(message: str) -> str:
  """The line of an XLA out-of-memory error that says how much was needed."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  for line in lines:
    if re.search(r"Used .* of .* hbm|exceeded", line, re.IGNORECASE):
      return line[:300]
  return lines[0][:300] if lines else "out of memory"
