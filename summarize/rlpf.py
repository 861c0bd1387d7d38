"""RLPF: Reinforcement Learning from Prediction Feedback (arXiv 2409.04421).

A policy LM writes a summary of a user's history; a frozen predictor LM reads
only the summary and answers a multiple-choice question about the user's next
activity (the true item's title among distractors, chosen by the likelihood of
each option). The reward is

    r = 1[predictor correct] + w * min(C, beta * (L - summary tokens))

with L the mean length of the initial policy's summaries (`RLConfig.reward`
= "probability" puts the predictor's probability of the right option in
place of 1[correct]). The policy is trained
by REINFORCE with a baseline and an exact KL penalty to the initial policy; no
SFT on RL data and no reward model. One RL step (`make_rl_step`) is a pure
function of (state, batch) jitted once: sampling inside jit (a lax.scan over
tokens with a KV cache), the predictor's scores, rewards, advantages and the
update.

Baselines (`RLConfig.baseline`):
- "value": the paper's learned value V(prompt) (`ValueModel`, a copy of the
  policy's trunk with a scalar head, trained by squared error);
- "rloo": the mean reward of the other `group_size` samples of the prompt;
- "grpo": the group's mean, and the advantage divided by the group's std;
- "none": plain REINFORCE.
The policy trains whole (the paper's) or as LoRA adapters on the frozen
initial policy (`rl_params`' two layouts): the reference is then that base
with the adapters off and the value trunk the base with adapters of its own,
so one copy of the LM's weights serves all three, and frozen weights may be
held in bfloat16 (the released checkpoints' precision): what lets a 7B policy
and its predictor fit a TPU slice (benchmarks/results/tpu_compile.md).

Traps avoided (TRL's): log-probs are those of the sampling distribution,
softmax(logits / temperature) (scoring samples drawn at T = 0.5 with T = 1
log-probs is off-policy); the KL is the exact KL(policy || reference) summed over
the vocabulary at each summary position (never negative, unlike a sampled
log-ratio); the policy gradient uses each summary's summed log-probability (a
per-token mean would reward long summaries of negative advantage); summaries
that hit the length limit without eos keep their reward (`truncated="keep"`),
or get 0 with "zero", and their share is logged.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from userllm.models import adapters, decoding, llm

BASELINES = ("value", "rloo", "grpo", "none")
TRUNCATED = ("keep", "zero")
# what the predictor's answer is worth: "correct" 1[right option] (the paper's);
# "probability" its softmax probability of the right option (same mean
# ordering, far less noise between two summaries of one prompt)
REWARDS = ("correct", "probability")
FROZEN = ("reference", "predictor", "base")  # state.params parts RL never changes


@dataclasses.dataclass(frozen=True)
class RLConfig:
  summary_len: int  # tokens a summary may take (eos included)
  group_size: int = 1  # samples per prompt
  temperature: float = 1.0
  baseline: str = "value"
  kl_coef: float = 0.005  # configs/rlpf.py's defaults, which the workflow passes
  value_coef: float = 0.5
  length_weight: float = 1.0  # w
  length_cap: float = 0.3  # C
  length_beta: float = 0.005  # beta, per token
  length_target: float = 0.0  # L: the initial policy's mean summary tokens
  truncated: str = "keep"
  reward: str = "correct"

  def validate(self) -> "RLConfig":
    if self.baseline not in BASELINES:
      raise ValueError(f"rl.baseline={self.baseline!r} is not one of {BASELINES}")
    if self.reward not in REWARDS:
      raise ValueError(f"rl.reward={self.reward!r} is not one of {REWARDS}")
    if self.truncated not in TRUNCATED:
      raise ValueError(f"rl.truncated={self.truncated!r} is not one of {TRUNCATED}")
    if self.group_size < 1 or (self.baseline in ("rloo", "grpo")
                               and self.group_size < 2):
      raise ValueError(f"rl.group_size={self.group_size} must be >= 1 (>= 2 for "
                       f"the {self.baseline!r} baseline)")
    if self.temperature <= 0:
      raise ValueError(f"rl.temperature={self.temperature} must be > 0")
    return self


class ValueModel(nn.Module):
  """V(prompt): the decoder trunk's final state at the prompt's last token,
  through a scalar head. `trunk` has a DecoderLM's parameters (started from
  the policy's)."""
  config: llm.LLMConfig

  @nn.compact
  def __call__(self, prompt: jax.Array, prompt_mask: jax.Array) -> jax.Array:
    """prompt, prompt_mask: [b, t] left-padded -> [b] float32."""
    hidden, _ = llm.DecoderLM(self.config, name="trunk")(prompt, prompt_mask,
                                                         return_hidden=True)
    head = nn.Dense(1, kernel_init=nn.initializers.zeros, name="head")
    return head(hidden[:, -1].astype(jnp.float32))[:, 0]


