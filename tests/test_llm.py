"""The decoder LM: masking, KV cache, cross-attention gates, soft prompts, the
Gemma loader and tokenizer, and sharding on 8 fake devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
from flax import linen as nn

from data.vocab import Tokenizer
from infra import mesh as mesh_lib
from userllm.models import adapters, decoding, gemma_loader, gemma_variants, llm

# head_dim (16) != embed_dim / num_heads (8), as in released Gemmas (2B: 256 vs
# 256, 7B: 256 vs 192, Gemma 2 27B: 128 vs 144): a scale or reshape taken from
# the wrong one of them shows in every test
CFG = llm.LLMConfig(vocab_size=61, embed_dim=32, num_layers=3, num_heads=4,
                    num_kv_heads=2, head_dim=16, mlp_dim=64)


def _init(cfg, tokens, mask, **kwargs):
  model = llm.DecoderLM(cfg)
  params = model.init(jax.random.PRNGKey(0), tokens, mask, **kwargs)["params"]
  return model, nn.meta.unbox(params)


def _randomise(params, seed=1):
  """Non-zero everything (norm scales and LoRA B start at zero)."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape)
                                   for k, x in zip(keys, leaves)])


def _tokens(b=2, t=9, seed=3):
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (b, t), 3, CFG.vocab_size)
  mask = jnp.ones((b, t), bool).at[0, :3].set(False)  # row 0 left-padded
  return tokens, mask


def test_no_attention_to_padding_or_future():
  tokens, mask = _tokens()
  model, params = _init(CFG, tokens, mask)
  params = _randomise(params)
  logits, _ = jax.jit(model.apply)({"params": params}, tokens, mask)
  changed = tokens.at[0, :3].set(5).at[:, 6:].set(7)  # padding and the future
  changed_logits, _ = jax.jit(model.apply)({"params": params}, changed, mask)
  np.testing.assert_allclose(logits[0, 3:6], changed_logits[0, 3:6],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[1, :6], changed_logits[1, :6],
                             rtol=1e-5, atol=1e-5)
  assert np.abs(logits[:, 6:] - changed_logits[:, 6:]).max() > 1e-3
  # a left-padded row reads exactly like the same tokens unpadded
  unpadded, _ = jax.jit(model.apply)({"params": params}, tokens[:1, 3:], mask[:1, 3:])
  np.testing.assert_allclose(logits[0, 3:], unpadded[0], rtol=1e-5, atol=1e-5)


def _assert_chunked_decoding_equals_full(cfg):
  """Decoding a prompt, one token and a chunk through the KV cache gives the
  full forward's logits at every real position. Returns (model, params,
  tokens, mask)."""
  tokens, mask = _tokens(t=10)
  model, params = _init(cfg, tokens, mask)
  params = _randomise(params)
  full, _ = jax.jit(model.apply)({"params": params}, tokens, mask)
  cache = llm.init_cache(cfg, 2, 12)
  pieces = []
  for start, stop in ((0, 4), (4, 5), (5, 10)):  # a prompt, one token, a chunk
    out, cache = jax.jit(model.apply)({"params": params}, tokens[:, start:stop],
                             mask[:, start:stop], cache=cache)
    pieces.append(out)
  np.testing.assert_allclose(np.where(mask[..., None], full, 0),
                             np.where(mask[..., None], jnp.concatenate(pieces, 1), 0),
                             rtol=1e-5, atol=1e-5)
  return model, params, tokens, mask


def test_kv_cache_decoding_equals_full_recomputation():
  model, params, tokens, mask = _assert_chunked_decoding_equals_full(CFG)

  # greedy generation == argmax of a full forward at every step: one causal
  # forward over prompt + generated tokens gives every step's logits at once
  generated = decoding.generate(model, params, tokens, mask, jax.random.PRNGKey(0),
                                max_new_tokens=5, eos_id=-1)
  sequence = jnp.concatenate([tokens, generated[:, :5]], 1)
  seq_mask = jnp.concatenate([mask, jnp.ones((2, 5), bool)], 1)
  logits, _ = jax.jit(model.apply)({"params": params}, sequence, seq_mask)
  t = tokens.shape[1]
  np.testing.assert_array_equal(generated[:, :5], logits[:, t - 1:t + 4].argmax(-1))


