"""summarize/: summary claims and the checker, the RL pieces (rewards,
advantages, masks, the predictor's prompt with holes, exact KL), an RL step
that learns, and the `rlpf` workflow end to end (stopped, resumed, its table)."""

import dataclasses
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from conftest import ConfigReads, run_workflow
from configs import rlpf as rlpf_config
from data import sources
from infra import config_checks
from infra.errors import ConfigError
from summarize import evaluation, rlpf, table, texts
from userllm.models import decoding, llm


@pytest.fixture(scope="module")
def timelines():
  return sources.load_timelines(rlpf_config.get_config("tiny").data, quiet=True)


def test_programmatic_summaries_are_supported_and_parse_back(timelines):
  items, checker = timelines.items, texts.ClaimChecker(timelines.items)
  rng = np.random.default_rng(0)
  for user in range(20):
    known = texts.facts(items, timelines.user_items(user)[:6],
                        timelines.ratings[timelines.user_offsets[user]:][:6])
    style = texts.Style(genres=2, rating=True, recent=1, saw=1)
    summary = texts.programmatic_summary(items, known, style, rng)
    found = texts.claims(summary)
    genres = min(2, len(known.genres))
    assert [c.kind for c in found] == ["genre"] * genres + ["level", "title", "title"]
    assert checker.unsupported(summary, known) == (0, genres + 3)
    assert found[genres + 1].text == str(items.titles[known.items[-1]])  # newest first
  shares = texts.part_shares(["likes Drama | recent A", "rates high", "recent B; C"])
  assert shares == {"likes": 1 / 3, "rates": 1 / 3, "recent": 2 / 3, "saw": 0.0}


def test_unsupported_claims_are_counted_and_cut(timelines):
  items, checker = timelines.items, texts.ClaimChecker(timelines.items)
  history = timelines.user_items(0)[:6]
  known = texts.facts(items, history, np.full(6, 5.0))  # level "high"
  absent = next(i for i in range(1, len(items.titles)) if i not in history)
  present = str(items.titles[history[2]])
  top, other = items.genre_names[known.genres[0]], "Nonsense"
  summary = (f"likes {top}, {other} | rates low | recent {present}; "
             f"{items.titles[absent]} | garbled words")
  assert checker.unsupported(summary, known) == (4, 6)
  assert checker.keep_supported(summary, known) == f"likes {top} | recent {present}"


def test_title_pieces_make_each_title_one_token_that_decodes_back(tmp_path,
                                                                 timelines):
  from summarize import workflow
  config = rlpf_config.get_config("tiny")
  config.data.title_pieces = True
  vocab = workflow.tokenizer_for(config, str(tmp_path), timelines)
  titles = [str(t) for t in timelines.items.titles[1:]]
  assert any(" " in t for t in titles)  # the spaces are inside the piece
  for title in titles:
    (piece,) = vocab.encode([title])[0]
    assert vocab.decode([piece]) == title
  history = texts.history_text(timelines.items, timelines.user_items(0)[:4],
                               np.full(4, 3.0))
  assert vocab.decode(vocab.encode([history])[0]) == history
  plain = workflow.tokenizer_for(rlpf_config.get_config("tiny"),
                                 str(tmp_path / "plain"), timelines)
  assert len(plain.encode([history])[0]) > len(vocab.encode([history])[0])
  config.llm.tokenizer = plain.path  # a given vocabulary cannot gain pieces
  with pytest.raises(ConfigError, match="config.data.title_pieces"):
    workflow.tokenizer_for(config, str(tmp_path / "given"), timelines)