def lm_loss(model: llm.DecoderLM, params, batch: dict, rng: jax.Array):
  """Mean cross-entropy of the target tokens (the warm-up stages' loss).

  batch: "tokens", "token_mask", "target_mask" [b, t]."""
  del rng
  logits, _ = model.apply({"params": params}, batch["tokens"], batch["token_mask"])
  loss, accuracy = decoding.target_token_loss(logits, batch["tokens"],
                                              batch["target_mask"])
  return loss, {"token_accuracy": accuracy}


def predictor_loss(model: llm.DecoderLM, params, batch: dict, rng: jax.Array,
                   choice_weight: float = 1.0, history_weight: float = 0.0):
  """The predictor's loss: the true answer's mean token cross-entropy plus
  `choice_weight` x the cross-entropy of choosing it among the row's options
  by likelihood (how it is asked at test), plus `history_weight` x the mean
  next-token cross-entropy over the history contexts' own tokens (each title
  predicted from the events before it: ~50 next-title targets a row instead
  of one), from one pass: the prompt is run once into a KV cache, then every
  option after it.

  batch (predictor_batch in summarize/examples.py): "prompt", "prompt_mask",
  "history_target" [b, p]; "options", "option_mask" [b, k, T]; "answer" [b]."""
  del rng
  targets = batch["history_target"] if history_weight else None
  scores, history_lp = decoding.score_prompts_and_continuations(
      model, params, batch["prompt"], batch["prompt_mask"], targets,
      batch["options"], batch["option_mask"])  # [b, k], [b]
  true_score = jnp.take_along_axis(scores, batch["answer"][:, None], 1)[:, 0]
  true_tokens = jnp.take_along_axis(batch["option_mask"].sum(-1),
                                    batch["answer"][:, None], 1)[:, 0]
  token_loss = -jnp.sum(true_score) / jnp.maximum(jnp.sum(true_tokens), 1)
  choice_loss = -jnp.mean(jax.nn.log_softmax(scores, -1)[
      jnp.arange(scores.shape[0]), batch["answer"]])
  accuracy = jnp.mean(scores.argmax(-1) == batch["answer"])
  metrics = {"token_loss": token_loss, "choice_loss": choice_loss,
             "choice_accuracy": accuracy}
  loss = token_loss + choice_weight * choice_loss
  if history_weight:
    metrics["history_loss"] = -jnp.sum(history_lp) / jnp.maximum(
        jnp.sum(targets[:, 1:]), 1)
    loss = loss + history_weight * metrics["history_loss"]
  return loss, metrics


def summary_masks(summary: jax.Array, eos_id: int):
  """summary [n, s] sampled ids -> (tokens up to and with the first eos [n, s],
  the summary's own tokens (eos excluded) [n, s], finished [n])."""
  is_eos = summary == eos_id
  finished = is_eos.any(1)
  first = jnp.where(finished, jnp.argmax(is_eos, 1), summary.shape[1])
  written = jnp.arange(summary.shape[1])[None, :] <= first[:, None]
  return written, written & ~is_eos, finished


def predictor_prompt(summary: jax.Array, body: jax.Array, head_ids: jax.Array,
                     question_ids: jax.Array):
  """ids("Summary:") + the summary's tokens + ids(question), with the unused
  summary slots masked out (positions count real tokens only).

  summary, body: [n, s]; head_ids [h], question_ids [q] -> ([n, h + s + q] ids,
  mask)."""
  n = summary.shape[0]
  head = jnp.broadcast_to(head_ids, (n, head_ids.shape[0]))
  question = jnp.broadcast_to(question_ids, (n, question_ids.shape[0]))
  ids = jnp.concatenate([head, jnp.where(body, summary, 0), question], 1)
  mask = jnp.concatenate([jnp.ones_like(head, bool), body,
                          jnp.ones_like(question, bool)], 1)
  return ids, mask