def test_recomputed_layers_give_the_same_parameters_values_and_gradients():
  """llm.remat: the same parameter tree, logits, gradients (LoRA adapters on
  a Gemma-2-style LM with sliding windows) and greedy decoding."""
  import dataclasses
  cfg = dataclasses.replace(
      CFG, post_norms=True, sliding_window=4, global_every=2,
      adapter=adapters.AdapterConfig(kind="lora", rank=2, targets=("q", "down")))
  tokens, mask = _tokens()
  model, params = _init(cfg, tokens, mask)
  params = _randomise(params)
  remat = llm.DecoderLM(dataclasses.replace(cfg, remat=True))
  _, remat_params = _init(dataclasses.replace(cfg, remat=True), tokens, mask)
  assert jax.tree.structure(remat_params) == jax.tree.structure(params)
  loss = lambda m: lambda p: jnp.mean(  # noqa: E731
      m.apply({"params": p}, tokens, mask)[0] ** 2)
  np.testing.assert_allclose(loss(remat)(params), loss(model)(params), rtol=1e-6)
  grads = jax.grad(loss(model))(params)
  remat_grads = jax.grad(loss(remat))(params)
  # the layers are rematerialised (a `remat` of each block in the program)
  program = lambda m: str(jax.make_jaxpr(jax.grad(loss(m)))(params))  # noqa: E731
  assert program(remat).count("remat") >= cfg.num_layers
  assert "remat" not in program(model)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat_grads, grads)
  generate = lambda m: decoding.generate(  # noqa: E731
      m, params, tokens, mask, jax.random.PRNGKey(0), max_new_tokens=4, eos_id=-1,
      temperature=0.0)
  np.testing.assert_array_equal(generate(remat), generate(model))


def test_sampling_stops_at_eos_and_is_reproducible_by_key():
  tokens, mask = _tokens()
  model, params = _init(CFG, tokens, mask)
  params = _randomise(params)
  a = decoding.generate(model, params, tokens, mask, jax.random.PRNGKey(0),
                        max_new_tokens=12, temperature=1.0, eos_id=4)
  b = decoding.generate(model, params, tokens, mask, jax.random.PRNGKey(1),
                        max_new_tokens=12, temperature=1.0, eos_id=4)
  assert not np.array_equal(a, b)
  again = decoding.generate(model, params, tokens, mask, jax.random.PRNGKey(0),
                            max_new_tokens=12, temperature=1.0, eos_id=4)
  np.testing.assert_array_equal(a, again)  # reproducible by seed
  for row in np.asarray(a):
    if 4 in row.tolist():
      assert (row[row.tolist().index(4) + 1:] == 0).all()


def test_score_continuations_equals_full_forward():
  tokens, mask = _tokens()
  model, params = _init(CFG, tokens, mask)
  params = _randomise(params)
  candidates = jnp.array([[5, 6, 7, 0], [8, 0, 0, 0], [9, 10, 11, 12]])
  cand_mask = candidates > 0
  scores = decoding.score_continuations(model, params, tokens, mask, candidates,
                                        cand_mask)
  for i in range(2):
    for j in range(3):
      seq = jnp.concatenate([tokens[i:i + 1], candidates[j:j + 1]], 1)
      seq_mask = jnp.concatenate([mask[i:i + 1], cand_mask[j:j + 1]], 1)
      logits, _ = jax.jit(model.apply)({"params": params}, seq, seq_mask)
      target = jnp.zeros_like(seq_mask).at[:, 9:].set(cand_mask[j:j + 1])
      expected = decoding.token_log_likelihood(logits, seq, target)[0]
      np.testing.assert_allclose(scores[i, j], expected, rtol=1e-5, atol=1e-5)


