"""infra/aot.py on the suite's 8 fake CPU devices: a tiny Gemma-style LM's
train step compiled against abstract inputs (no parameters materialised),
its per-device memory and cost read back, its largest arrays' shardings
named by mesh axis. The same function compiles the TPU configs for a TPU
slice (benchmarks/userllm/tpu_compile.py, with libtpu installed)."""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

from infra import aot, mesh as mesh_lib, train_loop
from summarize import rlpf
from userllm.models import llm

TINY = llm.LLMConfig(vocab_size=500, embed_dim=32, num_layers=1, num_heads=8,
                     num_kv_heads=1, head_dim=4, mlp_dim=64)


def tiny_train_step(mesh, batch: int = 8, length: int = 16):
  """(step, abstract (state, batch), in_shardings, out_shardings) of the LM's
  warm-up step (rlpf.lm_loss) on `mesh`."""
  model, tx = llm.DecoderLM(TINY), optax.adam(1e-3)
  init = lambda rng: model.init(rng, jnp.zeros((1, 2), jnp.int32),  # noqa: E731
                                jnp.ones((1, 2), bool))["params"]
  state, shardings = aot.abstract_train_state(init, tx, mesh)
  tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  data = aot.with_shardings({"tokens": tokens, "token_mask": tokens,
                             "target_mask": tokens}, mesh_lib.batch_sharding(mesh))
  step = train_loop.make_train_step(functools.partial(rlpf.lm_loss, model), tx)
  return step, (state, data), (shardings, mesh_lib.batch_sharding(mesh)), (
      shardings, None)


def test_a_step_compiles_from_shapes_with_its_memory_cost_and_shardings():
  mesh = aot.slice_mesh(jax.devices()[:8], data=2, model=4)
  step, args, in_shardings, out_shardings = tiny_train_step(mesh)
  report = aot.compile_step(step, args, in_shardings, out_shardings, (0,))

  # memory is one device's: its shards of the state and batch, not the whole
  per_device = sum(aot.chip_bytes(x) for x in jax.tree.leaves(args))
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args))
  assert 0 < report.argument_bytes == per_device < whole
  assert report.output_bytes > 0 and report.alias_bytes > 0  # the state, donated
  assert report.peak_bytes >= report.argument_bytes - report.alias_bytes
  assert report.flops > 0 and report.bytes_accessed > 0
  seconds, source = report.step_seconds(aot.CHIPS["v5e"])
  assert seconds > 0 and source in ("xla", "roofline")
  assert 0 < report.mfu_bound(aot.CHIPS["v5e"]) <= 1

  # the embedding (500 rows padded to 512) is the largest, its rows on `model`
  largest = aot.largest_arrays(args[0], 2)
  embedding = largest[0]
  assert embedding["path"].endswith("embedder/input_embedding")
  assert embedding["shape"] == [512, 32] and "model" in embedding["spec"]
  assert embedding["chip_bytes"] == 512 * 32 * 4 // 4


def test_the_same_step_on_another_mesh_holds_less_per_device():
  """Parameters sharded 8 ways instead of 4 put fewer bytes on each device."""
  state_bytes = []
  for data, model in ((2, 4), (1, 8)):
    mesh = aot.slice_mesh(jax.devices()[:8], data=data, model=model)
    _, (state, _), _, _ = tiny_train_step(mesh)
    state_bytes.append(sum(aot.chip_bytes(x) for x in jax.tree.leaves(state)))
  assert state_bytes[1] < state_bytes[0]


def test_a_dimension_the_mesh_cannot_split_is_refused_as_placing_it_would_be():
  mesh = aot.slice_mesh(jax.devices()[:8], data=2, model=4)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "model"))
  with pytest.raises(ValueError, match="1683"):  # User-LLM's item head on ML-100K
    aot.with_shardings(jax.ShapeDtypeStruct((64, 1683), jnp.float32), sharding)


def test_the_compilers_out_of_memory_line_is_kept():
  message = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory "
             "in memory space hbm. Used 21.3G of 15.75G hbm. Exceeded hbm capacity "
             "by 5.6G.\n\nTotal hbm usage >= 21.8G:\n    reserved  530.00M")
  assert aot.OUT_OF_MEMORY.search(message)
  assert aot.out_of_memory_line(message).startswith("RESOURCE_EXHAUSTED")
  assert "Used 21.3G of 15.75G hbm" in aot.out_of_memory_line(message)


def test_an_unknown_slice_is_named():
  with pytest.raises(ValueError, match="v9-8"):
    aot.topology_devices("v9-8")