def test_the_predictor_learns_the_history_contexts_as_a_language_model(tmp_path):
  """`predictor_batch`'s history_target marks a history context's tokens
  after its first (never a summary's, the question's or an answer's), and
  `predictor_loss` adds their mean cross-entropy x history_weight."""
  from summarize import examples as ex
  from summarize import workflow
  config = rlpf_config.get_config("tiny")
  config.data.title_pieces = True
  timelines, users, corpus = workflow.setup(config, str(tmp_path), quiet=True)
  cuts = ex.training_cuts(timelines, users.train, 2, config.data.min_history, 0)
  rows = np.arange(6)
  for kind in ("full", "summary", "none"):
    batch = ex.predictor_batch(corpus, cuts, rows, np.random.default_rng(1),
                               lambda rng: texts.Style(1, True, 1, 1), {kind: 1.0},
                               4, "uniform")
    for row, target in zip(batch["prompt"], batch["history_target"]):
      if kind != "full":
        assert not target.any()
        continue
      user, cut = int(cuts.users[rows[0]]), int(cuts.cuts[rows[0]])
      history = corpus.history_ids(*corpus.history(user, cut))
      assert list(row[target]) == history[1:]  # one title piece each
      break
  model, params = _tiny_lm(corpus.tokenizer.vocab_size)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  plain, _ = rlpf.predictor_loss(model, params, batch, None)
  full = ex.predictor_batch(corpus, cuts, rows, np.random.default_rng(1),
                            lambda rng: texts.Style(1, True, 1, 1), {"full": 1.0},
                            4, "uniform")
  full = {k: jnp.asarray(v) for k, v in full.items()}
  without, _ = rlpf.predictor_loss(model, params, full, None)
  with_lm, metrics = rlpf.predictor_loss(model, params, full, None,
                                         history_weight=0.5)
  assert np.isfinite(metrics["history_loss"]) and metrics["history_loss"] > 0
  np.testing.assert_allclose(with_lm, without + 0.5 * metrics["history_loss"],
                             rtol=1e-5)
  logits, _ = model.apply({"params": params}, full["prompt"], full["prompt_mask"])
  expected = -decoding.token_log_likelihood(
      logits, full["prompt"], full["history_target"]).sum() / full[
          "history_target"][:, 1:].sum()
  np.testing.assert_allclose(metrics["history_loss"], expected, rtol=1e-4)
  assert np.isfinite(plain)


def test_rewards_and_baselines():
  cfg = rlpf.RLConfig(summary_len=8, group_size=2, baseline="rloo",
                      length_weight=1.0, length_cap=0.3, length_beta=0.1,
                      length_target=10.0)
  correct = jnp.array([1.0, 0.0, 1.0, 1.0])
  length = jnp.array([4.0, 12.0, 10.0, 9.0])
  finished = jnp.array([True, False, True, True])
  reward = rlpf.rewards(correct, length, finished, cfg)
  np.testing.assert_allclose(reward, [1.3, -0.2, 1.0, 1.1], atol=1e-6)  # capped at C
  zeroed = rlpf.rewards(correct, length, finished,
                        rlpf.RLConfig(**{**cfg.__dict__, "truncated": "zero"}))
  assert float(zeroed[1]) == 0.0
  np.testing.assert_allclose(rlpf.advantages(reward, None, cfg),
                             [1.5, -1.5, -0.1, 0.1], atol=1e-6)
  grpo = rlpf.advantages(reward, None, rlpf.RLConfig(**{**cfg.__dict__,
                                                        "baseline": "grpo"}))
  np.testing.assert_allclose(grpo, [1, -1, -1, 1], atol=1e-4)
  with pytest.raises(ValueError, match="rl.group_size"):
    rlpf.RLConfig(summary_len=8, group_size=1, baseline="rloo").validate()


def test_the_prediction_term_is_correctness_or_the_answers_probability():
  scores = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])  # the predictor's, per option
  answer = jnp.array([0, 1])
  cfg = rlpf.RLConfig(summary_len=8)
  prediction, correct = rlpf.prediction_reward(scores, answer, cfg)
  assert correct.tolist() == [1.0, 0.0] and prediction.tolist() == [1.0, 0.0]
  soft, correct = rlpf.prediction_reward(
      scores, answer, rlpf.RLConfig(summary_len=8, reward="probability"))
  expected = [np.exp(2) / (np.exp(2) + 2), np.exp(1) / (1 + np.exp(1) + np.exp(3))]
  np.testing.assert_allclose(soft, expected, rtol=1e-6)
  assert correct.tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match="rl.reward='log'"):
    rlpf.RLConfig(summary_len=8, reward="log").validate()


