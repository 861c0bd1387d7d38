"""The federated LLM task (federated/llm_task.py, frozen_base.py,
llm_workflow.py): clients train adapters of a frozen base LLM. The round
vmapped equals the loop over clients, sharded equals one device, the base is
never written, a client costs adapters and activations (XLA's compiled
memory, not the base), the prompts are the tokenizer's own text, and the
workflow runs, resumes to the same result and names bad config fields."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, ConfigReads, run_workflow
from federated import algorithms, clients, frozen_base, llm_workflow, runs
from infra import mesh as mesh_lib
from userllm.models import adapters as adapters_lib
from infra.errors import ConfigError, Preempted
from test_federated_algorithms import assert_trees_close


def tiny_config(**adapter):
  from configs import federated_llm
  config = federated_llm.get_config("tiny")
  config.adapter.update(adapter)
  return config


def one_device(config):
  config.mesh.update(data=1, model=1)
  return mesh_lib.make_mesh(config.mesh, jax.devices()[:1])


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  """One workdir whose spm.model every build in this file shares."""
  return str(tmp_path_factory.mktemp("federated_llm"))


def build(config, vocab_dir, mesh):
  return llm_workflow.build(config, vocab_dir, mesh)


def random_base(f, seed=1):
  """A base LLM (no warm-up: the round's algebra does not need one)."""
  whole = jax.tree.map(lambda x: x, f.task.init_params(jax.random.PRNGKey(seed)))
  from flax import linen as nn
  return adapters_lib.split_adapters(nn.meta.unbox(whole))[1]


def cohorts(config, f, rounds):
  sampler = clients.CohortSampler(f.dataset, config.federated.clients_per_round,
                                  config.seed)
  return [sampler(r) for r in range(rounds)]


def test_split_and_merge_are_inverse_and_adapters_are_the_only_params(vocab_dir):
  config = tiny_config(kind="mode")
  f = build(config, vocab_dir, one_device(config))
  whole = f.task.init_params(jax.random.PRNGKey(0))
  adapters, base = adapters_lib.split_adapters(whole)
  assert jax.tree.structure(adapters_lib.merge_adapters(adapters, base)) == jax.tree.structure(
      whole)
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(adapters)]
  assert names and all("_adapter']" in n for n in names)
  assert not any("_adapter" in jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(base))


def test_prompts_are_the_tokenizers_own_text(vocab_dir, tiny_timelines):
  """The rows built from ids decode to the prompt text and encode back to
  the same ids; every title is one piece."""
  config = tiny_config()
  f = build(config, vocab_dir, one_device(config))
  from data.vocab import Tokenizer
  tokenizer = Tokenizer(f"{vocab_dir}/spm.model")
  items = tiny_timelines.items
  history = np.asarray([[3, 7, 11, 0]])
  row = f.task.text.prompts(history, np.asarray([3]))[0]
  text = (f"Watched: {items.titles[3]} {items.titles[7]} {items.titles[11]}. "
          "Next title:")
  assert tokenizer.encode([text])[0] == [int(i) for i in row if i]
  assert tokenizer.decode(row) == text
  examples, owners = f.task.client_examples(f.split.train)
  assert examples.shape[1] == f.task.text.width(config.data.history_len,
                                                answer=True)
  answer_pieces = examples[:, -1]
  assert f.task.text.is_title[answer_pieces].all()  # every row ends in a title
  assert len(owners) == len(examples)


def vmapped_and_looped(config, f, mesh, rounds=2):
  base = random_base(f)
  state, _ = llm_workflow.init_state(config, f, mesh, base)
  vmapped = jax.jit(frozen_base.round_step(llm_workflow.make_round(config, f, mesh)))
  loop = llm_workflow.make_round(config, f, mesh, looped=True)
  a = b = state
  a_base = jax.device_get(state.frozen)
  for cohort in cohorts(config, f, rounds):
    a, metrics_a = vmapped(a, cohort)
    b, metrics_b = loop(b, cohort, b.frozen)
    # Adam's normalised steps carry float rounding of the two orders of
    # summation into the 1e-6s
    assert_trees_close(a.params, b.params, atol=1e-5)
    assert_trees_close(a.client_states, b.client_states, atol=1e-5)
    assert_trees_close(metrics_a, metrics_b, atol=2e-5)
  return a, a_base


def test_vmapped_round_equals_looped_and_leaves_the_base_alone(vocab_dir):
  """MoDE adapters, FELLRec's per-client adapters (the sharded test below
  runs LoRA)."""
  config = tiny_config(kind="mode")
  config.federated.update(personalisation="fellrec", client_chunk=0,
                          local_epochs=2)
  mesh = one_device(config)
  f = build(config, vocab_dir, mesh)
  state, base_before = vmapped_and_looped(config, f, mesh)
  # the base goes out bit for bit as it came in; the adapters moved
  jax.tree.map(np.testing.assert_array_equal, base_before,
               jax.device_get(state.frozen))
  assert float(jnp.abs(state.params["layer_0"]["attn"]["q_adapter"]["b"]).sum()) > 0


