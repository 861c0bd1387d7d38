"""Federated User-LLM (federated/user_llm_task.py): the clients train the user
encoder, Perceiver, projector and the LLM's cross-attention blocks over a
frozen LLM held once. The split takes exactly the user path; the round
vmapped equals the loop over clients, also under mixed FL's datacenter loss
(which reads the frozen LLM too); the LLM goes out of every round bit for bit
as it came in while the user path moves; the scorer's rows end where the
training rows' answer begins; the workflow runs and bad fields are one-line
errors."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import REPO
from federated import frozen_base, llm_workflow, runs
from infra import mesh as mesh_lib
from infra.errors import ConfigError
from test_federated_algorithms import assert_trees_close
from userllm import user_llm as ul
from userllm.models import adapters as adapters_lib


def tiny_config(**federated):
  from configs import federated_llm
  config = federated_llm.get_config("tiny")
  config.federated.update(task="user_llm", client_chunk=0, **federated)
  config.adapter.kind = "none"
  config.mesh.update(data=1, model=1)
  return config


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("federated_user_llm"))


def build(config, vocab_dir):
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  return llm_workflow.build(config, vocab_dir, mesh), mesh


def random_base(f, seed=1):
  """The warm-up's LLM tree at random weights (the round's algebra needs no
  warm-up)."""
  model = llm_workflow.base_model(f.task)
  tokens = jnp.ones((1, 4), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), tokens, tokens > 0)
                       ["params"])


def test_the_clients_train_the_user_path_and_the_llm_is_the_warm_ups(vocab_dir):
  """Trained: encoder, Perceiver, projector, the title projection,
  cross-attention blocks (their gates too); frozen: exactly the warm-up
  LLM's tree (its embeddings, which the title path reads, too); merged back
  whole."""
  f, _ = build(tiny_config(), vocab_dir)
  whole = nn.meta.unbox(f.task.init_params(jax.random.PRNGKey(0)))
  trained, frozen = f.task.split_params(whole)
  # (item_text: the titles' projection from the frozen LLM's embeddings)
  assert set(trained) == {"encoder", "perceiver", "projector", "title_norm",
                          "title_projection", "llm"}
  assert all(k.startswith("cross_attention_") for k in trained["llm"])
  gates = [p for p, _ in jax.tree_util.tree_leaves_with_path(trained)
           if "gate" in jax.tree_util.keystr(p)]
  assert gates
  base = random_base(f)
  assert (jax.tree.map(np.shape, frozen)
          == jax.tree.map(np.shape, f.task.frozen_of_base(base)))
  assert f.task.base_of_frozen(f.task.frozen_of_base(base)) is base
  merged = adapters_lib.merge_trees(trained, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(whole)
  for path, _ in jax.tree_util.tree_leaves_with_path(frozen):
    assert ul.part_of(tuple(k.key for k in path)) == "llm"


def test_rows_hold_the_history_then_the_prompt_then_the_answer(vocab_dir):
  config = tiny_config()
  f, _ = build(config, vocab_dir)
  rows, owners = f.task.client_examples(f.split.train)
  h = config.data.history_len
  assert rows.shape == (len(owners), h + len(f.task.head) + 1)
  assert rows.dtype == np.int32
  assert (rows[:, :h] <= f.timelines.num_items).all()
  assert (rows[:, h:-1] == np.asarray(f.task.head)).all()
  assert f.task.text.is_title[rows[:, -1]].all()
  # a window's answer is the item after its history, as a title piece
  windows, _ = f.task.windows(f.split.train)
  lengths = (windows != 0).sum(1) - 1  # the last real item answers
  answers = windows[np.arange(len(windows)), lengths]
  assert (rows[:, -1] == f.task.text.piece_of_item[answers]).all()
  # the scorer reads the same layout without the answer
  prompts = f.task.prompts(rows[:, :h], lengths)
  np.testing.assert_array_equal(prompts, rows[:, :-1])


def vmapped_and_looped(config, f, mesh, rounds=2):
  state, _ = llm_workflow.init_state(config, f, mesh, random_base(f))
  vmapped = jax.jit(frozen_base.round_step(llm_workflow.make_round(config, f, mesh)))
  loop = llm_workflow.make_round(config, f, mesh, looped=True)
  sampler = runs.cohorts(config, f)
  a = b = state
  before = jax.device_get(state)
  for r in range(rounds):
    cohort = sampler(r)
    a, metrics_a = vmapped(a, cohort)
    b, metrics_b = loop(b, cohort, b.frozen)
    assert_trees_close(a.params, b.params, atol=1e-5)
    assert_trees_close(metrics_a, metrics_b, atol=2e-5)
  return before, a, metrics_a


def test_vmapped_round_equals_looped_and_leaves_the_llm_alone(vocab_dir):
  """Under mixed FL (parallel), whose server loss is the task's loss on the
  server's users over the same frozen LLM (tests/test_federated_llm.py
  checks the adapters' round without one)."""
  config = tiny_config(clients_per_round=4, local_epochs=2)
  config.federated.mixed.update(server_loss="datacenter", weight=1.0,
                                central_learning_rate=0.5, central_steps=2)
  config.federated.datacenter.update(users="genre", server_batch_size=8)
  f, mesh = build(config, vocab_dir)
  before, after, metrics = vmapped_and_looped(config, f, mesh)
  assert np.isfinite(float(metrics["server_loss"]))
  for a, b in zip(jax.tree.leaves(before.frozen),
                  jax.tree.leaves(jax.device_get(after.frozen))):
    np.testing.assert_array_equal(a, b)
  moved = {part: any(not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(before.params[part]),
      jax.tree.leaves(jax.device_get(after.params[part]))))
           for part in before.params}
  assert all(moved.values()), moved