def test_reinforce_gradient_equals_one_computed_by_hand():
  """The policy-gradient loss's gradient is -mean_i(r_i grad log pi(y_i | x_i)),
  log pi summed over the summary's tokens up to and with its eos only; here
  log pi is computed another way (the KV-cache continuation scorer), and at
  temperature 0.5 from the tempered logits."""
  model, params = _tiny_lm()
  params = jax.tree.map(lambda x: x * 3.0, params)
  prompt = jnp.array([[0, 5, 6, 7], [8, 9, 10, 11], [0, 0, 12, 13]])
  summary = jnp.array([[14, 1, 0, 0], [15, 16, 17, 18], [19, 20, 1, 0]])  # eos = 1
  written, _, _ = rlpf.summary_masks(summary, 1)
  reward = jnp.array([0.7, -0.2, 1.3])
  roll = {"prompt": prompt, "prompt_mask": prompt > 0, "summary": summary,
          "written": written, "reward": reward}
  cfg = rlpf.RLConfig(summary_len=4, baseline="none", kl_coef=0.0)
  # jitted: eager gradients of an LM dispatch op by op (seconds each)
  grad = jax.jit(jax.grad(lambda p: rlpf.rl_loss(model, None, cfg, {"policy": p},
                                                 {"reference": params}, roll)[0]))(params)

  def by_hand(p):
    log_pi = decoding.score_continuations(model, p, prompt, prompt > 0,
                                          summary[:, None], written[:, None])[:, 0]
    return -jnp.mean(reward * log_pi)
  expected = jax.jit(jax.grad(by_hand))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad, expected)
  # sampled at temperature 0.5, the log-probs are softmax(logits / 0.5)'s
  hot = dataclasses.replace(cfg, temperature=0.5)
  grad = jax.jit(jax.grad(lambda p: rlpf.rl_loss(model, None, hot, {"policy": p},
                                                 {"reference": params}, roll)[0]))(params)

  def tempered_by_hand(p):
    tokens = jnp.concatenate([prompt, summary], 1)
    logits, _ = model.apply({"params": p}, tokens,
                            jnp.concatenate([prompt > 0, written], 1))
    log_probs = jax.nn.log_softmax(logits[:, 3:7] / 0.5, -1)
    token_lp = jnp.take_along_axis(log_probs, summary[..., None], -1)[..., 0]
    return -jnp.mean(reward * jnp.sum(token_lp * written, 1))
  expected = jax.jit(jax.grad(tempered_by_hand))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad, expected)
  # and the KL to an unchanged policy is 0
  _, metrics = rlpf.rl_loss(model, None, dataclasses.replace(cfg, kl_coef=1.0),
                               {"policy": params}, {"reference": params}, roll)
  assert abs(float(metrics["kl"])) < 1e-6


def test_a_value_baseline_reduces_gradient_variance_on_a_bandit():
  """A 4-armed bandit, pi = softmax(theta): per-sample REINFORCE gradients
  A (onehot(a) - pi) with A = r (no baseline) or r - V, V the value loss's
  minimiser (the mean reward). Both are unbiased; the baseline cuts their variance (rewards sit near
  1, as 1[correct] + the length term do)."""
  theta = jnp.array([0.5, -0.3, 0.1, 0.0])
  pi = jax.nn.softmax(theta)
  mean_reward = jnp.array([1.2, 0.9, 1.0, 1.1])
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  n = 20_000
  arms = jax.random.categorical(keys[0], theta, shape=(n,))
  reward = mean_reward[arms] + 0.1 * jax.random.normal(keys[1], (n,))
  value = jnp.mean(reward)  # argmin of the value loss (one prompt: a scalar)
  score = jax.nn.one_hot(arms, 4) - pi  # grad_theta log pi(a)
  none = rlpf.advantages(reward, None, rlpf.RLConfig(summary_len=1, baseline="none"))
  with_value = rlpf.advantages(reward, jnp.full((n,), value),
                               rlpf.RLConfig(summary_len=1, baseline="value"))
  grads_none, grads_value = none[:, None] * score, with_value[:, None] * score
  exact = pi * (mean_reward - jnp.sum(pi * mean_reward))  # the true gradient
  for grads in (grads_none, grads_value):
    stderr = grads.std(0) / np.sqrt(n)
    assert np.all(np.abs(grads.mean(0) - exact) < 4 * stderr + 1e-4)
  assert grads_value.var(0).sum() < 0.1 * grads_none.var(0).sum()


def test_multiple_choice_options_hold_the_answer_once(tmp_path):
  from summarize import workflow
  config = rlpf_config.get_config("tiny")
  _, _, corpus = workflow.setup(config, str(tmp_path), quiet=True)
  rng = np.random.default_rng(0)
  num_items = len(corpus.items.titles)
  for kind in ("popularity_matched", "popularity", "uniform"):
    for true_item in rng.integers(1, num_items, 50):
      options = corpus.options(int(true_item), 4, kind, rng)
      assert len(options) == 4 and len(set(options.tolist())) == 4
      assert (options == true_item).sum() == 1
      assert options.min() >= 1 and options.max() < num_items  # no padding item