def prediction_reward(scores: jax.Array, answer: jax.Array, cfg: RLConfig
                      ) -> tuple[jax.Array, jax.Array]:
  """scores [n, k] (the predictor's, per option), answer [n] -> (the reward's
  prediction term [n], 1[predictor right] [n]), per `cfg.reward`."""
  correct = (scores.argmax(-1) == answer).astype(jnp.float32)
  if cfg.reward == "correct":
    return correct, correct
  probability = jnp.take_along_axis(jax.nn.softmax(scores.astype(jnp.float32), -1),
                                    answer[:, None], 1)[:, 0]
  return probability, correct


def rewards(prediction: jax.Array, length: jax.Array, finished: jax.Array,
            cfg: RLConfig) -> jax.Array:
  """r = prediction + w * min(C, beta * (L - length)); [n] each. `prediction`
  is 1[predictor correct] in the paper (`prediction_reward`)."""
  length_term = cfg.length_weight * jnp.minimum(
      cfg.length_cap, cfg.length_beta * (cfg.length_target - length))
  reward = prediction + length_term
  if cfg.truncated == "zero":
    reward = jnp.where(finished, reward, 0.0)
  return reward


def advantages(reward: jax.Array, value: jax.Array, cfg: RLConfig) -> jax.Array:
  """[n] advantages; rows are prompt-major groups of `group_size` samples."""
  if cfg.baseline == "value":
    return reward - value
  if cfg.baseline == "none":
    return reward
  grouped = reward.reshape(-1, cfg.group_size)
  if cfg.baseline == "rloo":
    others = (grouped.sum(1, keepdims=True) - grouped) / (cfg.group_size - 1)
    return (grouped - others).reshape(-1)
  centred = grouped - grouped.mean(1, keepdims=True)
  return (centred / (grouped.std(1, keepdims=True) + 1e-6)).reshape(-1)


def kl_regularised_share(share: float, worth: float, kl_coef: float) -> float:
  """How often the policy that maximises E[reward] - kl_coef x KL(policy ||
  initial) writes a part that the initial policy writes with probability
  `share` and that is worth `worth` of reward (everything else equal):
  pi*(y) is proportional to pi_0(y) exp(r(y) / kl_coef), so the odds of
  writing it grow by exp(worth / kl_coef). Greedy summaries write the part
  only once this passes 1/2: the KL weight, not only the reward, decides."""
  odds = share / (1.0 - share) * math.exp(worth / kl_coef)
  return odds / (1.0 + odds)


def rl_params(policy: dict, predictor: dict, value_head: dict | None = None,
              policy_adapters: dict | None = None,
              value_adapters: dict | None = None, frozen_dtype=None) -> dict:
  """The RL state's parameters from the warm-ups' (plain or boxed trees).

  Whole policy (no `policy_adapters`): {"policy": policy, "reference": policy,
  "predictor": predictor, "value": {"trunk": policy, "head": value_head}}.
  LoRA (`policy_adapters`, `value_adapters`: `adapters.split_adapters` of an
  adapted policy's and value model's init): {"base": policy, "policy":
  policy_adapters, "predictor": predictor, "value": {"trunk": value_adapters,
  "head": value_head}}; `rl_views` joins them back. "value" only with a
  value head. The frozen parts (FROZEN) are cast to `frozen_dtype` if given.
  """
  cast = ((lambda tree: jax.tree.map(lambda x: x.astype(frozen_dtype), tree))
          if frozen_dtype is not None else (lambda tree: tree))
  lora = policy_adapters is not None
  params = {"predictor": cast(predictor)}
  if lora:
    params.update(base=cast(policy), policy=policy_adapters)
  else:
    params.update(policy=policy, reference=cast(policy))
  if value_head is not None:
    params["value"] = {"trunk": value_adapters if lora else policy,
                       "head": value_head}
  return params


def rl_views(trainable: dict, frozen: dict) -> tuple[dict, dict, dict | None]:
  """(policy, reference, value) parameters as the models read them, from the
  RL state's trainable and FROZEN parts (either layout of `rl_params`): with
  LoRA, the base with the policy's adapters, with zero adapters (B = 0: the
  initial policy exactly) and with the value's adapters."""
  value = trainable.get("value")
  if "base" not in frozen:
    return trainable["policy"], frozen["reference"], value
  base, mine = frozen["base"], trainable["policy"]
  policy = adapters.merge_adapters(mine, base)
  reference = adapters.merge_adapters(jax.tree.map(jnp.zeros_like, mine), base)
  if value is not None:
    value = {"trunk": adapters.merge_adapters(value["trunk"], base),
             "head": value["head"]}
  return policy, reference, value


