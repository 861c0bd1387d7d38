"""Adapters (LoRA, MoLoRA, MoDE, MoLoRA-SD) on the decoder LM's projections:
no-op at init, gradients only to adapters, merged LoRA, one-expert mixtures equal
LoRA, parameter counts, routing, and sharding on 8 fake devices."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from infra import mesh as mesh_lib
from userllm import user_llm as ul
from userllm.models import adapters, llm

BASE = llm.LLMConfig(vocab_size=61, embed_dim=16, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, mlp_dim=24)
ALL = adapters.TARGETS
MIXTURES = ("molora", "mode", "molora_sd")


def _config(kind, **fields):
  fields = {"rank": 3, "num_experts": 2, "num_tasks": 3, "targets": ALL, **fields}
  return dataclasses.replace(BASE, adapter=adapters.AdapterConfig(kind, **fields))


def _inputs(b=2, t=7):
  tokens = jax.random.randint(jax.random.PRNGKey(3), (b, t), 3, BASE.vocab_size)
  mask = jnp.ones((b, t), bool).at[0, :2].set(False)
  return tokens, mask, jnp.arange(b, dtype=jnp.int32) % 3


def _init(cfg, seed=0):
  tokens, mask, task_ids = _inputs()
  model = llm.DecoderLM(cfg)
  params = model.init(jax.random.PRNGKey(seed), tokens, mask, task_ids=task_ids)
  return model, nn.meta.unbox(params["params"])


def _randomise(params, seed=1, only_adapters=False):
  """Non-zero leaves (norm scales, B and task routers start at zero)."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
  new = [0.3 * jax.random.normal(k, x.shape)
         if not only_adapters or _is_adapter(path) else x
         for k, (path, x) in zip(keys, flat)]
  return jax.tree.unflatten(jax.tree.structure(params), new)


def _is_adapter(path) -> bool:
  return any(str(k.key).endswith(adapters.SUFFIX) for k in path)


def _forward(model, params, tokens=None, task_ids=None):
  default_tokens, mask, default_tasks = _inputs()
  tokens = default_tokens if tokens is None else tokens
  task_ids = default_tasks if task_ids is None else task_ids
  return model.apply({"params": params}, tokens, mask, task_ids=task_ids)[0]


def _base_params(params):
  """The tree without its adapter subtrees."""
  if not isinstance(params, dict):
    return params
  return {k: _base_params(v) for k, v in params.items()
          if not k.endswith(adapters.SUFFIX)}


@pytest.mark.parametrize("kind,router,top_k", [
    ("lora", "token", 0), ("molora", "token_task", 1), ("mode", "task", 0),
    ("molora_sd", "token", 2)])
def test_fresh_adapters_leave_the_llm_unchanged(kind, router, top_k):
  model, params = _init(_config(kind, router=router, top_k=top_k))
  randomised = _randomise(params)
  # B zero again (everything else random): the adapter must be a no-op
  fresh = jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if _is_adapter(path) and path[-1].key == "b"
      else x, randomised)
  expected = _forward(llm.DecoderLM(BASE), _base_params(fresh))
  np.testing.assert_allclose(_forward(model, fresh), expected, atol=1e-5)
  assert np.abs(_forward(model, randomised) - expected).max() > 1e-3


@pytest.mark.parametrize("kind", ["lora", "molora", "mode", "molora_sd"])
def test_gradients_reach_only_adapter_parameters(kind):
  model = ul.UserLLM(ul.UserLLMConfig(encoder=None, llm=_config(kind, router="token_task"),
                                      integration="text"))
  tokens, mask, task_ids = _inputs()
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), None, tokens, mask,
                                    task_ids=task_ids)["params"])
  params = _randomise(params)  # B != 0, so routers and A get gradients too
  trainable = ul.trainable_mask(params, "adapters")
  batch = {"tokens": tokens, "token_mask": mask, "target_mask": mask,
           "task_ids": task_ids}
  grads = jax.grad(lambda p: ul.lm_loss(model, trainable, p, batch,
                                        jax.random.PRNGKey(0))[0])(params)
  for (path, grad), trains in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree.leaves(trainable)):
    assert trains == _is_adapter(path), path
    if trains:
      assert np.abs(grad).max() > 0, path
    else:
      assert np.abs(grad).max() == 0, path


def test_merged_lora_equals_unmerged():
  cfg = _config("lora")
  model, params = _init(cfg)
  params = _randomise(params)
  merged, merged_cfg = adapters.merge_lora(params, cfg)
  assert adapters.tree_count(merged) == 0 and not merged_cfg.adapter.enabled
  np.testing.assert_allclose(_forward(llm.DecoderLM(merged_cfg), merged),
                             _forward(model, params), rtol=1e-4, atol=1e-4)
  assert adapters.tree_count(params) > 0  # the input tree is left alone
  with pytest.raises(ValueError, match="only adapter.kind='lora' merges"):
    adapters.merge_lora(*_init(_config("mode"))[1:], _config("mode"))


@pytest.mark.parametrize("kind", MIXTURES)
def test_one_expert_mixture_is_lora(kind, router="token_task"):
  lora_model, lora = _init(_config("lora"))
  lora = _randomise(lora)
  model, params = _init(_config(kind, num_experts=1, router=router), seed=5)
  params = _randomise(params, seed=6)  # routers anything: one expert gets weight 1

  def copy_lora(path, x):
    if not _is_adapter(path) or path[-1].key not in ("a", "b"):
      return x
    node = lora
    for k in path:
      node = node[k.key]
    return node[None] if node.ndim < x.ndim else node  # MoLoRA's A: [1, in, r]
  params = jax.tree_util.tree_map_with_path(copy_lora, params)
  params = jax.tree_util.tree_map_with_path(  # and the same base weights
      lambda path, x: x if _is_adapter(path) else _lookup(lora, path), params)
  np.testing.assert_allclose(_forward(model, params), _forward(lora_model, lora),
                             rtol=1e-5, atol=1e-5)


