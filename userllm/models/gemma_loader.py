"""Loads an official Gemma 1, 2 or 3 (text) Flax checkpoint into
`userllm.models.llm.DecoderLM`, and exports ours in the layout Google released.

Two layouts load:
- the released one (what `gemma.gm.ckpts.save_params` writes and
  `load_params` reads as FLAT): an orbax PyTree whose keys are flat paths with
  the Einsum weights as `{"w": array}`, the MLP's included
  (`transformer/layer_0/attn/q_einsum -> {"w"}`,
  `transformer/layer_0/mlp/gating_einsum -> {"w"}`,
  `transformer/layer_0/pre_attention_norm -> {"scale"}`);
- the library's nested one (`model.init()["params"]`: `layer_0/mlp/gating_einsum`
  as an array, no `transformer` root).
Our module uses Gemma's own names, so loading is: nest the paths, drop the
`transformer` root and the `w` leaves, split a fused `qkv_einsum` (multi-head
checkpoints such as 7B) into `q_einsum` and `kv_einsum`, and pad the embedding
rows to the model's padded vocabulary. The config (width, depth, heads, MLP
width) is read off the parameter shapes.

The family is read off the keys: post-norms (`post_attention_norm`,
`post_ffw_norm`) make Gemma 2, and with QK-norm scales (`attn/_query_norm`,
`attn/_key_norm`) Gemma 3. A checkpoint does not hold the family's constants
(query scale, soft caps, sliding windows, RoPE bases) nor which way its MLP
gating is stored (Gemma 2 9B / 27B and Gemma 3 store it [2, mlp, embed]), so
they come from the released variant (`gemma_variants`): the one the config
names, or the one with the checkpoint's shapes.

Every key is either mapped or an error naming it. Gemma 3's vision tower
(`SigLiPFromPatches_0/...` and the embedder's `mm_*` projection) is an error too
unless `drop_vision=True` (`config.llm.drop_vision`): User-LLM reads text.

`save_checkpoint` writes our parameters in the released layout: the tests use
it to make tiny checkpoints, and it exports a fine-tuned LM.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from infra import paths
from infra.errors import ConfigError, ModelFileError
from userllm.models import gemma_variants, llm

# the parameters a Gemma layer may hold (paths inside the layer)
_LAYER_PARAMS = ("pre_attention_norm/scale", "pre_ffw_norm/scale",
                 "attn/q_einsum", "attn/kv_einsum", "attn/qkv_einsum",
                 "attn/attn_vec_einsum", "mlp/gating_einsum", "mlp/linear")
_POST_NORMS = ("post_attention_norm/scale", "post_ffw_norm/scale")  # Gemma 2, 3
_QK_NORMS = ("attn/_query_norm/scale", "attn/_key_norm/scale")  # Gemma 3
_VISION_ROOTS = ("SigLiPFromPatches_0", "vision_encoder")  # released, nested
_VISION_EMBEDDER = ("mm_input_projection", "mm_soft_embedding_norm")


def _nest(flat: dict) -> dict:
  """{'a/b': {'w': x}} -> {'a': {'b': {'w': x}}} (already nested trees pass)."""
  nested: dict = {}
  for key, value in flat.items():
    node = nested
    parts = key.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = _nest(value) if isinstance(value, dict) else value
  return nested


def _leaf_paths(tree, prefix: str = "") -> set[str]:
  """Every array's path in a nested dict, with the Einsum `w` leaves folded
  into their parent (`attn/q_einsum/w` -> `attn/q_einsum`)."""
  if not isinstance(tree, dict):
    return {prefix.rstrip("/")}
  if set(tree) == {"w"} and not isinstance(tree["w"], dict):
    return {prefix.rstrip("/")}
  paths = set()
  for key, value in tree.items():
    paths |= _leaf_paths(value, f"{prefix}{key}/")
  return paths


def _get(tree: dict, path: str):
  """The array at `path` (`a/b`), through an Einsum's `{"w": array}`; None if absent."""
  node = tree
  for part in path.split("/"):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  if isinstance(node, dict):
    node = node.get("w")
  if node is None or isinstance(node, jax.Array):  # restored sharded: stays so
    return node
  return np.asarray(node)