def test_title_fidelity_counts_titles_not_in_the_history(tmp_path):
  from summarize import examples as ex, workflow
  config = rlpf_config.get_config("tiny")
  _, _, corpus = workflow.setup(config, str(tmp_path), quiet=True)
  cuts = ex.Cuts(users=np.array([0, 1]), cuts=np.array([6, 6]))
  known = [corpus.facts(int(u), int(c)) for u, c in zip(cuts.users, cuts.cuts)]
  title = lambda i: str(corpus.items.titles[i])  # noqa: E731
  absent = next(i for i in range(1, len(corpus.items.titles))
                if i not in known[0].items + known[1].items)
  summaries = [  # the latest title copied, then one not in the history
      f"likes Drama | recent {title(known[0].items[-1])}; {title(absent)}",
      # an older title first under recent, a supported title under saw
      f"recent {title(known[1].items[0])} | saw {title(known[1].items[1])}"]
  assert evaluation.title_fidelity(corpus, cuts, summaries) == {
      "titles_per_summary": 2.0, "titles_unsupported": 0.25, "latest_copied": 0.5}
  # no title written: the unsupported share is undefined, so left out (not 0)
  assert evaluation.title_fidelity(corpus, cuts, ["rates high", "likes Drama"]) == {
      "titles_per_summary": 0.0, "latest_copied": 0.0}


def _tiny_lm(vocab=40):
  cfg = llm.LLMConfig(vocab_size=vocab, embed_dim=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_dim=64)
  model = llm.DecoderLM(cfg)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens,
                                    tokens > 0)["params"])
  return model, params


def test_summary_masks_and_the_predictor_prompt_with_holes():
  summary = jnp.array([[7, 8, 1, 0, 0], [5, 6, 9, 4, 3]])  # eos = 1; row 1 truncated
  written, body, finished = rlpf.summary_masks(summary, 1)
  assert written.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
  assert body.sum(1).tolist() == [2, 5] and finished.tolist() == [True, False]
  ids, mask = rlpf.predictor_prompt(summary, body, jnp.array([11, 12]),
                                    jnp.array([13]))
  assert ids.shape == (2, 8) and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 1]
  # pads between real tokens do not move positions: same scores as compact
  model, params = _tiny_lm()
  options = jnp.array([[[20, 21, 1], [22, 1, 0]]] * 2)
  score = jax.jit(functools.partial(decoding.score_continuations, model))
  holed = score(params, ids, mask, options, options > 0)
  compact = jnp.array([[0, 0, 0, 11, 12, 7, 8, 13]])
  expected = score(params, compact, compact > 0, options[:1], options[:1] > 0)
  np.testing.assert_allclose(holed[0], expected[0], rtol=1e-5, atol=1e-5)


def _rl_test_batch(rows: int) -> dict:
  """rlpf.make_rl_step's batch: one 8-token prompt, two 2-token options."""
  prompt = jnp.tile(jnp.arange(5, 13)[None], (rows, 1))
  return {"prompt": prompt, "prompt_mask": prompt > 0,
          "options": jnp.tile(jnp.array([[[20, 1], [21, 1]]]), (rows, 1, 1)),
          "option_mask": jnp.ones((rows, 2, 2), bool),
          "answer": jnp.zeros(rows, jnp.int32)}


def _rl_steps(step, state, batch, steps: int):
  """(state, summary tokens per step, KL per step) after `steps` RL steps."""
  lengths, kls = [], []
  for _ in range(steps):
    state, metrics = step(state, batch)
    lengths.append(float(metrics["summary_tokens"]))
    kls.append(float(metrics["kl"]))
  return state, lengths, kls


