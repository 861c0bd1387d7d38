"""Train loop, checkpoint resume, sharding on 8 fake CPU devices, learnability."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
from flax import linen as nn

from infra.errors import Preempted
from conftest import run_workflow
from data import sequences, sources, splits
from infra import checkpoint, mesh as mesh_lib, optim, train_loop
from userllm import next_item
from userllm.models import sequence_model as sm


def _model(config):
  return next_item.build_model(config.model, config.data.synthetic.num_items,
                               config.data.max_len)


def _final_params(config, workdir):
  """The parameters of the latest checkpoint in `workdir`."""
  mesh = mesh_lib.make_mesh(config.mesh)
  template, _ = next_item.init_state(_model(config), optim.make_optimizer(
      config.train), config.seed, mesh)
  restored = checkpoint.Checkpointer(workdir, 1, 1, config.to_dict()
                                      ).restore_or_keep(template)
  return int(restored.step), restored.params


def test_resume_reaches_the_same_parameters(tiny_config, tmp_path):
  straight = tmp_path / "straight"
  run_workflow(tiny_config, straight)

  interrupted = tmp_path / "interrupted"
  tiny_config.train.stop_after_steps = 3
  with pytest.raises(Preempted, match="stop_after_steps=3"):
    run_workflow(tiny_config, interrupted)
  assert _final_params(tiny_config, str(interrupted))[0] == 3
  tiny_config.train.stop_after_steps = 0
  run_workflow(tiny_config, interrupted)  # resumes at 3, trains to 6

  step_a, params_a = _final_params(tiny_config, str(straight))
  step_b, params_b = _final_params(tiny_config, str(interrupted))
  assert step_a == step_b == tiny_config.train.num_steps
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               params_a, params_b)
  # The metrics file holds each logged step once, despite the restart.
  rows = [json.loads(l) for l in open(interrupted / "metrics.jsonl")]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == [2, 3, 4, 6]  # logged every 2 steps and at the stop


def _one_step(config, mesh, windows):
  model = _model(config)
  tx = optim.make_optimizer(config.train)
  state, shardings = next_item.init_state(model, tx, config.seed, mesh)
  step = jax.jit(train_loop.make_train_step(
      functools.partial(sm.next_item_loss, model), tx),
      in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
      out_shardings=(shardings, None))
  batch = mesh_lib.put_batch(windows, mesh)
  new_state, metrics = step(state, batch)
  return new_state, metrics, shardings


def test_sharded_step_equals_single_device(tiny_config):
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  data = sources.load_timelines(tiny_config.data, quiet=True)
  windows = sequences.training_windows(splits.leave_last_out(data).train,
                                       tiny_config.data.max_len)[:16]
  tiny_config.mesh.update(data=1, model=1)
  single, single_metrics, _ = _one_step(
      tiny_config, mesh_lib.make_mesh(tiny_config.mesh, jax.devices()[:1]), windows)
  tiny_config.mesh.update(data=4, model=2)
  sharded, sharded_metrics, shardings = _one_step(
      tiny_config, mesh_lib.make_mesh(tiny_config.mesh), windows)
  embed = shardings.params["item_embed"]["embedding"]
  assert embed.spec[0] == "model"  # the vocab axis really is split
  np.testing.assert_allclose(single_metrics["loss"], sharded_metrics["loss"],
                             rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               single.params, sharded.params)


def test_bad_mesh_is_a_config_error(tiny_config):
  tiny_config.mesh.update(data=3, model=1)
  with pytest.raises(ValueError, match="config.mesh.data=3"):
    mesh_lib.make_mesh(tiny_config.mesh)


def test_model_beats_popularity_on_synthetic(tiny_config, tmp_path):
  tiny_config.data.synthetic.update(num_users=400, mean_extra_events=20.0)
  tiny_config.train.update(num_steps=150, learning_rate=5e-3, warmup_steps=10,
                           log_every=50, eval_every=0, checkpoint_every=150)
  results = run_workflow(tiny_config, tmp_path)
  model, popular = (results["test/model/next_item/recall@10"],
                    results["test/popularity/next_item/recall@10"])
  assert model > 2 * popular and model > popular + 0.1, results


def test_steps_wait_for_each_other_only_on_multi_device_cpu_meshes(tiny_config):
  """XLA:CPU's collectives can deadlock with several steps in flight over
  several devices (train_loop.cpu_collectives_can_deadlock); one device, or an
  accelerator, keeps steps queued."""
  eight = mesh_lib.make_mesh(tiny_config.mesh)
  one = mesh_lib.make_mesh(tiny_config.mesh, jax.devices()[:1])
  assert train_loop.cpu_collectives_can_deadlock(eight)
  assert not train_loop.cpu_collectives_can_deadlock(one)


def test_training_logits_give_the_evaluation_softmax_and_its_gradients():
  """The losses' padded, additively masked logits (`training_logits`) are the
  same softmax as `item_logits` (vocab slice, padding at -inf): equal losses
  and gradients, finite where a target is the padding item."""
  cfg = sm.SequenceModelConfig(vocab_size=201, max_len=6, embed_dim=16,
                               num_layers=1, num_heads=2, mlp_dim=32, dropout=0.0)
  model = sm.ItemSequenceTransformer(cfg)
  windows = np.random.default_rng(0).integers(1, 201, (5, 7)).astype(np.int32)
  windows[0, 4:] = sm.PAD_ITEM  # padded targets: masked out, must stay finite
  params = model.init(jax.random.PRNGKey(0), windows[:, :-1])["params"]

  def reference_loss(p):  # the evaluation logits, by log-softmax
    logits = model.apply({"params": p}, windows[:, :-1])
    log_probs = jax.nn.log_softmax(logits, -1)
    targets = windows[:, 1:]
    picked = jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    is_target = targets != sm.PAD_ITEM
    return -jnp.where(is_target, picked, 0).sum(1) / is_target.sum(1)

  loss = lambda p: sm.next_item_example_losses(  # noqa: E731
      model, p, windows, jax.random.PRNGKey(1), train=False)
  assert model.apply({"params": params}, np.zeros((1, 16), np.float32),
                     method=model.training_logits).shape == (1, 256)
  np.testing.assert_allclose(jax.jit(loss)(params), jax.jit(reference_loss)(params),
                             rtol=1e-6)
  grads, reference_grads = (jax.jit(jax.grad(lambda p: f(p).mean()))(params)
                            for f in (loss, reference_loss))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads, reference_grads)


def test_place_state_lays_given_parameters_out_by_their_logical_axes():
  """Parameters trained before (host arrays) placed by the axes of an
  abstract init: sharded over the mesh as a fresh state would be, the values
  kept, the optimiser state beside them (what RLPF's RL state needs: its
  three LMs replicated on every chip did not fit one)."""
  import optax
  from infra import mesh as mesh_lib
  from userllm.models import llm
  model = llm.DecoderLM(llm.LLMConfig(vocab_size=256, embed_dim=32, num_layers=1,
                                      num_heads=4, num_kv_heads=2, head_dim=16,
                                      mlp_dim=64))
  tokens = jnp.ones((2, 5), jnp.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens,
                                            tokens > 0)["params"])
  trained = jax.tree.map(np.asarray, nn.meta.unbox(model.init(
      jax.random.PRNGKey(1), tokens, tokens > 0)["params"]))
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "model": 4}))
  state, shardings = train_loop.place_state(
      {"a": trained}, {"a": boxed}, optax.adam(1e-3), jax.random.PRNGKey(2), mesh)
  table = state.params["a"]["embedder"]["input_embedding"]
  assert tuple(table.sharding.spec) == ("model", None)
  assert table.addressable_shards[0].data.shape == (64, 32)  # 256 rows / 4
  np.testing.assert_array_equal(np.asarray(table),
                                trained["embedder"]["input_embedding"])
  assert state.opt_state[0].mu["a"]["embedder"]["input_embedding"].sharding == (
      table.sharding)
