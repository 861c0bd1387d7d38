"""Loads an official Gemma (v1) Flax checkpoint into `userllm.llm.DecoderLM`,
and exports ours in the layout Google released.

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

Every key is either mapped or an error naming it: Gemma 2 / 3 parameters
(post-norms, QK-norm scales) are refused by name, never dropped silently.

`save_checkpoint` writes our parameters in the released layout: the tests use
it to make tiny checkpoints, and it exports a fine-tuned LM.
"""

from __future__ import annotations

import os

import numpy as np
import orbax.checkpoint as ocp

from userllm import llm

# the parameters a Gemma v1 layer holds: path inside the layer -> optional
_LAYER_PARAMS = ("pre_attention_norm/scale", "pre_ffw_norm/scale",
                 "attn/q_einsum", "attn/kv_einsum", "attn/qkv_einsum",
                 "attn/attn_vec_einsum", "mlp/gating_einsum", "mlp/linear")
_GEMMA_2_3 = ("post_attention_norm", "post_ffw_norm", "_query_norm", "_key_norm")


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
  return None if node is None else np.asarray(node)


def convert(gemma_params: dict, vocab_size: int | None = None
            ) -> tuple[llm.LLMConfig, dict]:
  """Gemma v1 parameters (released flat or library nested) -> (LLMConfig,
  our params). `vocab_size` defaults to the checkpoint's embedding rows. A
  key the conversion does not use is a ValueError naming it."""
  tree = _nest(dict(gemma_params))
  if "transformer" in tree:  # the released layout's root
    others = sorted(set(tree) - {"transformer"})
    if others:
      raise ValueError(f"Gemma checkpoint has parameters this loader does not "
                       f"map: {others} beside transformer/ (a multimodal "
                       "checkpoint? only the text model is supported)")
    tree = tree["transformer"]
  layer_names = sorted((k for k in tree if k.startswith("layer_")),
                       key=lambda k: int(k.split("_")[1]))
  if not layer_names or "embedder" not in tree or "final_norm" not in tree:
    raise ValueError("not a Gemma checkpoint: expected transformer/embedder, "
                     f"transformer/layer_N and transformer/final_norm, found "
                     f"{sorted(tree)}")
  _check_every_key_is_known(tree, layer_names)
  embedding = _get(tree, "embedder/input_embedding")
  params = {"embedder": {}, "final_norm": {"scale": _get(tree, "final_norm/scale")}}
  for name in layer_names:
    params[name] = _convert_layer(tree[name], f"transformer/{name}")
  first = params[layer_names[0]]
  num_heads, embed_dim, head_dim = first["attn"]["q_einsum"].shape
  config = llm.LLMConfig(
      vocab_size=vocab_size or embedding.shape[0], embed_dim=embed_dim,
      num_layers=len(layer_names), num_heads=num_heads,
      num_kv_heads=first["attn"]["kv_einsum"].shape[1], head_dim=head_dim,
      mlp_dim=first["mlp"]["linear"].shape[0]).validate()
  rows = config.padded_vocab
  if embedding.shape[0] > rows:
    raise ValueError(f"Gemma checkpoint has {embedding.shape[0]} embedding rows, "
                     f"more than vocab_size={config.vocab_size} pads to ({rows})")
  params["embedder"]["input_embedding"] = np.pad(
      embedding, [(0, rows - embedding.shape[0]), (0, 0)])
  return config, params


def _check_every_key_is_known(tree: dict, layer_names: list[str]) -> None:
  known = {"embedder/input_embedding", "final_norm/scale"} | {
      f"{layer}/{p}" for layer in layer_names for p in _LAYER_PARAMS}
  unknown = sorted(_leaf_paths(tree) - known)
  if unknown:
    family = ("; a Gemma 2/3 checkpoint: only Gemma v1 is supported"
              if any(k in u for u in unknown for k in _GEMMA_2_3) else "")
    shown = ", ".join(f"transformer/{u}" for u in unknown[:6])
    more = f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""
    raise ValueError(f"Gemma checkpoint has parameters this loader does not map: "
                     f"{shown}{more}{family}")


def _required(layer: dict, part: str, path: str) -> np.ndarray:
  value = _get(layer, part)
  if value is None:
    raise ValueError(f"Gemma checkpoint: {path}/{part} is missing")
  return value


def _convert_layer(layer: dict, path: str) -> dict:
  qkv = _get(layer, "attn/qkv_einsum")
  if qkv is not None:  # multi-head: [3, heads, embed, head_dim]
    q, kv = qkv[0], qkv[1:]
  else:
    q = _required(layer, "attn/q_einsum", path)
    kv = _required(layer, "attn/kv_einsum", path)
  gating = _required(layer, "mlp/gating_einsum", path)
  if gating.shape[1] != q.shape[1]:  # some releases store [2, mlp, embed]
    gating = gating.transpose(0, 2, 1)
  return {"pre_attention_norm": {"scale": _required(
              layer, "pre_attention_norm/scale", path)},
          "pre_ffw_norm": {"scale": _required(layer, "pre_ffw_norm/scale", path)},
          "attn": {"q_einsum": q, "kv_einsum": kv,
                   "attn_vec_einsum": _required(layer, "attn/attn_vec_einsum",
                                                path)},
          "mlp": {"gating_einsum": gating,
                  "linear": _required(layer, "mlp/linear", path)}}


def load_checkpoint(path: str, vocab_size: int | None = None
                    ) -> tuple[llm.LLMConfig, dict]:
  """Restores a Gemma checkpoint directory -> (LLMConfig, params)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Gemma checkpoint directory {path!r} does not exist")
  restored = ocp.StandardCheckpointer().restore(path)
  return convert(restored, vocab_size)


def to_gemma_layout(params: dict, fuse_qkv: bool = False) -> dict:
  """Our LLM parameters -> the released flat layout (base weights only)."""
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
    flat[f"{root}/mlp/gating_einsum"] = einsum(layer["mlp"]["gating_einsum"])
    flat[f"{root}/mlp/linear"] = einsum(layer["mlp"]["linear"])
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
      flat[f"{root}/{norm}"] = {"scale": np.asarray(layer[norm]["scale"])}
  return flat


def save_checkpoint(params: dict, path: str, fuse_qkv: bool = False) -> str:
  """Writes `params` (our LLM's) as a released-layout orbax checkpoint (what
  `gemma.gm.ckpts.load_params` reads)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), to_gemma_layout(params, fuse_qkv))
  checkpointer.wait_until_finished()
  return path


def merge_pretrained(params: dict, pretrained: dict, where: str = "llm") -> dict:
  """`params` with every leaf that `pretrained` has replaced by it.

  Parameters the checkpoint lacks (cross-attention blocks, LoRA, the user
  encoder) keep their fresh initialisation. A shape mismatch is an error naming
  the parameter.
  """
  def replace(node, new, path):
    if not isinstance(new, dict):
      if np.shape(node) != np.shape(new):
        raise ValueError(f"{path}: checkpoint shape {np.shape(new)} != model "
                         f"shape {np.shape(node)}")
      return np.asarray(new, dtype=np.asarray(node).dtype)
    missing = set(new) - set(node)
    if missing:
      raise ValueError(f"{path}: the model has no {sorted(missing)}")
    return {k: replace(v, new[k], f"{path}/{k}") if k in new else v
            for k, v in node.items()}
  return replace(params, pretrained, where)