def test_cross_attention_with_zero_gates_leaves_the_llm_unchanged():
  tokens, mask = _tokens()
  user = jax.random.normal(jax.random.PRNGKey(4), (2, 5, CFG.embed_dim))
  plain_model, plain = _init(CFG, tokens, mask)
  plain = _randomise(plain)
  cross_cfg = llm.LLMConfig(**{**CFG.__dict__, "cross_attention_every": 1})
  cross_model, cross = _init(cross_cfg, tokens, mask, user_tokens=user)
  assert sorted(k for k in cross if k.startswith("cross_attention_")) == [
      "cross_attention_0", "cross_attention_1", "cross_attention_2"]
  cross = {**cross, **plain}  # same LLM weights; cross blocks fresh (gates 0)
  expected, _ = jax.jit(plain_model.apply)({"params": plain}, tokens, mask)
  got, _ = jax.jit(cross_model.apply)({"params": cross}, tokens, mask, user_tokens=user)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # opening a gate makes the user matter
  opened = jax.tree.map(lambda x: x, cross)
  opened["cross_attention_0"] = {**cross["cross_attention_0"], "attn_gate": 1.0}
  changed, _ = jax.jit(cross_model.apply)({"params": opened}, tokens, mask, user_tokens=user)
  assert np.abs(changed - expected).max() > 1e-3


def test_soft_prompt_of_length_zero_equals_the_plain_llm():
  tokens, mask = _tokens()
  model, params = _init(CFG, tokens, mask)
  params = _randomise(params)
  plain, _ = jax.jit(model.apply)({"params": params}, tokens, mask)
  empty = jnp.zeros((2, 0, CFG.embed_dim))
  prefixed, _ = jax.jit(model.apply)({"params": params}, tokens, mask, prefix=empty,
                            prefix_mask=jnp.zeros((2, 0), bool))
  np.testing.assert_allclose(prefixed, plain, atol=1e-6)
  # a real soft prompt changes the outputs and adds its positions
  prefix = jax.random.normal(jax.random.PRNGKey(5), (2, 3, CFG.embed_dim))
  longer, _ = jax.jit(model.apply)({"params": params}, tokens, mask, prefix=prefix,
                          prefix_mask=jnp.ones((2, 3), bool))
  assert longer.shape[1] == 12 and np.abs(longer[:, 3:] - plain).max() > 1e-3


@pytest.mark.parametrize("num_kv_heads,fuse_qkv", [(2, False), (4, True), (1, False)])
def test_gemma_checkpoint_round_trips(tmp_path, num_kv_heads, fuse_qkv):
  cfg = llm.LLMConfig(**{**CFG.__dict__, "num_kv_heads": num_kv_heads,
                         "vocab_size": 256})
  tokens, mask = _tokens()
  model, params = _init(cfg, tokens, mask)
  params = _randomise(params)
  path = gemma_loader.save_checkpoint(params, str(tmp_path / "ckpt"), fuse_qkv)
  flat = gemma_loader.to_gemma_layout(params, fuse_qkv)
  assert ("transformer/layer_0/attn/qkv_einsum" in flat) == fuse_qkv
  # the released layout: every Einsum weight, the MLP's included, is {"w": x}
  assert flat["transformer/layer_2/mlp/gating_einsum"]["w"].shape == (2, 32, 64)
  assert flat["transformer/layer_2/mlp/linear"]["w"].shape == (64, 32)

  loaded_cfg, loaded = gemma_loader.load_checkpoint(path)
  assert loaded_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.device_get(params))
  expected, _ = jax.jit(model.apply)({"params": params}, tokens, mask)
  got, _ = jax.jit(llm.DecoderLM(loaded_cfg).apply)({"params": loaded}, tokens, mask)
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_gemma_library_nested_layout_loads_the_same(tmp_path):
  """`model.init()["params"]` of the gemma library: no transformer root, the
  MLP weights as plain arrays, the attention Einsums as {"w": x}."""
  tokens, mask = _tokens()
  _, params = _init(CFG, tokens, mask)
  params = jax.device_get(_randomise(params))
  nested = {"embedder": {"input_embedding": params["embedder"]["input_embedding"]},
            "final_norm": params["final_norm"]}
  for i in range(CFG.num_layers):
    layer = params[f"layer_{i}"]
    nested[f"layer_{i}"] = {
        "pre_attention_norm": layer["pre_attention_norm"],
        "pre_ffw_norm": layer["pre_ffw_norm"],
        "attn": {k: {"w": v} for k, v in layer["attn"].items()},
        "mlp": {"gating_einsum": layer["mlp"]["gating_einsum"],
                "linear": layer["mlp"]["linear"]}}
  released_cfg, released = gemma_loader.convert(gemma_loader.to_gemma_layout(params))
  nested_cfg, loaded = gemma_loader.convert(nested)
  assert nested_cfg == released_cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, released)