def test_the_server_loss_moves_the_user_path(vocab_dir):
  """Mixed FL's datacenter term over the frozen LLM: with the clients'
  learning rate at zero, the server's own steps alone move the params."""
  config = tiny_config(clients_per_round=4, client_optimizer="sgd",
                       client_learning_rate=0.0)
  config.federated.mixed.update(server_loss="datacenter", weight=1.0,
                                central_learning_rate=0.5)
  config.federated.datacenter.update(users="genre", server_batch_size=8)
  f, mesh = build(config, vocab_dir)
  before, _ = llm_workflow.init_state(config, f, mesh, random_base(f))
  before = jax.device_get(before)
  round_fn = jax.jit(frozen_base.round_step(llm_workflow.make_round(config, f, mesh)))
  after, metrics = round_fn(before, runs.cohorts(config, f)(0))
  assert float(metrics["delta_norm"]) == 0.0  # the clients did not move
  changed = [not np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(before.params), jax.tree.leaves(jax.device_get(after.params)))]
  assert any(changed)


@pytest.mark.parametrize("field,value,named", [
    ("encoder.fusion", "early", "config.encoder.fusion"),
    ("userllm.integration", "text", "config.userllm.integration"),
    ("userllm.num_latents", 0, "config.userllm.num_latents"),
    ("userllm.cross_attention_every", 0, "config.userllm.cross_attention_every"),
    ("federated.datacenter.server_batch_size", 10_000,
     "config.federated.datacenter.server_batch_size"),
])
def test_bad_fields_are_errors_naming_them(vocab_dir, field, value, named):
  config = tiny_config()
  config.federated.mixed.update(server_loss="datacenter", weight=1.0)
  config.federated.datacenter.users = "genre"
  section, name = field.rsplit(".", 1)
  target = config
  for part in section.split("."):
    target = target[part]
  target[name] = value
  with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
    build(config, vocab_dir)


def test_the_workflow_runs_and_reports_the_user_path(tmp_path):
  """main.py end to end on the tiny config (soft-prompt integration): a
  finite result, no adapters, the user path's parameters counted; a bad
  task is a one-line error with exit code 2."""
  command = [sys.executable, "main.py", "--config", "configs/federated_llm.py:tiny",
             "--config.federated.task=user_llm", "--config.adapter.kind=none",
             "--config.userllm.integration=soft_prompt",
             "--config.train.num_steps=2", "--config.train.eval_every=0",
             "--workdir", str(tmp_path / "run")]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  import json
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  values = results.get("results", results)
  assert values["adapter_parameters"] == 0 and values["trained_parameters"] > 0
  assert np.isfinite(values["out_of_sample/model/next_title/recall@10_mean"])
  bad = subprocess.run(command[:4] + ["--config.federated.task=user_lm",
                                      "--workdir", str(tmp_path / "bad")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert "config.federated.task='user_lm'" in bad.stderr.strip().splitlines()[-1]


def test_the_adapters_runs_identity_leaves_the_user_llms_sections_out():
  """An adapters run (task next_title) never reads `encoder` / `userllm`, so
  its checkpoints do not depend on them; a User-LLM run's do."""
  config = tiny_config()
  assert {"encoder", "userllm"} <= set(llm_workflow.identity(config))
  config.federated.task = "next_title"
  adapters_identity = llm_workflow.identity(config)
  assert not {"encoder", "userllm"} & set(adapters_identity)
  config.userllm.num_latents = 99
  assert llm_workflow.identity(config) == adapters_identity