def test_rl_step_learns_to_write_short_summaries():
  """With only the length reward, REINFORCE moves mass onto eos: the sampled
  summaries get shorter, the KL to the initial policy grows from 0."""
  model, params = _tiny_lm()
  params = jax.tree.map(lambda x: x * 5.0, params)  # a peaked initial policy
  cfg = rlpf.RLConfig(summary_len=6, group_size=4, baseline="rloo",
                      length_weight=1.0, length_cap=1.0, length_beta=0.2,
                      length_target=6.0, kl_coef=0.0)
  state_params = {"policy": params, "reference": params, "predictor": params}
  tx = rlpf.rl_optimizer(optax.adam(3e-2), state_params)
  from infra.train_state import TrainState
  state = TrainState(step=jnp.zeros((), jnp.int32), params=state_params,
                     opt_state=tx.init(state_params), rng=jax.random.PRNGKey(1))
  step = jax.jit(rlpf.make_rl_step(model, None, model, tx, cfg, [3], [4], eos_id=1))
  state, lengths, kls = _rl_steps(step, state, _rl_test_batch(8), 25)
  assert kls[0] == pytest.approx(0.0, abs=1e-6)
  assert np.mean(lengths[-5:]) < np.mean(lengths[:5]) - 1.0, lengths
  assert min(kls) >= -1e-6 and kls[-1] > 0.1  # exact KL: never below 0
  assert jnp.all(state.params["reference"]["embedder"]["input_embedding"]
                 == params["embedder"]["input_embedding"])  # frozen parts stay


def _rl_state(params_of, tx):
  from infra.train_state import TrainState
  return TrainState(step=jnp.zeros((), jnp.int32), params=params_of,
                    opt_state=tx.init(params_of), rng=jax.random.PRNGKey(1))


def test_a_lora_policy_learns_over_one_frozen_copy_that_is_its_reference():
  """RL with LoRA adapters (config.rl.lora_rank): the state holds the LM's
  weights once (base, read as policy, reference and value trunk) beside the
  predictor; only adapters and the value head move; the KL starts at 0; the
  trained policy folds into plain LM weights that compute the same logits."""
  from summarize import workflow
  model, params = _tiny_lm()
  params = jax.tree.map(lambda x: x * 5.0, params)  # a peaked initial policy
  cfg = rlpf.RLConfig(summary_len=6, group_size=1, baseline="value",
                      length_weight=1.0, length_cap=1.0, length_beta=0.2,
                      length_target=6.0, kl_coef=0.0)
  config = rlpf_config.get_config("tiny")
  config.rl.update(lora_rank=4, lora_alpha=8.0)
  lora_policy, value_model = workflow.rl_models(config, model, cfg)
  assert lora_policy.config.adapter.targets == ("q", "k", "v", "out", "gate",
                                                "up", "down")
  tokens = jnp.ones((1, 4), jnp.int32)
  init = lambda m, key, part: part(nn.meta.unbox(m.init(  # noqa: E731
      jax.random.PRNGKey(key), tokens, tokens > 0)["params"]))
  state_params = workflow.rl_state_params(lora_policy, value_model, params, params,
                                          init)
  assert set(state_params) == {"base", "policy", "predictor", "value"}
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  # the LM's weights twice (base, predictor) and adapters: the full layout
  # holds them 4x (policy, reference, predictor, value trunk)
  assert count(state_params) == 2 * count(params) + count(
      state_params["policy"]) + count(state_params["value"])
  tx = rlpf.rl_optimizer(optax.adam(3e-2), state_params)
  state = _rl_state(state_params, tx)
  step = jax.jit(rlpf.make_rl_step(lora_policy, value_model, model, tx, cfg, [3], [4],
                                   eos_id=1))
  state, lengths, kls = _rl_steps(step, state, _rl_test_batch(8), 25)
  assert kls[0] == pytest.approx(0.0, abs=1e-6)  # zero adapters: the reference
  assert np.mean(lengths[-5:]) < np.mean(lengths[:5]) - 1.0, lengths
  assert kls[-1] > 0.1
  for part in ("base", "predictor"):  # the frozen parts go out as they came in
    assert all(jax.tree.leaves(jax.tree.map(
        lambda a, b: bool(jnp.all(a == b)), state.params[part], params)))
  moved = lambda a, b: float(jnp.max(jnp.abs(a - b)))  # noqa: E731
  assert max(jax.tree.leaves(jax.tree.map(
      moved, state.params["policy"], state_params["policy"]))) > 1e-3
  assert max(jax.tree.leaves(jax.tree.map(
      moved, state.params["value"]["trunk"], state_params["value"]["trunk"]))) > 0
  prompt = _rl_test_batch(8)["prompt"]
  merged = rlpf.trained_policy(state.params, lora_policy.config)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  adapted = rlpf.rl_views({"policy": state.params["policy"]},
                          {"base": state.params["base"]})[0]
  np.testing.assert_allclose(
      model.apply({"params": merged}, prompt, prompt > 0)[0],
      lora_policy.apply({"params": adapted}, prompt, prompt > 0)[0],
      rtol=1e-4, atol=1e-4)