@pytest.mark.parametrize("extra,named", [
    ("transformer/layer_1/post_attention_norm", "layer_1/post_attention_norm/scale"),
    ("transformer/layer_2/attn/_key_norm", "layer_2/attn/_key_norm/scale"),
    ("transformer/layer_2/mlp/bias", "layer_2/mlp/bias/scale")])
def test_gemma_loader_names_every_key_it_does_not_map(extra, named):
  tokens, mask = _tokens()
  _, params = _init(CFG, tokens, mask)
  flat = gemma_loader.to_gemma_layout(params)
  flat[extra] = {"scale": np.zeros(32)}
  with pytest.raises(ValueError, match=f"does not map: transformer/{named}"):
    gemma_loader.convert(flat)


def test_gemma_loader_refuses_other_layouts(tmp_path):
  tokens, mask = _tokens()
  _, params = _init(CFG, tokens, mask)
  flat = gemma_loader.to_gemma_layout(params)
  flat["transformer/layer_0/post_attention_norm"] = {"scale": np.zeros(32)}
  # post-norms in the first layer make it Gemma 2: then every layer needs them
  with pytest.raises(ValueError, match="layer_0/post_ffw_norm/scale is missing"):
    gemma_loader.convert(flat)
  flat = gemma_loader.to_gemma_layout(params)
  flat["transformer/stacked_layers/attn/q_einsum"] = {"w": np.zeros(3)}
  with pytest.raises(ValueError, match="does not map: transformer/stacked_layers"):
    gemma_loader.convert(flat)
  with pytest.raises(ValueError, match="not a Gemma checkpoint"):
    gemma_loader.convert({"encoder/w": np.zeros(3)})
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gemma_loader.load_checkpoint(str(tmp_path / "missing"))


def test_gemma_style_tokenizer(tmp_path):
  """A SentencePiece model with Gemma's ids (pad 0, eos 1, bos 2, unk 3)."""
  prefix = str(tmp_path / "tok")
  texts = ["Watched: The Silent Harbor; Night of Stars. Next title:"] * 20 + [
      "Favourite genre: Drama", "Comedy Action Thriller"] * 10
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=60,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False,
      minloglevel=2)
  tok = Tokenizer(prefix + ".model")
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  ids = tok.encode(["Night of Stars"])[0]
  assert tok.decode(ids + [tok.eos_id, 9, 9]) == "Night of Stars"
  padded, pad_mask = tok.pad([ids, ids[:1]], 4, left=True)
  assert pad_mask[1].tolist() == [False, False, False, True]
  assert padded[0].tolist() == ids[-4:]