def convert(gemma_params: dict, vocab_size: int | None = None,
            drop_vision: bool = False, variant: str = "", **overrides
            ) -> tuple[llm.LLMConfig, dict]:
  """Gemma 1/2/3 parameters (released flat or library nested) -> (LLMConfig,
  our params). `vocab_size` defaults to the checkpoint's embedding rows.

  The shapes come from the parameters; the family's constants (query scale,
  windows, RoPE, soft caps) from the released variant named by `variant`, else
  from the variant whose shapes these are, else from the family's defaults
  (`gemma_variants`), with a printed line saying which. `overrides` set
  LLMConfig fields on top (e.g. a shorter sliding window). A key the
  conversion does not use is a ValueError naming it."""
  tree = _nest(dict(gemma_params))
  vision = sorted(k for k in tree if k in _VISION_ROOTS)
  if "transformer" in tree:  # the released layout's root
    others = sorted(set(tree) - {"transformer"} - set(vision))
    if others:
      raise ModelFileError(f"Gemma checkpoint has parameters this loader does not "
                       f"map: {others} beside transformer/")
    tree = tree["transformer"]
  tree = _without_vision(tree, vision, drop_vision)
  layer_names = sorted((k for k in tree if k.startswith("layer_")),
                       key=lambda k: int(k.split("_")[1]))
  if not layer_names or "embedder" not in tree or "final_norm" not in tree:
    raise ModelFileError("not a Gemma checkpoint: expected transformer/embedder, "
                     f"transformer/layer_N and transformer/final_norm, found "
                     f"{sorted(tree)}")
  family = _family(tree[layer_names[0]])
  _check_every_key_is_known(tree, layer_names, family)
  shapes = _shapes(tree, layer_names)
  released = gemma_variants.resolve(family, shapes, variant)
  embedding = _get(tree, "embedder/input_embedding")
  params = {"embedder": {}, "final_norm": {"scale": _get(tree, "final_norm/scale")}}
  for name in layer_names:
    params[name] = _convert_layer(tree[name], f"transformer/{name}", family,
                                  released.gating_transposed)
  fields = gemma_variants.family_fields(released, shapes["embed_dim"],
                                        shapes["num_heads"], shapes["head_dim"])
  config = llm.LLMConfig(vocab_size=vocab_size or embedding.shape[0],
                         **shapes, **{**fields, **overrides}).validate()
  rows = config.padded_vocab
  if embedding.shape[0] > rows:  # e.g. Gemma's 256,128 rows, 256,000 pieces
    print(f"[gemma] embedding rows {rows}..{embedding.shape[0] - 1} dropped: no "
          f"piece of the {config.vocab_size} reaches them", flush=True)
    embedding = embedding[:rows]
  pad = jnp.pad if isinstance(embedding, jax.Array) else np.pad
  params["embedder"]["input_embedding"] = pad(
      embedding, [(0, rows - embedding.shape[0]), (0, 0)])
  return config, params


def _shapes(tree: dict, layer_names: list[str]) -> dict:
  """The LLMConfig shape fields, read off the first layer's parameters."""
  layer = tree[layer_names[0]]
  qkv = _get(layer, "attn/qkv_einsum")  # [3, heads, embed, head_dim]
  q = qkv[0] if qkv is not None else _required(layer, "attn/q_einsum",
                                                 f"transformer/{layer_names[0]}")
  kv = qkv[1:] if qkv is not None else _get(layer, "attn/kv_einsum")
  num_heads, embed_dim, head_dim = q.shape
  return dict(num_layers=len(layer_names), embed_dim=embed_dim,
              num_heads=num_heads, num_kv_heads=kv.shape[1], head_dim=head_dim,
              mlp_dim=_required(layer, "mlp/linear",
                                f"transformer/{layer_names[0]}").shape[0])


def _without_vision(tree: dict, vision_roots: list[str], drop: bool) -> dict:
  """The text model's tree: Gemma 3's vision tower dropped when `drop`, else an
  error naming it."""
  embedder = tree.get("embedder", {})
  found = vision_roots + [f"embedder/{k}" for k in _VISION_EMBEDDER if k in embedder]
  if not found:
    return tree
  if not drop:
    raise ConfigError(f"Gemma checkpoint has a vision encoder ({', '.join(found)}); "
                     "User-LLM reads text only: set config.llm.drop_vision=True "
                     "to load the text model without it")
  print(f"[gemma] dropping the vision encoder: {', '.join(found)}", flush=True)
  tree = {k: v for k, v in tree.items() if k not in _VISION_ROOTS}
  tree["embedder"] = {k: v for k, v in embedder.items() if k not in _VISION_EMBEDDER}
  return tree