def test_frozen_weights_are_held_in_bfloat16_with_bfloat16_activations():
  """workflow.frozen_dtype: with llm.dtype bfloat16 the reference, predictor
  (and a LoRA base) are stored in bfloat16 and stay so through a step; what
  trains stays float32."""
  from summarize import workflow
  config = rlpf_config.get_config("tiny")
  assert workflow.frozen_dtype(config) is None  # float32 runs: unchanged
  config.llm.dtype = "bfloat16"
  model, params = _tiny_lm()
  model = llm.DecoderLM(dataclasses.replace(model.config, dtype="bfloat16"))
  cfg = rlpf.RLConfig(summary_len=4, group_size=2, baseline="rloo")
  state_params = workflow.rl_state_params(model, None, params, params, None,
                                          workflow.frozen_dtype(config))
  tx = rlpf.rl_optimizer(optax.adam(1e-3), state_params)
  step = jax.jit(rlpf.make_rl_step(model, None, model, tx, cfg, [3], [4], eos_id=1))
  batch = _rl_test_batch(4)
  prompt = batch["prompt"]
  state, metrics = step(_rl_state(state_params, tx), batch)
  assert np.isfinite(float(metrics["loss"]))
  dtypes = lambda tree: {x.dtype for x in jax.tree.leaves(tree)}  # noqa: E731
  assert dtypes(state.params["reference"]) == {jnp.dtype(jnp.bfloat16)}
  assert dtypes(state.params["predictor"]) == {jnp.dtype(jnp.bfloat16)}
  assert dtypes(state.params["policy"]) == {jnp.dtype(jnp.float32)}
  # LoRA over a bfloat16 base: a step runs, the base stays bfloat16, and the
  # trained policy folds in float32 (bfloat16 would round the updates away)
  config.rl.lora_rank = 2
  lora_policy, _ = workflow.rl_models(config, model, cfg)
  init = lambda m, key, part: part(nn.meta.unbox(m.init(  # noqa: E731
      jax.random.PRNGKey(key), prompt[:1], prompt[:1] > 0)["params"]))
  lora_params = workflow.rl_state_params(lora_policy, None, params, params, init,
                                         workflow.frozen_dtype(config))
  tx = rlpf.rl_optimizer(optax.adam(1e-2), lora_params)
  step = jax.jit(rlpf.make_rl_step(lora_policy, None, model, tx, cfg, [3], [4],
                                   eos_id=1))
  state, metrics = step(_rl_state(lora_params, tx), batch)
  assert np.isfinite(float(metrics["loss"]))
  assert dtypes(state.params["base"]) == {jnp.dtype(jnp.bfloat16)}
  assert dtypes(state.params["policy"]) == {jnp.dtype(jnp.float32)}
  assert dtypes(rlpf.trained_policy(state.params, lora_policy.config)) == {
      jnp.dtype(jnp.float32)}