def test_sharded_forward_equals_one_device():
  """data=4 x model=2 over 8 fake CPU devices: same logits as one device."""
  assert jax.device_count() == 8
  cfg = llm.LLMConfig(**{**CFG.__dict__, "num_heads": 4, "cross_attention_every": 2,
                         "adapter": adapters.AdapterConfig("lora", rank=2)})
  tokens, mask = _tokens(b=8)
  user = jax.random.normal(jax.random.PRNGKey(4), (8, 5, cfg.embed_dim))
  model = llm.DecoderLM(cfg)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, mask,
                                            user_tokens=user)["params"])
  params = _randomise(nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens, mask,
                                               user_tokens=user)["params"]))
  expected, _ = jax.jit(model.apply)({"params": params}, tokens, mask, user_tokens=user)

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  shardings = mesh_lib.logical_shardings(boxed, mesh)
  assert tuple(shardings["embedder"]["input_embedding"].spec) == ("model", None)
  sharded = jax.device_put(params, shardings)
  batch = mesh_lib.put_batch((np.asarray(tokens), np.asarray(mask),
                              np.asarray(user)), mesh)
  got, _ = jax.jit(lambda p, b: jax.jit(model.apply)({"params": p}, b[0], b[1],
                                            user_tokens=b[2]))(sharded, batch)
  # float reassociation of the sharded matmuls only
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=5e-4)
  assert len(got.sharding.device_set) == 8

  # config.mesh.fsdp: `embed` over data too, for every state placed on the
  # mesh (train_loop), and a train step's loss and update are the same
  from infra import train_loop
  import optax
  fsdp = mesh_lib.make_mesh(ml_collections.ConfigDict(
      {"data": 4, "model": 2, "fsdp": True}))
  assert mesh_lib.rules_of(fsdp) == mesh_lib.FSDP_RULES
  tx = optax.sgd(0.1)
  init = lambda rng: model.init(rng, tokens, mask, user_tokens=user)["params"]  # noqa: E731
  loss = lambda p, b, rng: (jnp.mean(model.apply(  # noqa: E731
      {"params": p}, b[0], b[1], user_tokens=b[2])[0] ** 2), {})
  step = train_loop.make_train_step(loss, tx)
  after = {}
  for name, config in (("plain", {"data": 4, "model": 2}),
                       ("fsdp", {"data": 4, "model": 2, "fsdp": True})):
    on = mesh_lib.make_mesh(ml_collections.ConfigDict(config))
    state, shardings = train_loop.create_state(init, tx, jax.random.PRNGKey(0), on)
    spec = tuple(shardings.params["embedder"]["input_embedding"].spec)
    assert spec == (("model", "data") if name == "fsdp" else ("model", None))
    state, metrics = jax.jit(step)(state, mesh_lib.put_batch(
        (np.asarray(tokens), np.asarray(mask), np.asarray(user)), on))
    after[name] = (float(metrics["loss"]), jax.device_get(state.params))
  assert after["fsdp"][0] == pytest.approx(after["plain"][0], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               after["fsdp"][1], after["plain"][1])
  # a mesh built again without fsdp takes the plain rules back
  mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  assert mesh_lib.rules_of(fsdp) == mesh_lib.LOGICAL_RULES


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llm.LLMConfig(vocab_size=10, num_heads=4, num_kv_heads=3).validate()
  with pytest.raises(ValueError, match="head_dim"):
    llm.LLMConfig(vocab_size=10, head_dim=7).validate()


# Each family's switches at test scale: windows shorter than the 10 tokens, a
# global layer among the 3, RoPE scaling on; the reference gets the same values.
FAMILIES = {
    "gemma1": ({}, dict()),
    "gemma2": (dict(post_norms=True, attn_logit_softcap=5.0, final_logit_softcap=3.0,
                    sliding_window=4, global_every=2, query_scale=0.2),
               dict(attn_softcap=5.0, final_softcap=3.0, window=4, pattern=2,
                    query_scalar=0.2)),
    "gemma3": (dict(post_norms=True, qk_norm=True, sliding_window=3, global_every=2,
                    rope_global_wavelength=1000, rope_global_scale=8.0),
               dict(window=3, pattern=2, global_base=1000.0, global_scale=8.0)),
}