def test_sharded_round_equals_single_device_round(vocab_dir):
  """LoRA, FELLRec's adapters per client; the round chunked as on CPU."""
  config = tiny_config()
  config.federated.update(personalisation="fellrec", local_epochs=2)
  one = one_device(config)
  f = build(config, vocab_dir, one)
  base = random_base(f)
  results = {}
  for name, mesh in (("one", one), ("sharded", mesh_lib.make_mesh(
      ml_collections.ConfigDict({"data": 4, "model": 2})))):
    state, shardings = llm_workflow.init_state(config, f, mesh, base)
    step = jax.jit(frozen_base.round_step(llm_workflow.make_round(config, f, mesh)),
                   in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                   out_shardings=(shardings, None))
    for cohort in cohorts(config, f, 2):
      state, metrics = step(state, mesh_lib.put_batch(cohort, mesh))
    results[name] = (state, metrics, shardings)
  single, metrics_1, _ = results["one"]
  sharded, metrics_8, shardings = results["sharded"]
  table = sharded.frozen["embedder"]["input_embedding"]
  assert shardings.frozen["embedder"]["input_embedding"].spec[0] == "model"
  assert len(table.sharding.device_set) == 8  # the base over the model axis
  assert shardings.client_states["params"]["layer_0"]["attn"]["q_adapter"][
      "a"].spec[0] == "data"  # each client's adapters over the data axis
  assert_trees_close(single.params, sharded.params, atol=2e-5)
  assert_trees_close(metrics_1, metrics_8, atol=2e-5)
  rows = len(f.dataset)
  assert_trees_close(jax.tree.map(lambda t: t[:rows], single.client_states),
                     jax.tree.map(lambda t: t[:rows], sharded.client_states),
                     atol=2e-5)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(single.frozen),
               jax.device_get(sharded.frozen))


def round_memory(config, f, mesh, base, cohort_size, copy_base=False):
  """XLA's compiled memory of one round at `cohort_size` clients (the whole
  cohort in one vmap), and the bytes of the cohort's data. `copy_base`
  compiles the design this task must not have: a base per client."""
  state, _ = llm_workflow.init_state(config, f, mesh, base)
  cohort = clients.CohortSampler(f.dataset, cohort_size, config.seed)(0)
  round_fn = algorithms.make_round(f.task.example_loss, f.client_spec, f.server_spec)
  if copy_base:
    frozen = jax.tree.map(lambda x: np.broadcast_to(x, (cohort_size,) + x.shape),
                          jax.device_get(state.frozen))
    update = algorithms.make_client_update(f.task.example_loss, f.client_spec)

    def step(state, cohort, frozen):
      per_client = (algorithms.cohort_client_states(state, cohort),
                    cohort["examples"], cohort["num_examples"],
                    algorithms.client_rngs(state, cohort["client_ids"]))
      deltas, states, metrics = jax.vmap(
          lambda xs, fz: update(state.params, *xs, None, fz))(per_client, frozen)
      return algorithms.finish_round(state, deltas, states, metrics, cohort,
                                     f.server_spec)
    memory = frozen_base.compiled_memory(step, state, cohort, frozen)
  else:
    memory = frozen_base.compiled_memory(frozen_base.round_step(round_fn), state,
                                         cohort)
  return memory, frozen_base.tree_bytes(cohort)


def test_memory_per_client_is_adapters_and_activations_not_the_base(vocab_dir):
  """From XLA's compiled memory analysis of the vmapped round at 2 and at 8
  clients: what one more client adds (arguments beyond its own examples, and
  temporaries) is far below the base, and at least its own adapters; a
  round that copied the base per client adds at least the base."""
  config = tiny_config()
  # a base 8x what one client's activations take (rows of 10 tokens): LLMs
  # hold far more weights per token of activations than this
  config.llm.update(embed_dim=256, mlp_dim=512)
  config.data.history_len = 2
  config.federated.update(client_batch_size=1, client_optimizer="sgd")
  mesh = one_device(config)
  f = build(config, vocab_dir, mesh)
  base = random_base(f)
  base_bytes = frozen_base.tree_bytes(base)
  adapter_bytes = frozen_base.tree_bytes(adapters_lib.split_adapters(
      f.task.init_params(jax.random.PRNGKey(0)))[0])

  def growth(copy_base):
    (m2, data2), (m8, data8) = (round_memory(config, f, mesh, base, n, copy_base)
                                for n in (2, 8))
    arguments = ((m8["argument"] - data8) - (m2["argument"] - data2)) / 6
    return arguments, (m8["temp"] - m2["temp"]) / 6

  arguments, temp = growth(copy_base=False)
  print(f"per client: arguments {arguments:.0f} B, temporaries {temp:.0f} B; "
        f"base {base_bytes} B, adapters {adapter_bytes} B")
  assert abs(arguments) <= 16  # base and adapters are arguments once (+ alignment)
  assert adapter_bytes <= temp < base_bytes / 4
  copied_arguments, copied_temp = growth(copy_base=True)
  assert copied_arguments + copied_temp >= base_bytes