def test_rlpf_workflow_stops_resumes_and_writes_its_table(tmp_path, capsys,
                                                          timelines):
  """The tiny run, its policy started from a Gemma checkpoint in the released
  layout (another shape than the predictor's) with a given tokenizer."""
  from data.vocab import Tokenizer, train_vocabulary
  from userllm.models import gemma_loader
  config = rlpf_config.get_config("tiny")
  vocab = Tokenizer(train_vocabulary(texts.vocabulary_corpus(timelines.items),
                                     str(tmp_path / "spm.model"), 300, "bpe"))
  _, params = _tiny_lm(vocab.vocab_size)
  config.llm.policy_checkpoint = gemma_loader.save_checkpoint(
      params, str(tmp_path / "gemma"))
  config.llm.tokenizer = vocab.path
  workdir = tmp_path / "run"
  config.rl_train.stop_after_steps = 2
  from infra.errors import Preempted
  with pytest.raises(Preempted):
    run_workflow(config, workdir)
  # the predictor's warm-up reports whether it reads contexts yet
  out = capsys.readouterr().out
  assert "[predictor] step 4 valid next_title_from_none=" in out
  # and the policy's whether its sampled summaries copy titles
  assert "[policy] step 4 valid greedy_titles_per_summary=" in out
  assert "sampled_titles_per_summary=" in out
  # which `benchmarks.rlpf --mode=fidelity` reads back, by step
  from benchmarks import report
  curve = evaluation.fidelity_curve(report.read_metrics(str(workdir / "policy")))
  assert [r["step"] for r in curve] == [2, 4]
  assert all(0.0 <= r["sampled_latest_copied"] <= 1.0 for r in curve)
  config.rl_train.stop_after_steps = 0
  with ConfigReads() as reads:
    results = run_workflow(config, workdir)
  assert reads.unread(config) == []  # every field of the config is used
  out = capsys.readouterr().out
  assert "[rlpf] resumed from" in out and "at step 2" in out
  # the finished warm-ups are restored, not trained again
  assert "policy/checkpoints at step 4" in out and "[policy] step" not in out
  # the house key scheme <split>/<row>/<task>/<metric>
  for row in ("none", "full_history", "last_k", "initial_policy", "hierarchical",
              "hierarchical_verified", "rlpf"):
    assert 0.0 <= results[f"test/{row}/next_title/accuracy"] <= 1.0
    assert np.isfinite(results[f"test/{row}/usersumbench/quality_stderr"])
  assert results["test/hierarchical_verified/summary/hallucination"] == 0.0
  for task, metric in (("next_title", ""), ("usersumbench", "quality_")):
    gain = f"test/rlpf/{task}/{metric}gain_over_initial"  # paired over the users
    assert -1.0 <= results[gain] <= 1.0
    assert np.isfinite(results[gain + "_stderr"])
  assert 0.0 <= results["test/rlpf/summary/writes_recent"] <= 1.0
  assert results["test/full_history/context/tokens"] > results[
      "test/last_k/context/tokens"]
  assert all(k.count("/") == 3 for k in results if k.startswith("test/"))
  rows = table.rows_of(results)  # what the benchmarks read back
  assert rows["rlpf"]["next_title"] == results["test/rlpf/next_title/accuracy"]
  assert rows["rlpf"]["quality_gain_over_initial"] == results[
      "test/rlpf/usersumbench/quality_gain_over_initial"]
  assert rows["rlpf"]["writes_recent"] == results["test/rlpf/summary/writes_recent"]
  assert "| rlpf |" in (workdir / "table.md").read_text()
  saved = json.load(open(workdir / "results.json"))
  assert saved["config"]["workflow"] == "rlpf"
  # the same warm-ups and an RL stage never stopped: the same table
  straight = tmp_path / "straight"
  for stage in ("policy", "predictor"):
    shutil.copytree(workdir / stage, straight / stage)
  unstopped = run_workflow(config, straight)
  test_figures = lambda r: {k: v for k, v in r.items() if k.startswith("test/")}  # noqa: E731
  assert test_figures(unstopped) == test_figures(results)

  def last_rl_step(run):  # the loss, KL, gradient norm... of RL's step 4
    rows = [json.loads(line) for line in open(run / "rlpf" / "metrics.jsonl")]
    return [r for r in rows if r["split"] == "rlpf" and r["step"] == 4][-1]
  assert last_rl_step(straight) == last_rl_step(workdir)
  # RL as LoRA adapters over the same warm-ups: the same stages and table
  lora = tmp_path / "lora"
  for stage in ("policy", "predictor"):
    shutil.copytree(workdir / stage, lora / stage)
  config.rl.lora_rank = 2
  lora_results = run_workflow(config, lora)
  assert 0.0 <= lora_results["test/rlpf/next_title/accuracy"] <= 1.0
  assert np.isfinite(last_rl_step(lora)["loss"])


def test_rlpf_config_errors_name_the_field(tmp_path):
  config = rlpf_config.get_config("tiny")
  config.rl.baseline = "ppo"
  with pytest.raises(ConfigError, match="config.rl.baseline='ppo'"):
    run_workflow(config, tmp_path)
  config = rlpf_config.get_config("tiny")
  config.predictor.contexts.unknown = 1.0
  with pytest.raises(ConfigError, match="config.predictor.contexts"):
    run_workflow(config, tmp_path)
  config = rlpf_config.get_config("tiny")
  config.rl.reward = "log"
  with pytest.raises(ConfigError, match="config.rl.reward='log'"):
    run_workflow(config, tmp_path)
  for field, value in (("lora_rank", -1), ("lora_alpha", 0.0)):
    config = rlpf_config.get_config("tiny")
    config.rl[field] = value
    with pytest.raises(ConfigError, match=f"config.rl.{field}={value}"):
      run_workflow(config, tmp_path)
  config = rlpf_config.get_config("tiny")
  config.rl.seed = -1  # every `seed` field, by name (what main.py checks first)
  with pytest.raises(ConfigError, match=r"config.rl.seed=-1 must be >= 0"):
    config_checks.check_config(config)