def _family_model(family: str):
  import gemma_reference
  switches, settings = FAMILIES[family]
  cfg = llm.LLMConfig(**{**CFG.__dict__, "vocab_size": 256, **switches})
  tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 10), 3, 256)
  model, params = _init(cfg, tokens, jnp.ones((1, 10), bool))
  return (cfg, model, jax.device_get(_randomise(params)), tokens,
          gemma_reference.Settings(family=family, **settings))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_matches_the_clean_room_gemma_forward(family):
  """Our decoder == an independent float64 numpy forward of the published
  architecture (tests/gemma_reference.py) to 1e-4, for Gemma 1, 2 and 3."""
  import gemma_reference
  cfg, model, params, tokens, settings = _family_model(family)
  ours, _ = jax.jit(model.apply)({"params": params}, tokens, jnp.ones((1, 10), bool))
  reference = gemma_reference.forward(gemma_loader.to_gemma_layout(params),
                                      np.asarray(tokens[0]), settings)
  assert np.abs(np.asarray(ours[0]) - reference[:, :cfg.vocab_size]).max() < 1e-4


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_2_and_3_checkpoints_load_with_their_family(tmp_path, family):
  """Released-layout Gemma 2/3 checkpoints: the family comes from the keys
  (Gemma 3 stores the MLP gating transposed), its constants from the family's
  default variant (these shapes are no released model's), and with the test's
  own window and caps the loaded model computes what the saved one did."""
  cfg, model, params, tokens, _ = _family_model(family)
  flat = gemma_loader.to_gemma_layout(params)
  gating = flat["transformer/layer_0/mlp/gating_einsum"]["w"].shape
  assert gating == ((2, 64, 32) if family == "gemma3" else (2, 32, 64))
  path = gemma_loader.save_checkpoint(params, str(tmp_path / family))
  loaded_cfg, loaded = gemma_loader.load_checkpoint(path)
  expected = gemma_variants.family_fields(gemma_variants.FAMILY_DEFAULTS[family],
                                          cfg.embed_dim, cfg.num_heads, cfg.head_dim)
  assert all(getattr(loaded_cfg, k) == v for k, v in expected.items())
  assert loaded_cfg.query_scalar == cfg.head_dim ** -0.5 != (
      cfg.embed_dim // cfg.num_heads) ** -0.5
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  # with the test's own window and caps, the loaded parameters give its logits
  same = llm.LLMConfig(**{**cfg.__dict__})
  mask = jnp.ones((1, 10), bool)
  got, _ = jax.jit(llm.DecoderLM(same).apply)({"params": loaded}, tokens, mask)
  want, _ = jax.jit(model.apply)({"params": params}, tokens, mask)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_gemma3_vision_tower_is_refused_or_dropped_by_name():
  _, _, params, _, _ = _family_model("gemma3")
  flat = gemma_loader.to_gemma_layout(params)
  flat["SigLiPFromPatches_0/siglip_encoder/embedding"] = {"kernel": np.zeros(3)}
  flat["transformer/embedder"]["mm_input_projection"] = {"w": np.zeros((4, 32))}
  with pytest.raises(ValueError, match="SigLiPFromPatches_0, embedder/"
                     "mm_input_projection.*drop_vision=True"):
    gemma_loader.convert(flat)
  cfg, loaded = gemma_loader.convert(flat, drop_vision=True)
  assert cfg.qk_norm and "mm_input_projection" not in loaded["embedder"]


def test_sliding_window_kv_cache_decoding_equals_full_recomputation():
  """Local layers in decoding read the cache's positions: chunked decoding with
  a 3-token window (a left-padded row included) equals one full forward."""
  _assert_chunked_decoding_equals_full(
      llm.LLMConfig(**{**CFG.__dict__, **FAMILIES["gemma3"][0]}))


def test_gemma_checkpoint_restores_sharded_onto_the_mesh(tmp_path):
  """With a mesh, every array is restored split over the 8 devices and
  converted there (the 7B+ path: no host holds the model), equal to the host
  load; merging it into a model keeps it on device."""
  cfg = llm.LLMConfig(**{**CFG.__dict__, "vocab_size": 256, "num_kv_heads": 4,
                         **FAMILIES["gemma3"][0]})
  tokens, mask = _tokens()
  _, params = _init(cfg, tokens, mask)
  params = jax.device_get(_randomise(params))
  path = gemma_loader.save_checkpoint(params, str(tmp_path / "ckpt"), fuse_qkv=True)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "model": 4}))
  host_cfg, on_host = gemma_loader.load_checkpoint(path)
  mesh_cfg, on_mesh = gemma_loader.load_checkpoint(path, mesh=mesh)
  assert mesh_cfg == host_cfg
  table = on_mesh["embedder"]["input_embedding"]  # [256, 32]: split 8 ways
  assert isinstance(table, jax.Array) and len(table.sharding.device_set) == 8
  assert table.addressable_shards[0].data.shape == (32, 32)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(on_mesh), on_host)
  merged = gemma_loader.merge_pretrained(jax.tree.map(jnp.zeros_like, params),
                                         on_mesh)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))


def test_a_file_that_is_no_tokenizer_or_checkpoint_is_a_model_file_error(tmp_path):
  """User errors (exit 2 through main), naming the file: not a traceback."""
  from infra.errors import USER_ERRORS, ModelFileError
  garbage = tmp_path / "tokenizer.model"
  garbage.write_bytes(b"not a protobuf")
  with pytest.raises(ModelFileError, match=f"{garbage} is not a SentencePiece model"):
    Tokenizer(str(garbage))
  tokens, mask = _tokens()
  _, params = _init(CFG, tokens, mask)
  flat = gemma_loader.to_gemma_layout(params)
  del flat["transformer/layer_1/mlp/linear"]
  with pytest.raises(ModelFileError, match="layer_1/mlp/linear is missing"):
    gemma_loader.convert(flat)
  assert issubclass(ModelFileError, USER_ERRORS)