def _lookup(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("kind", ["lora", *MIXTURES])
@pytest.mark.parametrize("router", ["token", "task", "token_task"])
def test_parameter_counts_match_the_formulas(kind, router):
  cfg = _config(kind, router=router)
  _, params = _init(cfg)
  assert adapters.tree_count(params) == adapters.formula_count(cfg.adapter, cfg)


def test_parameter_count_by_hand_and_equal_budgets():
  # q on a 16-wide model: I = 16, O = 4 heads x 8 = 32; r = 3, E = 2, token router
  q_only = lambda kind, **f: _config(kind, targets=("q",), **f)  # noqa: E731
  per_layer = {"lora": 3 * (16 + 32), "molora": 2 * 3 * (16 + 32) + 16 * 2,
               "mode": 3 * 16 + 2 * 3 * 32 + 16 * 3 * 2,
               "molora_sd": 3 * 16 + 2 * 3 * 32 + 16 * 2}
  for kind, count in per_layer.items():
    cfg = q_only(kind)
    assert adapters.formula_count(cfg.adapter, cfg) == BASE.num_layers * count
  # E = r: MoDE and MoLoRA are the same size on every projection
  even = {k: _config(k, rank=2, num_experts=2) for k in ("molora", "mode")}
  assert len({adapters.formula_count(c.adapter, c) for c in even.values()}) == 1
  budget = adapters.formula_count(even["molora"].adapter, even["molora"])
  matched = adapters.match_budget(adapters.AdapterConfig("lora", targets=ALL),
                                  BASE, budget)
  ranks = {r: abs(adapters.formula_count(dataclasses.replace(matched, rank=r),
                                         BASE) - budget) for r in range(1, 20)}
  assert ranks[matched.rank] == min(ranks.values())


def test_top_k_routing_keeps_k_experts():
  cfg = adapters.AdapterConfig("molora", rank=2, num_experts=4, top_k=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6))
  router = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  gates = adapters._route(cfg, x, router, None, None)
  assert gates.shape == (3, 5, 4)
  np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
  assert ((gates > 0).sum(-1) == 2).all()
  logits = jnp.einsum("bti,ie->bte", x, router)
  top2 = jnp.argsort(logits, -1)[..., -2:]
  assert (jnp.take_along_axis(gates, top2, -1) > 0).all()


def test_task_routing_reads_the_task_id():
  for router, depends in (("task", True), ("token", False)):
    model, params = _init(_config("mode", router=router))
    params = _randomise(params)
    tasks = _inputs()[2]
    moved = np.abs(_forward(model, params, task_ids=tasks) -
                   _forward(model, params, task_ids=(tasks + 1) % 3)).max()
    assert (moved > 1e-4) == depends, router
  task_model, task_params = _init(_config("mode", router="task"))
  with pytest.raises(ValueError, match="needs task_ids"):
    task_model.apply({"params": task_params}, *_inputs()[:2])


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="adapter.kind='moe'"):
    _config("moe").validate()
  with pytest.raises(ValueError, match="adapter.targets"):
    _config("lora", targets=("q", "wo")).validate()
  with pytest.raises(ValueError, match="adapter.top_k=3"):
    _config("molora", top_k=3).validate()
  with pytest.raises(ValueError, match="needs num_tasks"):
    _config("molora", router="task", num_tasks=0).validate()


@pytest.mark.parametrize("kind", ["mode", "molora"])  # LoRA: tests/test_llm.py
def test_adapters_shard_on_8_devices_with_the_same_outputs(kind):
  """data=4 x model=2: heads and MLP (and their adapters' B) over `model`."""
  assert jax.device_count() == 8
  cfg = _config(kind, router="token_task")
  tokens = jax.random.randint(jax.random.PRNGKey(3), (8, 7), 3, BASE.vocab_size)
  mask = jnp.ones((8, 7), bool)
  task_ids = jnp.arange(8, dtype=jnp.int32) % 3
  model = llm.DecoderLM(cfg)
  init = functools.partial(model.init, jax.random.PRNGKey(0), tokens, mask,
                           task_ids=task_ids)
  boxed = jax.eval_shape(lambda: init()["params"])
  params = _randomise(nn.meta.unbox(init()["params"]))
  expected, _ = model.apply({"params": params}, tokens, mask, task_ids=task_ids)

  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  shardings = mesh_lib.logical_shardings(boxed, mesh)
  q_b = shardings["layer_0"]["attn"]["q_adapter"]["b"].spec
  down_a = shardings["layer_0"]["mlp"]["down_adapter"]["a"].spec
  assert "model" in tuple(q_b) and "model" in tuple(down_a)
  sharded = jax.device_put(params, shardings)
  batch = mesh_lib.put_batch((np.asarray(tokens), np.asarray(mask),
                              np.asarray(task_ids)), mesh)
  got, _ = jax.jit(lambda p, b: model.apply({"params": p}, b[0], b[1],
                                            task_ids=b[2]))(sharded, batch)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=5e-4)
  assert len(got.sharding.device_set) == 8
