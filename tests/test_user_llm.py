"""User encoder fusion, Perceiver, training strategies, prompts and the
`user_llm` workflow end to end (resume included)."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from data import prompts, sources, splits
from infra.errors import Preempted
from conftest import ConfigReads, run_workflow
from data.vocab import Tokenizer, train_vocabulary
from infra import mesh as mesh_lib, train_loop
from infra.train_state import TrainState
from userllm import user_llm as ul
from userllm.models import adapters, llm, perceiver, sequence_model as sm


def _events(b=2, h=6, genres=4, seed=0):
  rng = np.random.default_rng(seed)
  items = rng.integers(1, 30, (b, h)).astype(np.int32)
  items[0, 4:] = 0  # row 0 has 4 real events
  return {"items": items,
          "ratings": np.where(items > 0, rng.integers(1, 6, (b, h)), 0).astype(np.int32),
          "genres": (rng.random((b, h, genres)) < 0.3).astype(np.float32)
                    * (items > 0)[..., None]}


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_fused_encoder_is_causal_and_ignores_padding(fusion):
  cfg = sm.SequenceModelConfig(vocab_size=30, max_len=6, embed_dim=16, num_layers=1,
                               num_heads=2, mlp_dim=32, dropout=0.0, fusion=fusion,
                               num_genres=4)
  model = sm.ItemSequenceTransformer(cfg)
  ev = _events()
  params = model.init(jax.random.PRNGKey(0), ev["items"], ev["ratings"], ev["genres"],
                      method=model.next_event_logits)["params"]
  assert ("rating_block_0" in params) == (fusion == "late")
  encode = lambda e: model.apply({"params": params}, e["items"],  # noqa: E731
                                 ratings=e["ratings"], genres=e["genres"],
                                 method=model.encode)
  states = encode(ev)
  changed = jax.tree.map(np.copy, ev)
  changed["ratings"][:, 3] = 1 + changed["ratings"][:, 3] % 5  # event 3 changes
  changed["genres"][:, 3] = 1 - changed["genres"][:, 3]
  changed_states = encode(changed)
  np.testing.assert_allclose(states[:, :3], changed_states[:, :3], atol=1e-5)
  assert np.abs(states[:, 3] - changed_states[:, 3]).max() > 1e-4
  # next-event pretraining loss is finite and has all three terms
  windows = jax.tree.map(jnp.asarray, ev)
  loss, metrics = sm.next_event_loss(model, params, windows, jax.random.PRNGKey(0))
  assert np.isfinite(loss) and set(metrics) >= {"item_loss", "genre_loss",
                                                "rating_loss"}


def test_perceiver_reads_only_real_states():
  resampler = perceiver.PerceiverResampler(num_latents=3, num_layers=2, num_heads=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 8))
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  params = resampler.init(jax.random.PRNGKey(1), x, mask)
  out = resampler.apply(params, x, mask)
  assert out.shape == (2, 3, 8)
  out2 = resampler.apply(params, x.at[0, 2:].set(9.0), mask)
  np.testing.assert_allclose(out[0], out2[0], atol=1e-5)


def _tiny_user_llm(integration, adapter_kind="lora"):
  enc = sm.SequenceModelConfig(vocab_size=30, max_len=6, embed_dim=16, num_layers=1,
                               num_heads=2, mlp_dim=32, dropout=0.0, fusion="early",
                               num_genres=4)
  lm = llm.LLMConfig(vocab_size=40, embed_dim=16, num_layers=2, num_heads=2,
                     num_kv_heads=1, head_dim=8, mlp_dim=32,
                     adapter=adapters.AdapterConfig(adapter_kind, rank=2),
                     cross_attention_every=1 if integration == "cross_attention" else 0)
  return ul.UserLLM(ul.UserLLMConfig(encoder=enc, llm=lm, integration=integration,
                                     num_latents=3))


def _lm_batch(b=4):
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 40, (b, 7)).astype(np.int32)
  target = np.zeros((b, 7), bool)
  target[:, 4:] = True
  return {"events": _events(b), "tokens": tokens,
          "token_mask": np.ones((b, 7), bool), "target_mask": target}


@pytest.mark.parametrize("strategy,integration", [
    (s, "cross_attention") for s in sorted(ul.STRATEGIES)] + [
    ("frozen_llm", "soft_prompt")])
def test_frozen_parameters_do_not_change(strategy, integration):
  model = _tiny_user_llm(integration)
  batch = _lm_batch()
  init = lambda rng: model.init(rng, batch["events"], batch["tokens"],  # noqa: E731
                                batch["token_mask"])["params"]
  params = nn.meta.unbox(init(jax.random.PRNGKey(0)))
  mask = ul.trainable_mask(params, strategy)
  tx = ul.masked_optimizer(optax.adam(1e-2), mask)
  opt_state = tx.init(params)
  # frozen parameters carry no optimiser state: Adam's moments cover exactly
  # the trainable leaves.
  state_size = sum(x.size for x in jax.tree.leaves(opt_state))
  trainable_size = sum(x.size for x, m in zip(jax.tree.leaves(params),
                                              jax.tree.leaves(mask)) if m)
  # mu, nu and a step count per Adam: one for the pretrained parts, one for
  # the parts made fresh (their own learning-rate scale)
  assert state_size == 2 * trainable_size + 2

  step = jax.jit(train_loop.make_train_step(functools.partial(ul.lm_loss, model, mask),
                                            tx))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     opt_state=opt_state, rng=jax.random.PRNGKey(1))
  for _ in range(3):
    state, metrics = step(state, jax.tree.map(jnp.asarray, batch))
  assert np.isfinite(metrics["loss"])
  flat_before = jax.tree_util.tree_leaves_with_path(params)
  present, changed = set(), set()
  for (path, before), after, trains in zip(flat_before, jax.tree.leaves(state.params),
                                           jax.tree.leaves(mask)):
    part = ul.part_of(tuple(k.key for k in path))
    present.add(part)
    if not trains:
      np.testing.assert_array_equal(after, before, err_msg=str(path))
    elif np.abs(after - before).max() > 0:
      changed.add(part)
  assert changed == ul.STRATEGIES[strategy] & present


def test_strategy_that_trains_nothing_is_an_error():
  model = _tiny_user_llm("text", adapter_kind="none")
  batch = _lm_batch()
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), None, batch["tokens"],
                                    batch["token_mask"])["params"])
  with pytest.raises(ValueError, match="trains nothing"):
    ul.trainable_mask(params, "frozen_llm")
  with pytest.raises(ValueError, match="strategy='nope'"):
    ul.trainable_mask(params, "nope")


def test_text_prompt_keeps_the_latest_titles(tiny_timelines, tiny_tokenizer):
  timelines, tok = tiny_timelines, tiny_tokenizer
  builder = prompts.PromptBuilder(timelines, tok, "text", history_len=5,
                                  prompt_len=30, answer_len=12)
  user, cut = 3, 7
  ex = prompts.Examples(np.array([user]), np.array([cut]), np.array([0]))
  batch = builder.batch(ex, np.arange(1))
  prompt = tok.decode(batch["prompt"][0][batch["prompt_mask"][0]])
  latest = timelines.items.titles[timelines.user_items(user)[cut - 1]]
  # pieces are tokenized apart, so SentencePiece puts a space before "." and ";"
  assert prompt.replace(" .", ".").endswith(f"{latest}. Next title:")
  assert batch["prompt_mask"][0].sum() <= 30
  answer = batch["tokens"][0][batch["target_mask"][0]]
  assert tok.decode(answer) == timelines.items.titles[timelines.user_items(user)[cut]]
  assert answer[-1] == tok.eos_id
  # the bare prompt of the user-embedding methods, with the history as events
  bare = prompts.PromptBuilder(timelines, tok, "events", 5, 30, 12)
  batch = bare.batch(ex, np.arange(1))
  assert tok.decode(batch["prompt"][0][batch["prompt_mask"][0]]) == "Next title:"
  np.testing.assert_array_equal(batch["events"]["items"][0],
                                timelines.user_items(user)[cut - 5:cut])


def test_workflow_end_to_end_and_resume(tmp_path):
  from configs import user_llm
  config = user_llm.get_config("tiny")
  with ConfigReads() as reads:
    straight = run_workflow(config, tmp_path / "straight")
  assert reads.unread(config) == []  # the config holds only what the workflow reads
  for key in ("test/model/next_title/recall@1", "test/model/next_title/recall@10",
              "test/model/favourite_genre/accuracy", "test/prior/all/average",
              "valid/model/all/average", "llm_input_tokens",
              "valid/encoder/next_item/recall@10", "cross_attention_attn_gate_tanh",
              "test/probe_encoder/favourite_genre/accuracy",
              "test/probe_user_tokens/favourite_genre/accuracy"):
    assert key in straight
  assert 0 <= straight["test/model/next_title/recall@1"] <= straight[
      "test/model/next_title/recall@10"] <= 1
  saved = json.loads((tmp_path / "straight" / "results.json").read_text())
  assert saved["config"]["userllm"]["method"] == "cross_attention"
  for stage in ("lm", "encoder_h8", "cross_attention_h8"):
    assert (tmp_path / "straight" / stage / "checkpoints").is_dir()

  # preempted in the last stage (the finished LM and encoder stages are reused)
  for finished in ("lm", "encoder_h8", "spm.model"):
    copy = shutil.copytree if finished != "spm.model" else shutil.copy
    copy(tmp_path / "straight" / finished, tmp_path / "resumed" / finished)
  config.train.stop_after_steps = 2
  with pytest.raises(Preempted, match="stopped at step 2 of 4"):
    run_workflow(config, tmp_path / "resumed")
  assert not (tmp_path / "resumed" / "results.json").exists()
  config.train.stop_after_steps = 0
  resumed = run_workflow(config, tmp_path / "resumed")
  for key in ("test/model/next_title/recall@10",
              "test/model/favourite_genre/accuracy"):
    assert resumed[key] == straight[key]

  # other methods reuse the finished LM and encoder stages of the workdir
  config.userllm.method = "text_prompt"
  text = run_workflow(config, tmp_path / "straight")
  assert text["llm_input_tokens"] > straight["llm_input_tokens"]
  assert text["parameters"] < straight["parameters"]  # no encoder, no cross blocks
  lm_rows = [json.loads(line) for line in
             (tmp_path / "straight" / "lm" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lm_rows if r["split"] == "lm"] == [2, 4]  # trained once


def test_unknown_method_is_a_config_error(tmp_path):
  from configs import user_llm
  from infra.errors import ConfigError
  config = user_llm.get_config("tiny")
  config.userllm.method = "telepathy"
  with pytest.raises(ConfigError, match="config.userllm.method"):
    run_workflow(config, tmp_path)


def test_held_out_prompts_read_the_full_timeline_and_ask_for_the_task(
    tiny_timelines, tiny_tokenizer):
  """Held-out cuts index the full timelines; each task gets its own prompt."""
  from userllm import evaluation
  timelines, tok = tiny_timelines, tiny_tokenizer
  split = splits.leave_last_out(timelines)
  builder = prompts.PromptBuilder(timelines, tok, "text", 3, 40, 12)
  examples = prompts.held_out_examples(split.test, "next_title", 0, 0)
  evaluator = evaluation.TaskEvaluator(None, builder, examples, ["next_title"],
                                       "test", 4, 8, mesh=None)
  for task, ending in (("next_title", "Next title:"),
                       ("favourite_genre", "Favourite genre:")):
    batch = evaluator.prompt_batch(task, np.arange(2))
    for row in range(2):
      user = examples.users[row]
      text = tok.decode(batch["prompt"][row][batch["prompt_mask"][row]])
      last_seen = timelines.items.titles[timelines.user_items(user)[-2]]
      assert text.replace(" .", ".").endswith(f"{last_seen}. {ending}")


def test_last_title_asks_for_the_latest_shown_title_among_all_titles(
    tiny_timelines, tiny_tokenizer):
  """The recall task: its answer is the history's latest title, and it is
  ranked among every title (the seen ones too), unlike next_title."""
  from userllm import evaluation
  timelines, tok = tiny_timelines, tiny_tokenizer
  builder = prompts.PromptBuilder(timelines, tok, "events", 5, 30, 12)
  user, cut = 3, 7
  ex = prompts.Examples(np.array([user]), np.array([cut]),
                        np.array([prompts.TASKS.index("last_title")]))
  batch = builder.batch(ex, np.arange(1))
  assert tok.decode(batch["prompt"][0][batch["prompt_mask"][0]]) == "Last title:"
  latest = timelines.user_items(user)[cut - 1]
  answer = batch["tokens"][0][batch["target_mask"][0]]
  assert tok.decode(answer) == timelines.items.titles[latest]
  evaluator = evaluation.TaskEvaluator(None, builder, ex, ["last_title"], "test",
                                       1, 8, mesh=None)
  earlier, following = timelines.user_items(user)[[cut - 2, cut]]
  assert len({earlier, latest, following}) == 3
  scores = np.zeros((1, timelines.num_items + 1), np.float32)
  scores[0, [earlier, latest, following]] = 3.0, 2.0, 1.0
  # a seen title above the latest one counts against last_title ...
  assert evaluator.task_metrics("last_title", scores)["recall@1"] == 0.0
  assert evaluator.task_metrics("last_title", scores)["recall@5"] == 1.0
  # ... while next_title never ranks seen titles: the next one is first
  assert evaluator.task_metrics("next_title", scores)["recall@1"] == 1.0


def test_candidates_scored_in_length_groups_equal_full_width_scores(
    tiny_config, tiny_timelines, tiny_tokenizer):
  """TaskEvaluator.scores trims each group of candidates to its own width; the
  scores are those of every candidate at the full padded width."""
  from userllm import evaluation
  timelines, tok = tiny_timelines, tiny_tokenizer
  split = splits.leave_last_out(timelines)
  builder = prompts.PromptBuilder(timelines, tok, "text", 3, 40, 12)
  lm = llm.LLMConfig(vocab_size=tok.vocab_size, embed_dim=16, num_layers=1,
                     num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
  model = ul.UserLLM(ul.UserLLMConfig(encoder=None, llm=lm, integration="text"))
  examples = prompts.held_out_examples(split.test, "next_title", 6, 0)
  mesh = mesh_lib.make_mesh(tiny_config.mesh, jax.devices()[:1])
  evaluator = evaluation.TaskEvaluator(evaluation.candidate_scorer(model), builder,
                                       examples, ["next_title"], "test", 4, 8, mesh)
  candidates, mask = builder.candidates("next_title")
  groups = evaluation.candidate_chunks(mask.sum(1), 8, candidates.shape[1])
  assert sorted(set(np.concatenate([ids for ids, _ in groups]))) == list(
      range(len(candidates)))
  assert min(width for _, width in groups) < candidates.shape[1]  # it trims
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), None, tokens,
                                    tokens > 0)["params"])
  grouped = evaluator.scores(params, "next_title")
  assert grouped.shape == (6, len(candidates))
  batch = evaluator.prompt_batch("next_title", np.arange(4))
  full = np.asarray(evaluator.score(params, batch, candidates, mask))
  np.testing.assert_allclose(grouped[:4], full, rtol=1e-5, atol=1e-4)


def _gemma_style_tokenizer(path: str, texts: list[str]) -> str:
  """A SentencePiece model with Gemma's ids (pad 0, eos 1, bos 2, unk 3) and
  its chat control pieces, trained on `texts` (Gemma's own file cannot be
  shipped: this is the same kind of file)."""
  import sentencepiece as spm
  prefix = path[:-len(".model")]
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=300,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, hard_vocab_limit=False,
      user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
      add_dummy_prefix=False, remove_extra_whitespaces=False,  # as Gemma's
      minloglevel=2)
  return path


def test_a_gemma_tokenizer_frames_prompts_and_answers_as_gemma_does(
    tmp_path, tiny_timelines):
  """config.llm.tokenizer with Gemma's special ids and whitespace (no dummy
  prefix): every prompt starts with bos (2) after the left padding (0), every
  answer ends with eos (1), the pieces tokenized apart read back as words
  with their spaces, and the control pieces are single pieces."""
  path = _gemma_style_tokenizer(str(tmp_path / "tokenizer.model"),
                                prompts.corpus(tiny_timelines))
  tok = Tokenizer(path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.processor.piece_to_id("<start_of_turn>") > 3
  title = str(tiny_timelines.items.titles[7])
  assert tok.decode(tok.encode(["Watched:"])[0] + tok.encode([title])[0]) == (
      f"Watched: {title}")
  builder = prompts.PromptBuilder(tiny_timelines, tok, "text", 3, 60, 40)
  examples = prompts.Examples(np.array([3, 5]), np.array([7, 4]), np.array([0, 2]))
  batch = builder.batch(examples, np.arange(2))
  for row in range(2):
    prompt = batch["prompt"][row][batch["prompt_mask"][row]]
    assert prompt[0] == tok.bos_id and tok.bos_id not in prompt[1:]
    assert (batch["prompt"][row][~batch["prompt_mask"][row]] == tok.pad_id).all()
    answer = batch["tokens"][row][batch["target_mask"][row]]
    assert answer[-1] == tok.eos_id and tok.eos_id not in answer[:-1]
  text = tok.decode(batch["prompt"][0][batch["prompt_mask"][0]][1:])
  assert text.startswith("Watched: ") and text.endswith(" Next title:")


def test_workflow_starts_from_a_gemma_checkpoint(tmp_path):
  """config.llm.checkpoint and a Gemma-style config.llm.tokenizer: the LM
  stage is skipped and the LLM loaded (head_dim 16 != embed / heads 8, as in
  released Gemmas)."""
  from configs import user_llm
  from userllm.models import gemma_loader
  config = user_llm.get_config("tiny")
  timelines = sources.load_timelines(config.data, quiet=True)
  vocab = _gemma_style_tokenizer(str(tmp_path / "tokenizer.model"),
                                 prompts.corpus(timelines))
  lm_cfg = llm.LLMConfig(vocab_size=Tokenizer(vocab).vocab_size, embed_dim=32,
                         num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                         mlp_dim=64)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(llm.DecoderLM(lm_cfg).init(
      jax.random.PRNGKey(0), tokens, tokens > 0)["params"])
  gemma_loader.save_checkpoint(params, str(tmp_path / "gemma"), fuse_qkv=True)
  config.llm.update(checkpoint=str(tmp_path / "gemma"), tokenizer=vocab)
  config.userllm.method = "soft_prompt"
  results = run_workflow(config, tmp_path / "run")
  assert not (tmp_path / "run" / "lm").exists()
  assert 0 <= results["test/model/next_title/recall@10"] <= 1
  # the stage-by-stage evidence: the encoder's own next-item quality
  assert 0 <= results["valid/encoder/next_item/recall@10"] <= 1


def test_new_parts_learn_at_their_own_rate():
  """new_scale multiplies the updates of the fresh parts (Perceiver, projector,
  cross-attention blocks) and of nothing else."""
  model = _tiny_user_llm("cross_attention")
  batch = _lm_batch()
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["events"],
                                    batch["tokens"], batch["token_mask"])["params"])
  mask = ul.trainable_mask(params, "full")
  grads = jax.tree.map(jnp.ones_like, params)
  updates = {scale: ul.masked_optimizer(optax.sgd(0.1), mask, scale).update(
      grads, ul.masked_optimizer(optax.sgd(0.1), mask, scale).init(params), params)[0]
             for scale in (1.0, 10.0)}
  for path, one in jax.tree_util.tree_leaves_with_path(updates[1.0]):
    ten = functools.reduce(lambda node, k: node[k.key], path, updates[10.0])
    fresh = ul.part_of(tuple(k.key for k in path)) in ul.NEW_PARTS
    np.testing.assert_allclose(ten, one * (10.0 if fresh else 1.0), rtol=1e-6)


def test_auxiliary_next_item_loss_trains_the_user_path_only():
  """aux_weight adds the next item's cross-entropy from the mean user token:
  the loss grows by exactly weight x that term, and its gradient reaches the
  user head, projector, Perceiver and encoder but not the LLM."""
  import dataclasses
  base = _tiny_user_llm("soft_prompt")
  model = ul.UserLLM(dataclasses.replace(base.config, aux_items=30))
  batch = _lm_batch()
  batch["events"]["next_item"] = np.arange(1, 5, dtype=np.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["events"],
                                    batch["tokens"], batch["token_mask"])["params"])
  assert ul.part_of(("user_head", "kernel")) == "projector"
  mask = ul.trainable_mask(params, "full")
  key = jax.random.PRNGKey(1)
  loss = jax.jit(lambda p, weight: ul.lm_loss(model, mask, p, batch, key, False,
                                              aux_weight=weight), static_argnums=1)
  plain, _ = loss(params, 0.0)
  with_aux, metrics = loss(params, 0.5)
  np.testing.assert_allclose(with_aux, plain + 0.5 * metrics["aux_item_loss"],
                             rtol=1e-6)
  aux_only = jax.jit(jax.grad(lambda p: loss(p, 1.0)[0] - loss(p, 0.0)[0]))(params)
  norms = {top: float(optax.tree.norm(aux_only[top])) for top in aux_only}
  assert norms["user_head"] > 0 and norms["projector"] > 0 and norms["encoder"] > 0
  assert norms["llm"] < 1e-6


def test_normalised_user_tokens_reach_the_llm_at_unit_scale():
  import dataclasses
  base = _tiny_user_llm("cross_attention")
  batch = _lm_batch()
  for normalise in (False, True):
    model = ul.UserLLM(dataclasses.replace(base.config,
                                           normalise_user_tokens=normalise))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch["events"],
                                      batch["tokens"], batch["token_mask"])["params"])
    tokens, _ = model.apply({"params": params}, batch["events"],
                            method=model.user_tokens)
    scale = float(jnp.sqrt(jnp.mean(jnp.square(tokens))))
    # (LayerNorm's epsilon takes a little off tokens this small)
    assert (0.9 < scale <= 1.0) if normalise else scale < 0.1


def test_item_text_puts_each_events_title_into_the_user_tokens():
  """With item_text the user tokens change with the events' titles (the mean
  of the LLM's embeddings of their tokens, padding ignored); without it the
  titles are not read."""
  import dataclasses
  base = _tiny_user_llm("cross_attention")
  events = _events()
  rng = np.random.default_rng(2)
  titles = rng.integers(3, 40, (*events["items"].shape, 3)).astype(np.int32)
  titles[..., 2] = 0  # every title is 2 tokens and a pad
  other = titles.copy()
  other[1, 2, 0] += 1  # one token of one real event's title
  for item_text in (False, True):
    model = ul.UserLLM(dataclasses.replace(base.config, item_text=item_text))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), {**events, "titles": titles},
                                      jnp.ones((2, 3), jnp.int32),
                                      jnp.ones((2, 3), bool))["params"])
    tokens = {name: model.apply({"params": params}, {**events, "titles": t},
                                method=model.user_tokens)[0]
              for name, t in (("same", titles), ("other", other))}
    changed = np.abs(np.asarray(tokens["same"] - tokens["other"])).max(-1).max(-1)
    assert changed[0] == 0.0  # row 0 is untouched
    assert (changed[1] > 1e-6) == item_text
  table = params["llm"]["embedder"]["input_embedding"]
  mean = model.apply({"params": params}, jnp.asarray(titles), method=model.title_text)
  np.testing.assert_allclose(
      mean[1, 2], (table[titles[1, 2, 0]] + table[titles[1, 2, 1]]) / 2 * np.sqrt(16),
      rtol=1e-5)


def test_a_method_is_an_integration_and_a_history_kind(tiny_timelines,
                                                       tiny_tokenizer):
  """soft_prompt_text, added as one line of builders.METHODS: the prompt
  holds the history's titles AND the events come beside it; the built model
  puts the user tokens before that prompt (its logits cover the text only)."""
  from configs import user_llm
  from userllm import builders
  method = builders.METHODS["soft_prompt_text"]
  assert (method.integration, method.history) == ("soft_prompt", "text_events")
  timelines, tok = tiny_timelines, tiny_tokenizer
  both = prompts.PromptBuilder(timelines, tok, method.history, 5, 40, 12)
  text = prompts.PromptBuilder(timelines, tok, "text", 5, 40, 12)
  ex = prompts.Examples(np.array([3]), np.array([7]), np.array([0]))
  batch, text_batch = both.batch(ex, np.arange(1)), text.batch(ex, np.arange(1))
  np.testing.assert_array_equal(batch["prompt"], text_batch["prompt"])
  np.testing.assert_array_equal(batch["events"]["items"][0],
                                timelines.user_items(3)[2:7])
  config = user_llm.get_config("tiny")
  config.userllm.method = "soft_prompt_text"
  builders.check(config)
  model = builders.build_model(config, timelines, tok.vocab_size, config.userllm.method)
  assert model.config.integration == "soft_prompt" and model.config.uses_user
  variables = model.init(jax.random.PRNGKey(0), batch["events"], batch["tokens"],
                         batch["token_mask"])
  logits = model.apply(variables, batch["events"], batch["tokens"],
                       batch["token_mask"])
  assert logits.shape[:2] == batch["tokens"].shape
  assert builders.stage_name(config, model).startswith("soft_prompt_text_h")


def test_the_item_head_of_any_catalogue_shards_over_the_model_axis():
  """aux_items=1,683 (MovieLens-100K's items + padding) on data=4 x model=2:
  the head's rows are padded to a multiple of 128, so its state lays out on
  the mesh (1,683 rows would not split over `model`), and the logits keep
  1,683."""
  import dataclasses
  from infra import mesh as mesh_lib, train_loop
  import ml_collections
  base = _tiny_user_llm("soft_prompt")
  model = ul.UserLLM(dataclasses.replace(base.config, aux_items=1683))
  batch = _lm_batch(b=4)
  init = lambda rng: model.init(rng, batch["events"], batch["tokens"],  # noqa: E731
                                batch["token_mask"])["params"]
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": 4, "model": 2}))
  state, _ = train_loop.create_state(init, optax.sgd(0.1), jax.random.PRNGKey(0),
                                     mesh)
  kernel = state.params["user_head"]["kernel"]
  assert kernel.shape == (16, 1792) and tuple(kernel.sharding.spec) == (None, "model")
  _, items = model.apply({"params": state.params}, batch["events"], batch["tokens"],
                         batch["token_mask"], with_user_items=True)
  assert items.shape == (4, 1683)