def _family(layer: dict) -> str:
  """gemma1 | gemma2 | gemma3, from which norms a layer holds."""
  if any(_get(layer, p) is not None for p in _QK_NORMS):
    return "gemma3"
  if any(_get(layer, p) is not None for p in _POST_NORMS):
    return "gemma2"
  return "gemma1"


def _check_every_key_is_known(tree: dict, layer_names: list[str],
                              family: str) -> None:
  per_layer = _LAYER_PARAMS + (_POST_NORMS if family != "gemma1" else ()) + (
      _QK_NORMS if family == "gemma3" else ())
  known = {"embedder/input_embedding", "final_norm/scale"} | {
      f"{layer}/{p}" for layer in layer_names for p in per_layer}
  unknown = sorted(_leaf_paths(tree) - known)
  if unknown:
    shown = ", ".join(f"transformer/{u}" for u in unknown[:6])
    more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
    raise ModelFileError(f"Gemma checkpoint ({family}, from its first layer's keys) "
                     f"has parameters this loader does not map: {shown}{more}")


def _required(layer: dict, part: str, path: str) -> np.ndarray:
  value = _get(layer, part)
  if value is None:
    raise ModelFileError(f"Gemma checkpoint: {path}/{part} is missing")
  return value


def _convert_layer(layer: dict, path: str, family: str,
                   gating_transposed: bool) -> dict:
  """One layer's parameters in our tree. The MLP gating is stored [2, embed,
  mlp] or transposed [2, mlp, embed] (Gemma 2 9B / 27B, Gemma 3): its shape
  says which unless embed == mlp, where the variant's layout decides."""
  qkv = _get(layer, "attn/qkv_einsum")
  if qkv is not None:  # multi-head: [3, heads, embed, head_dim]
    q, kv = qkv[0], qkv[1:]
  else:
    q = _required(layer, "attn/q_einsum", path)
    kv = _required(layer, "attn/kv_einsum", path)
  gating = _required(layer, "mlp/gating_einsum", path)
  embed_dim = q.shape[1]
  square = gating.shape[1] == gating.shape[2]
  if (square and gating_transposed) or (not square and gating.shape[2] == embed_dim):
    gating = gating.transpose(0, 2, 1)
  if gating.shape[1] != embed_dim:
    raise ModelFileError(f"Gemma checkpoint: {path}/mlp/gating_einsum has shape "
                     f"{gating.shape}, which fits no width {embed_dim} layout")
  norms = ("pre_attention_norm", "pre_ffw_norm") + (
      ("post_attention_norm", "post_ffw_norm") if family != "gemma1" else ())
  out = {norm: {"scale": _required(layer, f"{norm}/scale", path)} for norm in norms}
  out["attn"] = {"q_einsum": q, "kv_einsum": kv,
                 "attn_vec_einsum": _required(layer, "attn/attn_vec_einsum", path)}
  if family == "gemma3":
    for norm in ("_query_norm", "_key_norm"):
      out["attn"][norm] = {"scale": _required(layer, f"attn/{norm}/scale", path)}
  out["mlp"] = {"gating_einsum": gating,
                "linear": _required(layer, "mlp/linear", path)}
  return out


def load_checkpoint(path: str, vocab_size: int | None = None,
                    drop_vision: bool = False, mesh=None, variant: str = "",
                    **overrides) -> tuple[llm.LLMConfig, dict]:
  """Restores a Gemma checkpoint directory -> (LLMConfig, params); `variant`
  and `overrides` as in `convert`.

  With a `mesh`, every array is restored straight onto the mesh's devices,
  split over all of them (`restore_sharding`), and converted there: no host
  ever holds the whole model, which is what a 7B+ checkpoint needs.
  `language_model.load_into` then moves it to the model's own shardings on device.
  Without one, the arrays come back to the host as numpy.
  """
  path = paths.resolve(path)  # a local path made absolute; gs:// as given
  if not paths.isdir(path):
    raise FileNotFoundError(f"Gemma checkpoint directory {path!r} does not exist")
  checkpointer = ocp.StandardCheckpointer()
  if mesh is None:
    restored = checkpointer.restore(path)
  else:
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                       sharding=restore_sharding(m.shape, mesh)),
        checkpointer.metadata(path).item_metadata)
    restored = checkpointer.restore(path, target)
  return convert(restored, vocab_size, drop_vision, variant, **overrides)


