"""The released Gemma configs (userllm/models/gemma_variants.py) against what
others published: a committed table transcribed from the technical reports
(always), and the `gemma` library's own configs, checkpoints and logits (when
the library is installed: requirements-gemma-reference.txt).

Every tiny model here has embed_dim / num_heads != head_dim (32 / 4 = 8 vs 16),
so a query scale taken from the wrong one of them shows in the logits."""

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gemma_library
from userllm.models import gemma_loader, gemma_variants, llm

TABLE = os.path.join(os.path.dirname(__file__), "data", "gemma_published.csv")


def _published() -> dict[str, dict]:
  with open(TABLE) as f:
    rows = csv.DictReader(line for line in f if not line.startswith("#"))
    return {row["variant"]: row for row in rows}


def test_every_released_variant_is_in_the_published_table_and_agrees():
  published = _published()
  assert set(published) == set(gemma_variants.VARIANTS)
  for name, row in published.items():
    v, cfg = gemma_variants.VARIANTS[name], gemma_variants.llm_config(name)
    shapes = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
              cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
    assert shapes == tuple(int(row[k]) for k in (
        "layers", "d_model", "heads", "kv_heads", "head_dim", "ffn_hidden",
        "vocab_rows")), name
    assert cfg.query_scalar == pytest.approx(int(row["query_scalar"]) ** -0.5), name
    assert cfg.sliding_window == int(row["window"]), name
    local, glob = (int(n) for n in row["local_global"].split(":"))
    pattern = [cfg.is_global(i) for i in range(local + glob)]
    assert pattern == [False] * local + [True] * glob, name
    first_local, first_global = cfg.rope(0), cfg.rope(local + glob - 1)
    assert first_local == (int(row["local_rope_base"]), 1.0), name
    assert first_global == (int(row["global_rope_base"]),
                            float(row["global_rope_scale"])), name
    assert (cfg.attn_logit_softcap, cfg.final_logit_softcap) == (
        float(row["attn_softcap"]), float(row["final_softcap"])), name
    assert v.gating_transposed == (row["gating"] == "ffn_d"), name
    assert (cfg.post_norms, cfg.qk_norm) == (v.family != "gemma1",
                                             v.family == "gemma3"), name


def test_the_27b_models_scale_queries_by_embed_per_head_and_the_rest_by_head_dim():
  """The rule the loader used to apply (embed / heads whenever it differs from
  head_dim) is wrong for Gemma 2 2B / 9B and Gemma 1 7B; the table is right."""
  for name, v in gemma_variants.VARIANTS.items():
    by = "embed_per_head" if name in ("gemma2_27b", "gemma3_27b") else "head_dim"
    assert v.query_scale_by == by, name
  assert gemma_variants.llm_config("gemma2_2b").query_scalar == 256 ** -0.5
  assert gemma_variants.llm_config("gemma2_27b").query_scalar == 144 ** -0.5
  assert gemma_variants.llm_config("gemma3_27b").query_scalar == 168 ** -0.5


@pytest.mark.parametrize("name", list(gemma_variants.VARIANTS))
def test_a_checkpoint_of_released_shapes_takes_that_variants_constants(name, capsys):
  v = gemma_variants.VARIANTS[name]
  assert gemma_variants.resolve(v.family, v.shapes()) is v
  assert f"[gemma] {name}: the released shapes" in capsys.readouterr().out


def test_other_shapes_take_the_family_defaults_or_the_named_variant(capsys):
  shapes = dict(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                head_dim=16, mlp_dim=64)
  assert gemma_variants.resolve("gemma2", shapes).query_scale_by == "head_dim"
  assert "set config.llm.variant" in capsys.readouterr().out
  assert gemma_variants.resolve("gemma2", shapes, "gemma2_27b").query_scale_by == (
      "embed_per_head")
  with pytest.raises(ValueError, match="llm.variant='gemma3_4b' is a gemma3 model"):
    gemma_variants.resolve("gemma2", shapes, "gemma3_4b")
  with pytest.raises(ValueError, match="not a released Gemma variant"):
    gemma_variants.get("gemma4_2b")