def test_the_fidelity_curve_leaves_the_unsupported_share_of_no_titles_undefined():
  """`benchmarks.rlpf --mode=fidelity`: valid rows by step, training rows
  ignored, and summaries that wrote no title have no unsupported share (not
  0, which would read as perfect copying)."""
  def row(step, greedy_titles, legacy=False):
    greedy = {"greedy_titles_per_summary": greedy_titles, "greedy_latest_copied": 0.0}
    if greedy_titles or legacy:  # runs before the source left it out logged 0
      greedy["greedy_titles_unsupported"] = 0.4 if greedy_titles else 0.0
    return {"step": step, "split": "valid", **greedy,
            "sampled_titles_per_summary": 1.0, "sampled_titles_unsupported": 0.7,
            "sampled_latest_copied": 0.1}
  rows = [row(400, 0.0), {"step": 300, "split": "policy", "loss": 1.0}, row(200, 1.5),
          row(600, 0.0, legacy=True)]
  curve = evaluation.fidelity_curve(rows)
  assert [r["step"] for r in curve] == [200, 400, 600]
  assert curve[0]["greedy_titles_unsupported"] == 0.4
  assert curve[1]["greedy_titles_unsupported"] is None
  assert curve[2]["greedy_titles_unsupported"] is None
  assert curve[1]["sampled_titles_unsupported"] == 0.7


def test_a_parts_worth_is_compared_within_prompts_that_both_write_and_omit_it():
  """The diagnostic of `benchmarks.rlpf --mode=rollouts`: a prompt whose
  samples all write (or all omit) the part says nothing about its worth, and
  is left out."""
  written = np.array([1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0], bool)
  values = np.array([1, 0, 0, 1, 5, 5, 5, 5, 0, 1, 1, 0], float)
  mean, stderr, n = evaluation.within_prompt_effect(written, values, group=4)
  # prompt 0: 1 - 0; prompt 1: left out; prompt 2: 0 - 2/3
  assert n == 2
  np.testing.assert_allclose(mean, (1 - 2 / 3) / 2)
  np.testing.assert_allclose(stderr, np.std([1, -2 / 3], ddof=1) / np.sqrt(2))


def test_a_paired_gain_cancels_the_spread_between_users():
  """Two contexts read by the same users: the gain's standard error is that of
  the per-user differences, not of either context's scores."""
  old = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
  new = old + np.array([0.1, 0.0, 0.1, 0.0, 0.1, 0.0])
  gain, stderr = evaluation.paired_gain(new, old)
  np.testing.assert_allclose(gain, 0.05)
  np.testing.assert_allclose(stderr, np.std([0.1, 0, 0.1, 0, 0.1, 0], ddof=1) / np.sqrt(6))
  assert stderr < np.std(old, ddof=1) / np.sqrt(6) / 5


def test_the_kl_regularised_optimum_tilts_a_parts_share_by_its_worth():
  """pi* = argmax E[r] - beta KL(pi || pi_0) over a binary choice (write the
  part or not), found numerically, against the closed form."""
  share, worth, beta = 0.21, 0.03, 0.05
  p = np.linspace(1e-4, 1 - 1e-4, 200_001)
  kl = p * np.log(p / share) + (1 - p) * np.log((1 - p) / (1 - share))
  best = p[np.argmax(p * worth - beta * kl)]
  np.testing.assert_allclose(rlpf.kl_regularised_share(share, worth, beta), best,
                             atol=1e-4)
  assert rlpf.kl_regularised_share(share, 0.0, beta) == pytest.approx(share)
  # a tenth of the KL weight: greedy summaries would write the part
  assert rlpf.kl_regularised_share(share, worth, beta) < 0.5
  assert rlpf.kl_regularised_share(share, worth, beta / 10) > 0.5
