"""Using a finished workdir (main.py --mode, docs/using.md) on the tiny
configs: eval restores every stage and trains none, recommend / answer /
summarize print JSON and write <workdir>/use/, and export writes the LLM in
the released Gemma layout (LoRA merged, MoDE beside its base weights, the
User-LLM's parts beside it), which our loader and the `gemma` library (when
installed) read back to the same logits.

One trained workdir per workflow (module fixtures); the modes run in-process
through the workflow functions, and once per workflow through main.py."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import gemma_library
from conftest import REPO, run_workflow
from configs import default, rlpf as rlpf_config, user_llm as user_llm_config
from data import prompts, sources
from infra import mesh as mesh_lib, workdir as workdir_lib
from infra.errors import ConfigError, WorkdirError
from summarize import workflow as rlpf_workflow
from userllm import export, next_item_workflow, use
from userllm import workflow as user_llm_workflow
from userllm.models import adapters, gemma_loader, gemma_variants, llm
from userllm import user_llm as ul

TINY_SHAPES = dict(num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=64)  # embed / heads = 8 != head_dim
ROWS = 384  # the checkpoint's embedding rows (> the tiny vocabulary's pieces)


def one_device_mesh(config):
  return mesh_lib.make_mesh(config.mesh, jax.devices()[:1])


def run_main(config: str, workdir, *args):
  return subprocess.run([sys.executable, "main.py", "--config", config,
                         "--workdir", str(workdir), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


def refused(result, *needles) -> str:
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-3000:]
  assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr
  for needle in needles:
    assert needle in lines[-1], lines[-1]
  return lines[-1]


def steps_on_disk(workdir) -> dict:
  """{stage checkpoint directory: its step directories with mtimes}."""
  found = {}
  for root, dirs, _ in os.walk(workdir):
    if os.path.basename(root) == "checkpoints":
      found[root] = {d: os.stat(os.path.join(root, d)).st_mtime_ns for d in dirs}
  return found


# --- next_item --------------------------------------------------------------------

@pytest.fixture(scope="module")
def next_item_run(tmp_path_factory):
  """A finished configs/default.py:tiny run: (config, workdir, its results)."""
  config = default.get_config("tiny")
  workdir = tmp_path_factory.mktemp("next_item")
  with workdir_lib.claim(str(workdir), config.workflow, process_index=0):
    results = run_workflow(config, workdir)
  return config, workdir, results


def test_recommend_prints_json_alone_on_stdout_and_writes_it(next_item_run):
  config, workdir, _ = next_item_run
  result = run_main("configs/default.py:tiny", workdir, "--mode=recommend",
                    "--users=5,1", "--k=3")
  assert result.returncode == 0, result.stderr[-3000:]
  payload = json.loads(result.stdout)  # nothing else on stdout
  assert "[data] synthetic" in result.stderr  # progress went there
  assert json.load(open(workdir / "use" / "recommendations.json")) == payload
  timelines = sources.load_timelines(config.data, quiet=True)
  # users named by their ids in the data files: the synthetic ids are 1..N
  assert [(u["user"], u["index"]) for u in payload["users"]] == [(5, 4), (1, 0)]
  for user in payload["users"]:
    seen = set(timelines.items.raw_ids[timelines.user_items(user["index"])])
    recommended = [r["item"] for r in user["recommendations"]]
    assert len(recommended) == 3 and not seen & set(recommended)
    scores = [r["score"] for r in user["recommendations"]]
    assert scores == sorted(scores, reverse=True)
    assert 0 < sum(r["probability"] for r in user["recommendations"]) < 1


def test_eval_restores_and_trains_nothing_and_an_unfinished_stage_is_named(
    next_item_run):
  config, workdir, trained = next_item_run
  before = steps_on_disk(workdir)
  again = next_item_workflow.evaluate(config, str(workdir), one_device_mesh(config))
  assert again["steps"] == trained["steps"] == 6
  for key in [k for k in trained if k.startswith("test/")]:
    assert again[key] == pytest.approx(trained[key], abs=1e-6), key
  assert steps_on_disk(workdir) == before  # no step trained, none saved
  longer = config.copy_and_resolve_references()
  longer.train.num_steps = 8
  with pytest.raises(WorkdirError, match=r"stage train is not finished: its "
                     r"latest checkpoint is step 6 of config.train.num_steps=8"):
    next_item_workflow.evaluate(longer, str(workdir), one_device_mesh(longer))
  assert steps_on_disk(workdir) == before


def test_a_mode_the_workflow_has_not_and_unknown_users_are_one_line_errors(
    next_item_run, tmp_path):
  config, workdir, _ = next_item_run
  refused(run_main("configs/default.py:tiny", workdir, "--mode=summarize",
                   "--users=1"),
          "--mode=summarize: the next_item workflow has no summarize mode",
          "its modes are train, eval, recommend")
  with pytest.raises(WorkdirError, match="does not exist: train a run there first"):
    use.check_workdir(str(tmp_path / "none"), "next_item")
  with pytest.raises(WorkdirError, match="holds a next_item run and this config's "
                     "workflow is rlpf"):
    use.check_workdir(str(workdir), "rlpf")
  lock = workdir / workdir_lib.LOCK  # as a live run on this host holds it
  lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": "now"}))
  try:
    with pytest.raises(WorkdirError, match=f"is in use by process {os.getpid()}"):
      use.check_workdir(str(workdir), "next_item")
  finally:
    lock.unlink()
  mesh = one_device_mesh(config)
  with pytest.raises(ConfigError, match=r"user id 65 is not in .*its 64 users "
                     r"have ids 1\.\.64"):
    next_item_workflow.recommend(config, str(workdir), mesh, ["1", "65"], 3)
  with pytest.raises(ConfigError, match="'x1' is not a user id"):
    next_item_workflow.recommend(config, str(workdir), mesh, ["x1"], 3)


def test_a_next_event_is_appended_to_the_asked_users_only(next_item_run):
  config, _, _ = next_item_run
  timelines = sources.load_timelines(config.data, quiet=True)
  users = np.array([7, 2])
  asked = use.with_next_event(timelines, users, np.array([11, 12]))
  for user in range(timelines.num_users):
    extra = {7: [11], 2: [12]}.get(user, [])
    np.testing.assert_array_equal(asked.user_items(user),
                                  list(timelines.user_items(user)) + extra)
  assert asked.num_events == timelines.num_events + 2


# --- user_llm ---------------------------------------------------------------------

def released_checkpoint(path, family: str) -> str:
  """A tiny checkpoint in the released layout, written with its family's
  default variant's constants and MLP gating orientation; every weight drawn
  at scale 0.2 so that each part shows in the logits."""
  variant = gemma_variants.FAMILY_DEFAULTS[family]
  cfg = llm.LLMConfig(vocab_size=ROWS, **TINY_SHAPES, **gemma_variants.family_fields(
      variant, TINY_SHAPES["embed_dim"], TINY_SHAPES["num_heads"],
      TINY_SHAPES["head_dim"]))
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(llm.DecoderLM(cfg).init(jax.random.PRNGKey(0), tokens,
                                                 tokens > 0)["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape)
                                     for k, x in zip(keys, leaves)])
  return gemma_loader.save_checkpoint(params, str(path),
                                      transpose_gating=variant.gating_transposed)


def user_llm_overrides(checkpoint: str, kind: str, method: str) -> dict:
  return {"llm.checkpoint": checkpoint, "adapter.kind": kind,
          "userllm.method": method, "userllm.strategy": "adapters",
          "userllm.eval_valid": False}


def user_llm_run(tmp_path_factory, family: str, kind: str, method: str):
  """configs/user_llm.py:tiny from a tiny released-layout Gemma checkpoint of
  `family`, with `kind` adapters trained (strategy "adapters"), finished."""
  root = tmp_path_factory.mktemp(f"user_llm_{kind}")
  checkpoint = released_checkpoint(root / "gemma", family)
  overrides = user_llm_overrides(checkpoint, kind, method)
  config = user_llm_config.get_config("tiny")
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  # a step-2 checkpoint besides the last (a resumable field):
  # test_eval_names_a_stage_that_is_not_finished removes the last
  config.encoder_train.checkpoint_every = 2
  workdir = root / "run"
  os.makedirs(workdir)
  with workdir_lib.claim(str(workdir), config.workflow, process_index=0):
    run_workflow(config, workdir)
  trained = user_llm_workflow.trained(config, str(workdir), one_device_mesh(config))
  flags = [f"--config.{k}={v}" for k, v in overrides.items()]
  return config, workdir, checkpoint, trained, flags


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """Cross-attention User-LLM, LoRA, on a Gemma 3 checkpoint (its gating
  stored [2, mlp, embed])."""
  return user_llm_run(tmp_path_factory, "gemma3", "lora", "cross_attention")


def test_answer_ranks_every_candidate_of_the_task_for_the_asked_users(lora_run):
  config, workdir, _, trained, _ = lora_run
  mesh = one_device_mesh(config)
  genres = user_llm_workflow.answer(config, str(workdir), mesh, ["3", "9"],
                                    "favourite_genre", 4)
  assert json.load(open(workdir / "use" / "answers_favourite_genre.json")) == genres
  assert "candidate ranking" in genres["answered_by"]
  names = set(trained.builder.timelines.items.genre_names)
  for user in genres["users"]:
    answers = user["answers"]
    assert len(answers) == 4 and {a["answer"] for a in answers} <= names
    assert [a["log_likelihood"] for a in answers] == sorted(
        (a["log_likelihood"] for a in answers), reverse=True)
  # probabilities are the softmax over every genre (the restored model again)
  every = user_llm_workflow.ranked_answers(config, trained, mesh, ["3"],
                                           "favourite_genre", 100)[0]["answers"]
  assert len(every) == len(names)
  assert sum(a["probability"] for a in every) == pytest.approx(1.0, abs=1e-6)
  assert [a["answer"] for a in every[:4]] == [
      a["answer"] for a in genres["users"][0]["answers"]]
  rating = user_llm_workflow.ranked_answers(config, trained, mesh, ["3"], "rating",
                                            5, item=7)[0]
  assert rating["asked_about"]["item"] == 7
  assert sorted(a["answer"] for a in rating["answers"]) == list(prompts.RATINGS)
  with pytest.raises(ConfigError, match="--task=rating asks about an item"):
    user_llm_workflow.answer(config, str(workdir), mesh, ["3"], "rating", 5)
  with pytest.raises(ConfigError, match="--task='rank' is not one of"):
    user_llm_workflow.answer(config, str(workdir), mesh, ["3"], "rank", 5)
  with pytest.raises(ConfigError, match=r"--item=9999: no such item id"):
    user_llm_workflow.ranked_answers(config, trained, mesh, ["3"], "rating", 5,
                                     item=9999)


def test_recommend_ranks_titles_the_user_has_not_rated(lora_run):
  config, workdir, _, trained, _ = lora_run
  payload = user_llm_workflow.recommend(config, str(workdir),
                                        one_device_mesh(config), ["4"], 5)
  timelines = trained.builder.timelines
  (user,) = payload["users"]
  seen = set(timelines.items.raw_ids[timelines.user_items(user["index"])])
  titles = [r["title"] for r in user["recommendations"]]
  assert len(titles) == 5 and not seen & {r["item"] for r in user["recommendations"]}
  assert all(t in timelines.items.titles for t in titles)


def test_eval_names_a_stage_that_is_not_finished(lora_run, tmp_path):
  config, workdir, *_ = lora_run
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "encoder_h8" / "checkpoints" / "4")
  before = steps_on_disk(copy)
  with pytest.raises(WorkdirError, match=r"stage encoder_h8 is not finished: its "
                     r"latest checkpoint is step 2 of config.encoder_train."
                     r"num_steps=4"):
    user_llm_workflow.evaluate(config, str(copy), one_device_mesh(config))
  assert steps_on_disk(copy) == before


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
  """`main.py --mode=export` of the LoRA run: (its directory, the manifest)."""
  _, workdir, _, _, flags = lora_run
  out = tmp_path_factory.mktemp("lora_export") / "out"
  result = run_main("configs/user_llm.py:tiny", workdir, "--mode=export",
                    f"--out={out}", *flags)
  assert result.returncode == 0, result.stderr[-3000:]
  manifest = json.loads(result.stdout)
  assert manifest == json.load(open(out / export.MANIFEST))
  return out, manifest


def _logits(cfg: llm.LLMConfig, params, tokens):
  out, _ = jax.jit(llm.DecoderLM(cfg).apply)({"params": params}, tokens, tokens > 0)
  return np.asarray(out)


def _tokens(vocab_size: int, seed: int = 3):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, 12), 3, vocab_size)


def test_export_merges_lora_into_the_released_layout_and_reads_back(lora_run,
                                                                    lora_export):
  _, _, checkpoint, trained, _ = lora_run
  out, manifest = lora_export
  about = manifest["llm"]
  assert (about["variant"], about["gating_einsum"]) == ("gemma3_4b", "[2, mlp, embed]")
  assert about["adapter"]["handled"] == "merged into the weights"
  assert manifest["adapters"] is None and (out / "README.md").exists()
  assert {p.split("/")[0] for p in manifest["user_model"]["shapes"]} == {
      "cross_attention", "encoder", "perceiver", "projector", "user_head"}
  assert "cross_attention/cross_attention_0/attn_gate" in manifest["user_model"]["shapes"]

  model, params = trained.model, jax.device_get(trained.params)
  tokens = _tokens(trained.tokenizer.vocab_size)
  # our loader reads the LLM back: the merged model's logits exactly, the
  # trained adapters' (unmerged) to float rounding, not the checkpoint's
  cfg, loaded = gemma_loader.load_checkpoint(str(out / "llm"),
                                             **export.read_args(manifest))
  trained_cfg = dataclasses.replace(model.config.llm, cross_attention_every=0)
  text_only = {k: v for k, v in params["llm"].items() if not k.startswith("cross")}
  merged, merged_cfg = adapters.merge_lora(jax.tree.map(jnp.asarray, text_only),
                                           trained_cfg)
  ours = _logits(cfg, loaded, tokens)
  np.testing.assert_array_equal(ours, _logits(merged_cfg, merged, tokens))
  np.testing.assert_allclose(ours, _logits(trained_cfg, text_only, tokens),
                             atol=1e-4, rtol=0)
  base_cfg, base = gemma_loader.load_checkpoint(checkpoint)
  assert np.abs(ours - _logits(base_cfg, base, tokens)).max() > 1e-3  # LoRA moved it
  # the whole User-LLM back from the export (encoder, Perceiver, projector,
  # gated cross-attention): the trained model's logits
  read_cfg, read_llm, parts = export.read(str(out))
  rebuilt = ul.UserLLM(dataclasses.replace(model.config, llm=read_cfg))
  batch = trained.builder.batch(prompts.Examples(
      np.array([0, 5], np.int32), np.array([4, 6], np.int32),
      np.zeros(2, np.int32)), np.arange(2))
  inputs = (batch["events"], batch["tokens"], batch["token_mask"])
  np.testing.assert_allclose(
      jax.jit(rebuilt.apply)({"params": {"llm": read_llm, **parts}}, *inputs),
      jax.jit(model.apply)({"params": params}, *inputs), atol=1e-4, rtol=0)


def test_the_gemma_library_reads_the_export_to_our_logits(lora_run, lora_export):
  """Google DeepMind's library (when installed) loads the exported LLM with
  its own loader and computes our logits to 1e-4."""
  gm = gemma_library.import_gm()
  _, _, _, trained, _ = lora_run
  out, manifest = lora_export
  cfg, loaded = gemma_loader.load_checkpoint(str(out / "llm"),
                                             **export.read_args(manifest))
  tokens = _tokens(trained.tokenizer.vocab_size)
  theirs_cfg = gemma_library.shrunk(
      gm, gemma_library.released_config(gm, manifest["llm"]["variant"]),
      **TINY_SHAPES, window=cfg.sliding_window, vocab=ROWS)
  theirs = gm.nn.Transformer(config=theirs_cfg).apply(
      {"params": gm.ckpts.load_params(str(out / "llm"))}, tokens).logits
  ours = _logits(cfg, loaded, tokens)
  gap = float(np.abs(np.asarray(theirs) - ours).max())
  print(f"[parity] gemma library vs ours on the export: max |logit diff| {gap:.2e} "
        f"(logits up to {np.abs(ours).max():.1f})")
  assert gap < 1e-4


@pytest.fixture(scope="module")
def mode_run(tmp_path_factory):
  """A text-prompt model with MoDE adapters on a Gemma 2 checkpoint (its
  gating stored [2, embed, mlp])."""
  return user_llm_run(tmp_path_factory, "gemma2", "mode", "text_prompt")


def test_export_keeps_mode_adapters_beside_the_base_weights(mode_run, tmp_path):
  config, workdir, checkpoint, trained, _ = mode_run
  out = tmp_path / "export"
  manifest = user_llm_workflow.export(config, str(workdir), one_device_mesh(config),
                                      str(out))
  about = manifest["llm"]
  assert (about["variant"], about["gating_einsum"]) == ("gemma2_2b", "[2, embed, mlp]")
  assert "no merged weight" in about["adapter"]["handled"]
  assert manifest["adapters"]["kind"] == "mode" and manifest["user_model"] is None
  assert all("_adapter/" in path for path in manifest["adapters"]["shapes"])
  # strategy "adapters" froze the LLM: the base weights are the checkpoint's
  _, base = gemma_loader.load_checkpoint(checkpoint)
  _, exported = gemma_loader.load_checkpoint(str(out / "llm"))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(base),
                          jax.tree.leaves(exported)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # base + adapters read back: the trained model, routers and all
  read_cfg, read_llm, parts = export.read(str(out))
  assert read_cfg.adapter == trained.model.config.llm.adapter and parts == {}
  batch = trained.builder.batch(prompts.Examples(
      np.array([0, 5], np.int32), np.array([4, 6], np.int32),
      np.array([0, 1], np.int32)), np.arange(2))
  inputs = (None, batch["tokens"], batch["token_mask"])
  rebuilt = ul.UserLLM(dataclasses.replace(trained.model.config, llm=read_cfg))
  np.testing.assert_array_equal(
      rebuilt.apply({"params": {"llm": read_llm}}, *inputs, task_ids=batch["task_ids"]),
      trained.model.apply({"params": jax.device_get(trained.params)}, *inputs,
                          task_ids=batch["task_ids"]))
  with pytest.raises(ConfigError, match="exists and is not an empty directory"):
    user_llm_workflow.export(config, str(workdir), one_device_mesh(config), str(out))


# --- rlpf -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rlpf_run(tmp_path_factory):
  """configs/rlpf.py:tiny with its three stages trained (the table, which no
  mode reads, is not computed): (config, workdir, the trained stages)."""
  config = rlpf_config.get_config("tiny")
  for stage in ("policy_train", "predictor_train", "rl_train"):
    config[stage].eval_every = 0  # (a resumable field) no valid curves needed
  workdir = tmp_path_factory.mktemp("rlpf")
  with workdir_lib.claim(str(workdir), config.workflow, process_index=0):
    trained = rlpf_workflow.train(config, str(workdir), one_device_mesh(config))
  return config, workdir, trained


def test_summarize_writes_both_policies_summaries(rlpf_run):
  config, workdir, t = rlpf_run
  payload = rlpf_workflow.summarize(config, str(workdir), one_device_mesh(config),
                                    ["2", "11"])
  assert json.load(open(workdir / "use" / "summaries.json")) == payload
  assert [u["user"] for u in payload["users"]] == [2, 11]
  for user in payload["users"]:
    index = user["index"]
    assert user["split"] == next(name for name in ("train", "valid", "test")
                                 if index in getattr(t.users, name))
    assert user["history"].startswith("Watched:")
    cut = t.timelines.lengths[index]
    for name, params in (("rlpf_summary", t.rl_params),
                         ("initial_summary", t.initial_params)):  # greedy: the same
      (expected,) = t.corpus.decode_summaries(rlpf_workflow.Summarizer(
          t.policy, params, t.corpus, config.eval.batch_size).write(
              [t.corpus.policy_prompt(index, cut)]))
      assert user[name] == expected


def test_rlpf_export_is_the_policy_after_rl(rlpf_run, tmp_path):
  config, workdir, t = rlpf_run
  out = tmp_path / "out"
  manifest = rlpf_workflow.export(config, str(workdir), one_device_mesh(config),
                                  str(out))
  assert manifest["workflow"] == "rlpf" and manifest["adapters"] is None
  cfg, loaded = gemma_loader.load_checkpoint(str(out / "llm"),
                                             **export.read_args(manifest))
  tokens = _tokens(t.corpus.tokenizer.vocab_size, seed=5)
  np.testing.assert_array_equal(_logits(cfg, loaded, tokens),
                                _logits(t.policy.config, t.rl_params, tokens))
  assert (out / "tokenizer.model").read_bytes() == open(
      t.corpus.tokenizer.path, "rb").read()