def restore_sharding(shape: tuple[int, ...], mesh) -> NamedSharding:
  """How an array of `shape` is restored: its largest dimension that the
  mesh's device count divides, split over every device; replicated if none."""
  devices = mesh.devices.size
  candidates = [d for d in range(len(shape)) if shape[d] % devices == 0]
  spec = [None] * len(shape)
  if devices > 1 and candidates:
    spec[max(candidates, key=lambda d: shape[d])] = tuple(mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(*spec))


def to_gemma_layout(params: dict, fuse_qkv: bool = False,
                    transpose_gating: bool | None = None) -> dict:
  """Our LLM parameters -> the released flat layout (base weights only; the
  family follows from which norms the layers hold). The MLP gating is written
  [2, mlp, embed] when `transpose_gating` (None: for Gemma 3 only; Gemma 2 9B
  and 27B need True: `gemma_variants.Variant.gating_transposed`)."""
  def einsum(x):
    return {"w": np.asarray(x)}
  flat = {"transformer/embedder": {"input_embedding": np.asarray(
              params["embedder"]["input_embedding"])},
          "transformer/final_norm": {"scale": np.asarray(
              params["final_norm"]["scale"])}}
  for name in (k for k in params if k.startswith("layer_")):
    layer, root = params[name], f"transformer/{name}"
    attn = layer["attn"]
    if fuse_qkv:
      flat[f"{root}/attn/qkv_einsum"] = einsum(np.concatenate(
          [np.asarray(attn["q_einsum"])[None], np.asarray(attn["kv_einsum"])]))
    else:
      flat[f"{root}/attn/q_einsum"] = einsum(attn["q_einsum"])
      flat[f"{root}/attn/kv_einsum"] = einsum(attn["kv_einsum"])
    flat[f"{root}/attn/attn_vec_einsum"] = einsum(attn["attn_vec_einsum"])
    gating = np.asarray(layer["mlp"]["gating_einsum"])
    transpose = ("_query_norm" in attn if transpose_gating is None
                 else transpose_gating)
    flat[f"{root}/mlp/gating_einsum"] = einsum(
        gating.transpose(0, 2, 1) if transpose else gating)
    flat[f"{root}/mlp/linear"] = einsum(layer["mlp"]["linear"])
    for norm in ("pre_attention_norm", "pre_ffw_norm", "post_attention_norm",
                 "post_ffw_norm"):
      if norm in layer:
        flat[f"{root}/{norm}"] = {"scale": np.asarray(layer[norm]["scale"])}
    for norm in ("_query_norm", "_key_norm"):
      if norm in attn:
        flat[f"{root}/attn/{norm}"] = {"scale": np.asarray(attn[norm]["scale"])}
  return flat


def save_checkpoint(params: dict, path: str, fuse_qkv: bool = False,
                    transpose_gating: bool | None = None) -> str:
  """Writes `params` (our LLM's) as a released-layout orbax checkpoint (what
  `gemma.gm.ckpts.load_params` reads)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(paths.resolve(path),
                    to_gemma_layout(params, fuse_qkv, transpose_gating))
  checkpointer.wait_until_finished()
  return path


def merge_pretrained(params: dict, pretrained: dict, where: str = "llm") -> dict:
  """`params` with every leaf that `pretrained` has replaced by it.

  Parameters the checkpoint lacks (cross-attention blocks, LoRA, the user
  encoder) keep their fresh initialisation. A shape mismatch is an error naming
  the parameter. Device arrays stay on device (either side may hold them).
  """
  def replace(node, new, path):
    if not isinstance(new, dict):
      if np.shape(node) != np.shape(new):
        raise ModelFileError(f"{path}: checkpoint shape {np.shape(new)} != model "
                         f"shape {np.shape(node)}")
      if isinstance(new, jax.Array):  # on device: cast there, no host copy
        return new.astype(node.dtype)
      return np.asarray(new, dtype=node.dtype)
    missing = set(new) - set(node)
    if missing:
      raise ModelFileError(f"{path}: the model has no {sorted(missing)}")
    return {k: replace(v, new[k], f"{path}/{k}") if k in new else v
            for k, v in node.items()}
  return replace(params, pretrained, where)