def test_bad_config_values_are_one_line_errors_naming_the_field(tmp_path):
  cases = {("adapter", "kind", "lora2"): "config.adapter.kind='lora2'",
           ("adapter", "kind", "none"): "config.adapter.kind='none'",
           ("adapter", "rank", 0): "config.adapter.rank=0",
           ("data", "title_pieces", False): "config.data.title_pieces",
           ("federated", "task", "next_item"): "config.federated.task='next_item'",
           ("task", "history_lm_weight", -1.0): "config.task.history_lm_weight=-1.0",
           ("data", "history_len", 0): "config.data.history_len=0"}
  for (section, field, value), message in cases.items():
    config = tiny_config()
    config[section][field] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
      llm_workflow.check(config)
  config = tiny_config()
  config.federated.aggregator = "dp"  # no federated.dp section to read
  with pytest.raises(ConfigError, match="needs a config.federated.dp section"):
    runs.dp_budget(config, 10)
  result = subprocess.run(
      [sys.executable, "main.py", "--config", "configs/federated_llm.py:tiny",
       "--workdir", str(tmp_path), "--config.adapter.kind=lora2"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config.adapter.kind='lora2' is not one of ('none', 'lora', "
      "'molora', 'mode', 'molora_sd')"]


def test_the_workflow_writes_results_and_resumes_to_the_same_result(tmp_path):
  config = tiny_config()
  config.train.stop_after_steps = 2
  with pytest.raises(Preempted, match="stopped at round 2 of 4"):
    run_workflow(config, tmp_path / "resumed")
  config.train.stop_after_steps = 0
  resumed = run_workflow(config, tmp_path / "resumed")
  with ConfigReads() as reads:
    straight = run_workflow(config, tmp_path / "straight")
  assert reads.unread(config) == []  # every field of the config is read
  key = "out_of_sample/model/next_title/recall@10_mean"
  assert resumed[key] == pytest.approx(straight[key], abs=1e-6)
  assert resumed["rounds"] == 4
  for split in ("in_sample", "out_of_sample", "non_participating"):
    for scorer in ("model", "popularity"):
      assert 0.0 <= resumed[f"{split}/{scorer}/next_title/recall@10_mean"] <= 1.0
  assert 0.0 <= resumed["out_of_sample/base_continuation/next_title/ndcg@10_p50"] <= 1
  # a round moves the adapters only: 2 x rank x width x 4 projections x 2
  # layers (+ ...), far less than the base
  assert resumed["client_bytes_up"] == resumed["model_bytes"] == 4 * resumed[
      "adapter_parameters"]
  assert resumed["frozen_bytes"] == 4 * resumed["base_parameters"]
  assert resumed["client_bytes_up"] < resumed["frozen_bytes"] / 10
  assert resumed["client_flops"] > 0 and resumed["client_temp_bytes"] > 0


def test_dp_on_adapters_meets_its_clip_bound(vocab_dir):
  """DP-FedAvg through the same round: with no noise the server's adapter
  update is the clipped clients' sum over the cohort size, so its norm is
  at most clip_norm, and every client was clipped (clip far below their
  update norms); the base is untouched."""
  config = tiny_config()
  clip = 1e-4
  config.federated.update(aggregator="dp", weighting="uniform",
                          server_learning_rate=1.0)
  config.federated.dp = ml_collections.ConfigDict(dict(
      clip_norm=clip, noise_multiplier=0.0, target_epsilon=0.0, delta=1e-5,
      accountant="rdp", target_quantile=0.0, clip_learning_rate=0.2))
  mesh = one_device(config)
  f = build(config, vocab_dir, mesh)
  state, _ = llm_workflow.init_state(config, f, mesh, random_base(f))
  base = jax.device_get(state.frozen)
  before = jax.device_get(state.params)
  step = jax.jit(frozen_base.round_step(llm_workflow.make_round(config, f, mesh)))
  after, metrics = step(state, cohorts(config, f, 1)[0])
  moved = np.sqrt(sum(float(np.sum((np.asarray(a) - b) ** 2)) for a, b in zip(
      jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(before))))
  assert 0 < moved <= clip * (1 + 1e-4)
  assert float(metrics["dp_clipped_fraction"]) == 1.0
  jax.tree.map(np.testing.assert_array_equal, base, jax.device_get(after.frozen))


def test_local_only_adapters_keep_each_clients_own_update():
  from federated import personalisation
  local = personalisation.LocalOnly()
  server = {"a": jnp.array([1.0, 2.0])}
  deltas = {"a": jnp.array([[0.5, 0.0], [0.0, -1.0], [3.0, 3.0]])}
  states = {"params": {"a": jnp.zeros((3, 2))}, "trained": jnp.array([False] * 3)}
  new, metrics = local.personalise(states, server, deltas, jnp.ones(3),
                                   jnp.array([1.0, 1.0, 0.0]), jnp.asarray(0))
  assert metrics == {}
  np.testing.assert_allclose(new["params"]["a"], server["a"] + deltas["a"])
  np.testing.assert_array_equal(new["trained"], [True, True, False])