@pytest.mark.parametrize("name", list(gemma_variants.VARIANTS))
def test_our_configs_equal_the_gemma_librarys(name):
  """Every field the library's TransformerConfig holds, per layer where it
  varies by layer (Gemma 1 is no longer in the library: the table test above
  covers it)."""
  gm = gemma_library.import_gm()
  if name not in gemma_library.LIBRARY_CLASSES:
    pytest.skip(f"{name} is not in gemma 3.3.0 (checked against the table)")
  theirs = gemma_library.released_config(gm, name)
  ours = gemma_variants.llm_config(name)
  v = gemma_variants.VARIANTS[name]
  _assert_same_model(gm, ours, theirs)
  assert ours.vocab_size == theirs.num_embed
  assert v.gating_transposed == theirs.transpose_gating_einsum


def _assert_same_model(gm, ours: llm.LLMConfig, theirs) -> None:
  assert (ours.embed_dim, ours.mlp_dim, ours.num_heads, ours.head_dim,
          ours.num_kv_heads, ours.num_layers) == (
      theirs.embed_dim, theirs.hidden_dim, theirs.num_heads, theirs.head_dim,
      theirs.num_kv_heads, theirs.num_layers)
  assert ours.query_scalar == pytest.approx(theirs.query_pre_attn_scalar(), rel=1e-12)
  assert ours.attn_logit_softcap == (theirs.attn_logits_soft_cap or 0.0)
  assert ours.final_logit_softcap == (theirs.final_logit_softcap or 0.0)
  assert ours.post_norms == theirs.use_post_attn_norm == theirs.use_post_ffw_norm
  assert ours.qk_norm == theirs.use_qk_norm
  for i, kind in enumerate(theirs.attention_types):
    is_global = kind == gm.nn.AttentionType.GLOBAL
    assert ours.is_global(i) == is_global, f"layer {i}"
    base, scale = ours.rope(i)
    assert (base, scale) == ((theirs.global_base_frequency, theirs.global_scale_factor)
                             if is_global else (theirs.local_base_frequency,
                                                theirs.local_scale_factor)), f"layer {i}"
    if not is_global:
      assert ours.sliding_window == theirs.sliding_window_size


def _tiny(name: str, square: bool = False) -> dict:
  """Test shapes for `name`: embed / heads (8) != head_dim (16), its kind of
  attention (MQA, GQA or MHA: the library fuses q, k, v for MHA), a global
  layer among the first few, and a window (4) shorter than the 10 tokens."""
  v = gemma_variants.VARIANTS[name]
  kv = 1 if v.num_kv_heads == 1 else (4 if v.num_kv_heads == v.num_heads else 2)
  return dict(num_layers=6 if v.family == "gemma3" else 2, embed_dim=32,
              num_heads=4, num_kv_heads=kv, head_dim=16,
              mlp_dim=32 if square else 64, window=4)


CASES = [(name, False) for name in gemma_variants.VARIANTS] + [
    ("gemma2_9b", True), ("gemma2_2b", True), ("gemma3_1b", True)]


@pytest.mark.parametrize("name,square", CASES)
def test_a_checkpoint_the_library_wrote_gives_the_librarys_logits(tmp_path, name,
                                                                  square):
  """The library builds a tiny model with the released variant's constants,
  writes it in the released flat layout, and our loader (told the variant, as
  `config.llm.variant` does; the window shrunk as the library's) restores it to
  the library's logits to 1e-4 and its config field by field. `square` (MLP
  width = embed width) leaves only the variant to say how the gating is stored."""
  gm = gemma_library.import_gm()
  shapes = _tiny(name, square)
  theirs_cfg = gemma_library.shrunk(gm, gemma_library.released_config(gm, name),
                                    **shapes)
  model = gm.nn.Transformer(config=theirs_cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 10), 3, 256)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])
  theirs = np.asarray(model.apply({"params": params}, tokens).logits)
  path = str(tmp_path / name)
  gm.ckpts.save_params(gemma_library.flat_layout(gm, params), path,
                       wait_until_finished=True)

  window = {"sliding_window": 4} if theirs_cfg.sliding_window_size else {}
  cfg, ours_params = gemma_loader.load_checkpoint(path, variant=name, **window)
  _assert_same_model(gm, cfg, theirs_cfg)
  ours, _ = jax.jit(llm.DecoderLM(cfg).apply)({"params": ours_params}, tokens,
                                              jnp.ones((1, 10), bool))
  assert np.abs(np.asarray(ours) - theirs[..., :256]).max() < 1e-4