def trained_policy(params: dict, rl_policy_config: llm.LLMConfig) -> dict:
  """The policy of the RL state `params` as plain DecoderLM parameters (the
  warm-up's tree, without adapters): with LoRA, the adapters folded into the
  base in float32 (`adapters.merge_lora`; a bfloat16 base would round the
  small updates away; `rl_policy_config` is the adapted policy's config)."""
  if "base" not in params:
    return params["policy"]
  base = jax.tree.map(lambda x: x.astype(jnp.float32), params["base"])
  merged, _ = adapters.merge_lora(adapters.merge_adapters(params["policy"], base),
                                  rl_policy_config)
  return merged


def rl_optimizer(tx: optax.GradientTransformation, params: dict
                 ) -> optax.GradientTransformation:
  """`tx` on the policy (and value model), nothing for the frozen parts."""
  labels = {part: ("frozen" if part in FROZEN else "train") for part in params}
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def rl_loss(policy: llm.DecoderLM, value_model: ValueModel | None, cfg: RLConfig,
            trainable: dict, frozen: dict, roll: dict):
  """The RL loss of one rollout: -mean(advantage x the summary's summed
  log-probability) + kl_coef x the exact KL to the reference + value_coef x
  the value's squared error. Returns (loss, metrics). Log-probabilities and
  the KL are those of the policy the summaries were sampled from,
  softmax(logits / cfg.temperature), for policy and reference alike.

  trainable, frozen: the RL state's parts (`rl_params`, read through
  `rl_views`); roll (make_rl_step's rollout): "prompt", "prompt_mask"
  [n, p]; "summary", "written" [n, s]; "reward" [n].
  """
  p, s = roll["prompt"].shape[1], roll["summary"].shape[1]
  tokens = jnp.concatenate([roll["prompt"], roll["summary"]], 1)
  token_mask = jnp.concatenate([roll["prompt_mask"], roll["written"]], 1)
  def summary_logits(params):
    """The logits at p - 1 .. p + s - 2 (those that predict the summary's
    tokens) alone: the vocabulary projection of every prompt position would
    be most of the step's memory at a real vocabulary."""
    hidden, _ = policy.apply({"params": params}, tokens, token_mask,
                             return_hidden=True)
    return policy.apply({"params": params}, hidden[:, p - 1:p + s - 1],
                        method=policy.logits_of)
  policy_params, reference_params, value_params = rl_views(trainable, frozen)
  logits = summary_logits(policy_params)
  ref_logits = jax.lax.stop_gradient(summary_logits(reference_params))
  # the sampled policy is softmax(logits / temperature): its log-probs and its
  # KL, so that the gradient is on-policy at any temperature
  log_probs = jax.nn.log_softmax(logits / cfg.temperature, -1)
  ref_log_probs = jax.nn.log_softmax(ref_logits / cfg.temperature, -1)
  target = roll["written"].astype(jnp.float32)
  token_lp = jnp.take_along_axis(log_probs, roll["summary"][..., None], -1)[..., 0]
  sequence_lp = jnp.sum(token_lp * target, 1)
  token_kl = jnp.sum(jnp.exp(log_probs) * (log_probs - ref_log_probs), -1)
  sequence_kl = jnp.sum(token_kl * target, 1)
  if value_model is not None:
    value = value_model.apply({"params": value_params}, roll["prompt"],
                              roll["prompt_mask"])
    value_loss = jnp.mean(jnp.square(value - roll["reward"]))
  else:
    value, value_loss = jnp.zeros_like(roll["reward"]), jnp.zeros(())
  advantage = jax.lax.stop_gradient(advantages(roll["reward"], value, cfg))
  pg_loss = -jnp.mean(advantage * sequence_lp)
  kl = jnp.mean(sequence_kl)
  loss = pg_loss + cfg.kl_coef * kl + cfg.value_coef * value_loss
  return loss, {"pg_loss": pg_loss, "kl": kl, "value_loss": value_loss,
                "advantage_std": jnp.std(advantage)}


