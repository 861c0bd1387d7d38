"""One mesh and one logical-axis rules table for every workflow.

Parameters carry logical axis names (`vocab`, `embed`, `mlp`, `heads`, `kv`,
`length`, `kv_heads`, `lora`, `experts`, `latents`); `LOGICAL_RULES` maps them to
the mesh axes `data` and `model`. Batches
shard their leading axis over `data` (federated clients ride on it too).

With `config.mesh.fsdp` the parameters' `embed` axis is sharded over `data`
as well (`FSDP_RULES`: fully sharded data parallelism over the data axis, as
MaxText's `fsdp` axis): each chip then holds 1 / (data x model) of a weight
instead of 1 / model, and the step gathers a layer's weights when it uses
them. It is what lets the 7B-class RLPF and User-LLM steps fit a v5e-8
(docs/accelerators.md). The rules belong to the mesh `make_mesh` built
(`rules_of`), so every state placed on that mesh follows them.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from infra.errors import ConfigError

MESH_AXES = ("data", "model")
LOGICAL_RULES = (
    ("batch", "data"),
    ("clients", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("kv_heads", None),  # multi-query attention often has 1 KV head: replicate
    ("lora", None),  # adapter ranks are small
    ("experts", None),  # and so are their expert counts
    ("latents", None),  # Perceiver queries
)


FSDP_RULES = tuple(("embed", "data") if name == "embed" else (name, axis)
                   for name, axis in LOGICAL_RULES)
_RULES_OF: dict = {}  # mesh -> its rules, when make_mesh was asked for FSDP


def rules_of(mesh: Mesh) -> tuple:
  """The logical rules of `mesh`: FSDP_RULES if `make_mesh` built it with
  `fsdp`, else LOGICAL_RULES."""
  return _RULES_OF.get(mesh, LOGICAL_RULES)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A ('data', 'model') mesh; `mesh.data = -1` takes all devices left over;
  `mesh.fsdp` gives it FSDP_RULES (`rules_of`)."""
  devices = jax.devices() if devices is None else devices
  model = int(mesh_config.model)
  data = int(mesh_config.data)
  if model < 1 or len(devices) % model:
    raise ConfigError(f"config.mesh.model={model} must divide the "
                      f"{len(devices)} devices")
  if data == -1:
    data = len(devices) // model
  if data * model != len(devices):
    raise ConfigError(f"config.mesh.data={mesh_config.data} x config.mesh.model="
                      f"{model} does not match the {len(devices)} devices")
  mesh = Mesh(np.asarray(devices).reshape(data, model), MESH_AXES)
  # an equal mesh built before takes this one's rules: the latest asked wins
  _RULES_OF.pop(mesh, None)
  if mesh_config.get("fsdp", False):
    _RULES_OF[mesh] = FSDP_RULES
  return mesh


def logical_shardings(boxed_tree, mesh: Mesh, rules=None):
  """NamedShardings for a pytree whose leaves may be nn.LogicallyPartitioned,
  by `rules` (default: the mesh's own, `rules_of`)."""
  logical_specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh,
                                     rules if rules is not None else rules_of(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch or clients) axis over `data`, the rest replicated."""
  return NamedSharding(mesh, P("data"))


def put_batch(batch, mesh: Mesh):
  """Places a host-side global batch (a pytree of numpy arrays, identical on
  every host) with its leading axis over `data`. Each process only copies the
  slices its own devices hold, so this also works on multi-host slices, where
  `jax.device_put` of a global array cannot reach other hosts' devices."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(x.shape, sharding,
                                             lambda index: x[index]), batch)


def check_batch_divides(batch_size: int, mesh: Mesh, field: str) -> None:
  data = mesh.shape["data"]
  if batch_size % data:
    raise ConfigError(f"{field}={batch_size} must be a multiple of the mesh's "
                      f"data axis ({data} devices)")


def to_host(x) -> np.ndarray:
  """`x` as a numpy array on every process: a global array that spans other
  processes' devices (a multi-host batch's outputs) is gathered first."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable
                                       or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
