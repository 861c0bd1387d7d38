"""Google DeepMind's `gemma` library, the reference our Gemma configs and
loader are checked against, when it is installed (requirements-gemma-reference.txt:
`gemma==3.3.0` with `--no-deps`); the tests that need it skip otherwise.

gemma 3.3.0 subclasses `kauldron.checkpoints.AbstractPartialLoader`, which
kauldron 1.4 renamed `InitTransform` (the last kauldron with the old name, 1.3.0,
does not import on our jax 0.10); the alias below lets `gemma.gm.ckpts` import.
Nothing of the library's numerics depends on it.
"""

from __future__ import annotations

import dataclasses

import pytest


def import_gm():
  """`gemma.gm`, or skip the test with the reason."""
  pytest.importorskip("gemma", reason="the gemma reference library is not "
                      "installed (requirements-gemma-reference.txt)")
  import kauldron.checkpoints as kd_checkpoints
  if not hasattr(kd_checkpoints, "AbstractPartialLoader"):
    kd_checkpoints.AbstractPartialLoader = kd_checkpoints.InitTransform
  from gemma import gm
  return gm


# our variant name -> the library's model class name (Gemma 1 is no longer in
# the library: its configs are checked against the committed table only)
LIBRARY_CLASSES = {
    "gemma2_2b": "Gemma2_2B", "gemma2_9b": "Gemma2_9B", "gemma2_27b": "Gemma2_27B",
    "gemma3_270m": "Gemma3_270M", "gemma3_1b": "Gemma3_1B",
    "gemma3_4b": "Gemma3_4B", "gemma3_12b": "Gemma3_12B",
    "gemma3_27b": "Gemma3_27B",
}


def released_config(gm, name: str):
  """The library's TransformerConfig of our variant `name`; for Gemma 1 (not in
  the library any more) the library's defaults, which are Gemma 1's, at its
  shapes from our table."""
  if name in LIBRARY_CLASSES:
    return getattr(gm.nn, LIBRARY_CLASSES[name]).config
  from userllm.models import gemma_variants
  v = gemma_variants.VARIANTS[name]
  return gm.nn.config.TransformerConfig(
      num_embed=v.vocab_size, embed_dim=v.embed_dim, hidden_dim=v.mlp_dim,
      num_heads=v.num_heads, head_dim=v.head_dim, num_kv_heads=v.num_kv_heads,
      final_logit_softcap=None, use_post_attn_norm=False, use_post_ffw_norm=False,
      attention_types=(gm.nn.AttentionType.GLOBAL,) * v.num_layers)


def shrunk(gm, config, *, num_layers: int, embed_dim: int, num_heads: int,
           num_kv_heads: int, head_dim: int, mlp_dim: int, window: int,
           vocab: int = 256):
  """A released config at test size, every constant kept but the window:
  the first `num_layers` of its attention pattern, no vision encoder."""
  kinds = tuple(config.attention_types[:num_layers])
  return dataclasses.replace(
      config, num_embed=vocab, embed_dim=embed_dim, hidden_dim=mlp_dim,
      num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
      attention_types=kinds,
      sliding_window_size=window if config.sliding_window_size else None,
      vision_encoder=None)


def flat_layout(gm, nested_params: dict) -> dict:
  """The library's own conversion of `model.init()` parameters to the flat
  layout Google released checkpoints in (`transformer/layer_0/attn/...`)."""
  from gemma.gm.ckpts import _checkpoint
  return _checkpoint._nested_to_flat(nested_params)  # pylint: disable=protected-access