def rl_step_compiled(mesh, lora_rank: int, dtype: str) -> aot.CompileReport:
  """RLPF's RL step (summarize/workflow.py's models and state, as
  benchmarks/userllm/tpu_compile.py builds them for a slice) compiled on
  `mesh` from abstract shapes, for the whole policy or LoRA adapters."""
  import dataclasses
  from configs import rlpf as rlpf_config
  from summarize import workflow
  config = rlpf_config.get_config("tiny")
  config.rl.lora_rank, config.llm.dtype = lora_rank, dtype
  lm = llm.DecoderLM(dataclasses.replace(TINY, dtype=dtype))
  rl = rlpf.RLConfig(summary_len=4, group_size=1, baseline="value")
  policy, value = workflow.rl_models(config, lm, rl)
  prompt = jnp.zeros((1, 2), jnp.int32)

  def init(rng):
    fresh = lambda model, key, part=lambda p: p: part(model.init(  # noqa: E731
        jax.random.fold_in(rng, key), prompt, prompt > 0)["params"])
    warm = fresh(lm, 1)
    return workflow.rl_state_params(policy, value, warm, warm, fresh,
                                    workflow.frozen_dtype(config))
  labels = jax.eval_shape(lambda: init(jax.random.PRNGKey(0)))
  tx = rlpf.rl_optimizer(optax.adam(1e-3), labels)
  state, shardings = aot.abstract_train_state(init, tx, mesh)
  b, p, k, t = 8, 12, 2, 3
  tokens = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  batch = aot.with_shardings(
      {"prompt": tokens(b, p), "prompt_mask": jax.ShapeDtypeStruct((b, p), bool),
       "options": tokens(b, k, t), "option_mask": jax.ShapeDtypeStruct((b, k, t), bool),
       "answer": tokens(b)}, mesh_lib.batch_sharding(mesh))
  step = rlpf.make_rl_step(policy, value, lm, tx, rl, [3], [4], eos_id=1)
  return aot.compile_step(train_loop.guard_step(step, False), (state, batch),
                          (shardings, mesh_lib.batch_sharding(mesh)),
                          (shardings, None), (0,))


def test_rl_as_lora_over_a_bfloat16_base_holds_less_per_device():
  """The layouts benchmarks/userllm/tpu_compile.py tries for RLPF compile on
  a 2 x 4 mesh, and each step holds less a device than the one before:
  whole policy in float32 > whole policy with its frozen reference and
  predictor in bfloat16 > LoRA over one bfloat16 base."""
  mesh = aot.slice_mesh(jax.devices()[:8], data=2, model=4)
  reports = [rl_step_compiled(mesh, 0, "float32"), rl_step_compiled(mesh, 0, "bfloat16"),
             rl_step_compiled(mesh, 4, "bfloat16")]
  arguments = [r.argument_bytes for r in reports]
  assert arguments[0] > arguments[1] > arguments[2] > 0, arguments
  assert all(r.peak_bytes >= r.argument_bytes - r.alias_bytes for r in reports)


@pytest.mark.parametrize("step", ["rlpf_rl", "rlpf_rollout"])
def test_the_tpu_benchmarks_rlpf_builders_compile_on_cpu_devices(step):
  """benchmarks/userllm/tpu_compile.py's own builders of RLPF's RL step and
  its sampling alone, for the whole policy and for LoRA over a frozen base
  (the layouts it tries), compiled on a mesh of 8 CPU devices from the
  tiny RLPF config: what it compiles for a TPU slice, on devices every test
  machine has (4 x 2: the tiny LM's 2 heads split over `model`)."""
  import types
  from benchmarks.userllm import tpu_compile
  from configs import rlpf as rlpf_config
  mesh = aot.slice_mesh(jax.devices()[:8], data=4, model=2)
  args = types.SimpleNamespace(prompt_tokens=4, title_tokens=3)
  for layout in (tpu_compile.Layout("config", 4, 2),
                 tpu_compile.Layout("fsdp+lora2+remat", 4, 2, mesh_lib.FSDP_RULES,
                                    lora_rank=2, remat=True)):
    config = rlpf_config.get_config("tiny")
    built = tpu_compile.BUILDERS[step](config, 64, mesh, layout, 8, args)
    report = aot.compile_step(built.fn, built.args, built.in_shardings,
                              built.out_shardings, built.donate_argnums)
    assert report.flops > 0 and report.argument_bytes > 0, (layout.name, report)
