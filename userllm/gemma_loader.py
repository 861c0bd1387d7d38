"""Loads an official Gemma (v1) Flax checkpoint into `userllm.llm.DecoderLM`.

The official release is an orbax PyTree checkpoint whose keys are flat paths
(`transformer/layer_0/attn/q_einsum` -> {"w": array}) and a SentencePiece
`tokenizer.model`. Our module uses Gemma's own names, so loading is:
nest the paths, drop the `transformer` root and the Einsum `w` leaves, split a
fused `qkv_einsum` (multi-head checkpoints such as 7B) into `q_einsum` and
`kv_einsum`, and pad the embedding rows to the model's padded vocabulary. The
config (width, depth, heads, MLP width) is read off the parameter shapes.

Gemma 2 / 3 checkpoints (post-norms, logit soft-capping, local attention) are
refused with an error naming the parameter that gives them away.

`save_checkpoint` writes our parameters back in the official layout: the tests
use it to make a tiny checkpoint, and it exports a fine-tuned LM.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from userllm import llm

_LAYER_KEYS = {"pre_attention_norm", "pre_ffw_norm", "attn", "mlp"}


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


def _w(node: dict, path: str):
  leaf = node.get("w") if isinstance(node, dict) else node
  if leaf is None:
    raise ValueError(f"Gemma checkpoint: {path} has no 'w' parameter")
  return np.asarray(leaf)


def convert(gemma_params: dict, vocab_size: int | None = None
            ) -> tuple[llm.LLMConfig, dict]:
  """Official Gemma parameters (flat or nested) -> (LLMConfig, our params).

  `vocab_size` defaults to the checkpoint's embedding rows.
  """
  tree = _nest(dict(gemma_params))
  tree = tree.get("transformer", tree)
  layer_names = sorted((k for k in tree if k.startswith("layer_")),
                       key=lambda k: int(k.split("_")[1]))
  if not layer_names or "embedder" not in tree or "final_norm" not in tree:
    raise ValueError("not a Gemma checkpoint: expected transformer/embedder, "
                     f"transformer/layer_N and transformer/final_norm, found "
                     f"{sorted(tree)}")
  embedding = np.asarray(tree["embedder"]["input_embedding"])
  params = {"embedder": {}, "final_norm": {"scale": np.asarray(
      tree["final_norm"]["scale"])}}
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


def _convert_layer(layer: dict, path: str) -> dict:
  unknown = set(layer) - _LAYER_KEYS
  if unknown:
    raise ValueError(f"{path} has {sorted(unknown)}: a Gemma 2/3 layer (post-norms"
                     "); only Gemma v1 checkpoints are supported")
  attn = layer["attn"]
  if "qkv_einsum" in attn:  # multi-head: [3, heads, embed, head_dim]
    qkv = _w(attn["qkv_einsum"], f"{path}/attn/qkv_einsum")
    q, kv = qkv[0], qkv[1:]
  else:
    q = _w(attn["q_einsum"], f"{path}/attn/q_einsum")
    kv = _w(attn["kv_einsum"], f"{path}/attn/kv_einsum")
  gating = np.asarray(layer["mlp"]["gating_einsum"])
  linear = np.asarray(layer["mlp"]["linear"])
  if gating.shape[1] != q.shape[1]:  # some releases store [2, mlp, embed]
    gating = gating.transpose(0, 2, 1)
  return {"pre_attention_norm": {"scale": np.asarray(
              layer["pre_attention_norm"]["scale"])},
          "pre_ffw_norm": {"scale": np.asarray(layer["pre_ffw_norm"]["scale"])},
          "attn": {"q_einsum": q, "kv_einsum": kv,
                   "attn_vec_einsum": _w(attn["attn_vec_einsum"],
                                         f"{path}/attn/attn_vec_einsum")},
          "mlp": {"gating_einsum": gating, "linear": linear}}


def load_checkpoint(path: str, vocab_size: int | None = None
                    ) -> tuple[llm.LLMConfig, dict]:
  """Restores an official Gemma checkpoint directory -> (LLMConfig, params)."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Gemma checkpoint directory {path!r} does not exist")
  restored = ocp.PyTreeCheckpointer().restore(path)
  return convert(restored, vocab_size)


def to_gemma_layout(params: dict, fuse_qkv: bool = False) -> dict:
  """Our LLM parameters -> the official flat layout (base weights only)."""
  flat = {"transformer/embedder": {"input_embedding": np.asarray(
              params["embedder"]["input_embedding"])},
          "transformer/final_norm": {"scale": np.asarray(
              params["final_norm"]["scale"])}}
  for name in (k for k in params if k.startswith("layer_")):
    layer, root = params[name], f"transformer/{name}"
    attn = jax.tree.map(np.asarray, layer["attn"])
    if fuse_qkv:
      flat[f"{root}/attn/qkv_einsum"] = {"w": np.concatenate(
          [attn["q_einsum"][None], attn["kv_einsum"]])}
    else:
      flat[f"{root}/attn/q_einsum"] = {"w": attn["q_einsum"]}
      flat[f"{root}/attn/kv_einsum"] = {"w": attn["kv_einsum"]}
    flat[f"{root}/attn/attn_vec_einsum"] = {"w": attn["attn_vec_einsum"]}
    flat[f"{root}/mlp"] = {"gating_einsum": np.asarray(layer["mlp"]["gating_einsum"]),
                           "linear": np.asarray(layer["mlp"]["linear"])}
    for norm in ("pre_attention_norm", "pre_ffw_norm"):
      flat[f"{root}/{norm}"] = {"scale": np.asarray(layer[norm]["scale"])}
  return flat


def save_checkpoint(params: dict, path: str, fuse_qkv: bool = False) -> str:
  """Writes `params` (our LLM's) as an official-layout orbax checkpoint."""
  checkpointer = ocp.PyTreeCheckpointer()
  checkpointer.save(os.path.abspath(path), to_gemma_layout(params, fuse_qkv))
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