def make_rollout(policy: llm.DecoderLM, predictor: llm.DecoderLM, cfg: RLConfig,
                 head_ids, question_ids, eos_id: int, bare_question_ids=None):
  """rollout(params, batch, rng) -> the RL step's samples and their rewards
  (no gradient): `cfg.group_size` summaries per prompt at `cfg.temperature`,
  read by the predictor, which chooses among the options.

  With `bare_question_ids` ([bos] + the question) the predictor chooses by
  calibrated scores: each option's log-likelihood after the summary minus
  that after the bare question (evaluation.Predictor.decide).

  params: {"policy", "predictor"}; batch (rl_batch in summarize/examples.py):
  "prompt", "prompt_mask" [b, p]; "options", "option_mask" [b, k, T];
  "answer" [b]. Rows of the result are prompt-major groups, n = b x g:
  "prompt", "prompt_mask" [n, p]; "summary", "written" [n, s]; "finished",
  "correct", "prediction", "length", "reward" [n].
  """
  head_ids, question_ids = jnp.asarray(head_ids), jnp.asarray(question_ids)
  g, s = cfg.group_size, cfg.summary_len

  def rollout(params, batch, rng):
    prompt = jnp.repeat(batch["prompt"], g, 0)
    prompt_mask = jnp.repeat(batch["prompt_mask"], g, 0)
    summary = decoding.generate(policy, params["policy"], prompt, prompt_mask, rng,
                                max_new_tokens=s, temperature=cfg.temperature,
                                eos_id=eos_id)
    written, body, finished = summary_masks(summary, eos_id)
    ids, mask = predictor_prompt(summary, body, head_ids, question_ids)
    scores = decoding.score_continuations(
        predictor, params["predictor"], ids, mask,
        jnp.repeat(batch["options"], g, 0), jnp.repeat(batch["option_mask"], g, 0))
    if bare_question_ids is not None:  # the options' own prior, removed
      bare = jnp.broadcast_to(jnp.asarray(bare_question_ids),
                              (batch["prompt"].shape[0], len(bare_question_ids)))
      prior = decoding.score_continuations(
          predictor, params["predictor"], bare, jnp.ones_like(bare, bool),
          batch["options"], batch["option_mask"])
      scores = scores - jnp.repeat(prior, g, 0)
    prediction, correct = prediction_reward(scores, jnp.repeat(batch["answer"], g),
                                            cfg)
    length = body.sum(1).astype(jnp.float32)
    reward = rewards(prediction, length, finished, cfg)
    return jax.tree.map(jax.lax.stop_gradient, dict(
        prompt=prompt, prompt_mask=prompt_mask, summary=summary, written=written,
        finished=finished, correct=correct, prediction=prediction, length=length,
        reward=reward))

  return rollout


def make_rl_step(policy: llm.DecoderLM, value_model: ValueModel | None,
                 predictor: llm.DecoderLM, tx: optax.GradientTransformation,
                 cfg: RLConfig, head_ids, question_ids, eos_id: int,
                 bare_question_ids=None):
  """step(state, batch) -> (state, metrics) for `train_loop.fit`: a rollout
  (`make_rollout`, whose arguments these are), then `rl_loss`'s update.

  state.params: `rl_params`' (whole policy or LoRA; with the value baseline
  `value_model` must be built on the same config as `policy`); batch as
  make_rollout's. Only the trainable parts get gradients; the frozen ones
  leave the step as they came in.
  """
  cfg.validate()
  rollout = make_rollout(policy, predictor, cfg, head_ids, question_ids, eos_id,
                         bare_question_ids)

  loss_fn = functools.partial(rl_loss, policy, value_model, cfg)

  def step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    frozen = {k: v for k, v in state.params.items() if k in FROZEN}
    trainable = {k: v for k, v in state.params.items() if k not in FROZEN}
    policy_params = rl_views(trainable, frozen)[0]
    roll = rollout({"policy": policy_params, "predictor": frozen["predictor"]},
                   batch, rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, roll)
    grad_norm = optax.tree.norm(grads)
    # the frozen parts' zero updates (rl_optimizer) are never applied: they
    # go out as they came in, no full-size zero tree is kept alive
    updates, opt_state = tx.update({**grads, **jax.tree.map(jnp.zeros_like, frozen)},
                                   state.opt_state, state.params)
    params = {**optax.apply_updates(state.params, updates), **frozen}
    metrics.update(
        loss=loss, grad_norm=grad_norm, reward=roll["reward"].mean(),
        accuracy=roll["correct"].mean(), prediction=roll["prediction"].mean(),
        summary_tokens=roll["length"].mean(),
        truncated=1.0 - roll["finished"].mean())
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), metrics

  return step
