"""KV-cache decoding (greedy and sampling) and candidate scoring for `DecoderLM`.

Prompts are left-padded (real tokens end at the last column), so every row's
next token is predicted by the last logit. `conditioning` holds the keyword
arguments that carry the user (`prefix`/`prefix_mask` for a soft prompt,
`user_tokens`/`user_mask` for cross-attention) and the task (`task_ids`, for
task-routed adapters); decoding steps after the prompt pass all but the soft
prompt, which already sits in the cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from userllm.models import llm


def _prefix_length(conditioning: dict) -> int:
  prefix = conditioning.get("prefix")
  return 0 if prefix is None else prefix.shape[1]


def _per_step(conditioning: dict) -> dict:
  """What every decoding step needs again: all but the soft prompt."""
  return {k: v for k, v in conditioning.items()
          if k in ("user_tokens", "user_mask", "task_ids")}


def prefill(model: llm.DecoderLM, params, prompt: jax.Array,
            prompt_mask: jax.Array, extra_slots: int, conditioning: dict):
  """Runs the prompt into a fresh cache with `extra_slots` free slots after it.

  Returns (last logits [b, vocab], cache). Only the last position is
  projected onto the vocabulary (a long prompt's [b, t, vocab] would be most
  of the memory at a real vocabulary).
  """
  hidden, cache = _prefill_hidden(model, params, prompt, prompt_mask,
                                  extra_slots, conditioning)
  return _logits(model, params, hidden[:, -1]), cache


def _prefill_hidden(model, params, prompt, prompt_mask, extra_slots, conditioning):
  """The prompt run into a fresh cache: (final-normed states [b, t, embed],
  cache)."""
  size = _prefix_length(conditioning) + prompt.shape[1] + extra_slots
  cache = llm.init_cache(model.config, prompt.shape[0], size,
                         jnp.dtype(model.config.dtype))
  return model.apply({"params": params}, prompt, prompt_mask, cache=cache,
                     return_hidden=True, **conditioning)


def _logits(model, params, hidden):
  return model.apply({"params": params}, hidden, method=model.logits_of)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens",
                                             "temperature", "eos_id"))
def generate(model: llm.DecoderLM, params, prompt: jax.Array,
             prompt_mask: jax.Array, rng: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, eos_id: int = 1,
             conditioning: dict | None = None) -> jax.Array:
  """Greedy (temperature 0) or sampled continuation of left-padded prompts.

  Returns [b, max_new_tokens] int32; after a row's `eos_id` the row holds 0 (pad).
  """
  conditioning = conditioning or {}
  logits, cache = prefill(model, params, prompt, prompt_mask, max_new_tokens,
                          conditioning)

  def pick(logits, key):
    if temperature == 0.0:
      return logits.argmax(-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature).astype(jnp.int32)

  def step(carry, key):
    logits, cache, done = carry
    token = jnp.where(done, 0, pick(logits, key))
    next_logits, cache = model.apply(
        {"params": params}, token[:, None], ~done[:, None], cache=cache,
        **_per_step(conditioning))
    return (next_logits[:, -1], cache, done | (token == eos_id)), token

  done = jnp.zeros(prompt.shape[:1], bool)
  keys = jax.random.split(rng, max_new_tokens)
  _, tokens = jax.lax.scan(step, (logits, cache, done), keys)
  return tokens.T


def _repeat(tree, times: int):
  """Repeats every batch-leading leaf `times` times (row i -> rows i*times...)."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, times, 0), tree)


def score_continuations(model: llm.DecoderLM, params, prompt: jax.Array,
                        prompt_mask: jax.Array, candidates: jax.Array,
                        candidate_mask: jax.Array,
                        conditioning: dict | None = None) -> jax.Array:
  """Log-likelihood of every candidate after every prompt, sharing each prompt's
  KV cache across candidates (the prompt is run once, not once per candidate).

  prompt, prompt_mask: [b, t] left-padded (a pad may also sit between real
  tokens: positions count real tokens only); candidates, candidate_mask:
  [c, T] right-padded, the same for every prompt, or [b, c, T], each prompt's
  own (e.g. a multiple-choice question's options). Returns [b, c] float32:
  sum of log p(candidate tokens | prompt).
  """
  scores, _ = score_prompts_and_continuations(
      model, params, prompt, prompt_mask, None, candidates, candidate_mask,
      conditioning)
  return scores


def score_prompts_and_continuations(model: llm.DecoderLM, params,
                                    prompt: jax.Array, prompt_mask: jax.Array,
                                    prompt_targets: jax.Array | None,
                                    candidates: jax.Array,
                                    candidate_mask: jax.Array,
                                    conditioning: dict | None = None):
  """`score_continuations` [b, c], and from the same pass over the prompts
  the sum of log p(prompt[:, j] | prompt[:, :j]) over `prompt_targets` [b, t]
  (a language-model loss on part of the prompt) [b] (None when not given)."""
  conditioning = conditioning or {}
  b, c, length = prompt.shape[0], candidates.shape[-2], candidates.shape[-1]
  hidden, cache = _prefill_hidden(model, params, prompt, prompt_mask, length,
                                  conditioning)
  # every prompt position's logits only when the prompt itself is scored
  prompt_logits = _logits(model, params, hidden if prompt_targets is not None
                          else hidden[:, -1:])
  prompt_lp = None if prompt_targets is None else token_log_likelihood(
      prompt_logits, prompt, prompt_targets)
  cache = _repeat(cache, c)
  if candidates.ndim == 3:  # per prompt: row i's candidates follow prompt i
    tiled = candidates.reshape(b * c, length)
    tiled_mask = candidate_mask.reshape(b * c, length)
  else:
    tiled = jnp.tile(candidates, (b, 1))
    tiled_mask = jnp.tile(candidate_mask, (b, 1))
  logits, _ = model.apply({"params": params}, tiled, tiled_mask, cache=cache,
                          **_repeat(_per_step(conditioning), c))
  # token 0 is predicted by the prompt's last logit, token j by logit j - 1.
  predicting = jnp.concatenate([jnp.repeat(prompt_logits[:, -1], c, 0)[:, None],
                                logits[:, :-1]], 1)
  log_probs = jax.nn.log_softmax(predicting, -1)
  token_lp = jnp.take_along_axis(log_probs, tiled[..., None], -1)[..., 0]
  return jnp.sum(token_lp * tiled_mask, 1).reshape(b, c), prompt_lp


def token_log_likelihood(logits: jax.Array, tokens: jax.Array,
                         target_mask: jax.Array) -> jax.Array:
  """[b] sum over target positions of log p(tokens[:, j] | logits[:, j - 1]).

  logits: [b, t, vocab] of a forward over `tokens` [b, t]; target_mask [b, t]
  marks the tokens to score (never position 0).
  """
  log_probs = jax.nn.log_softmax(logits[:, :-1], -1)
  token_lp = jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
  return jnp.sum(token_lp * target_mask[:, 1:], 1)


def target_token_loss(logits: jax.Array, tokens: jax.Array,
                      target_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, accuracy) per target token, the same scoring as
  `token_log_likelihood` (logits [b, t, vocab] of `tokens` [b, t];
  target_mask [b, t])."""
  count = jnp.maximum(target_mask[:, 1:].sum(), 1)
  loss = -jnp.sum(token_log_likelihood(logits, tokens, target_mask)) / count
  hits = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) * target_mask[:, 1:]
  return loss, jnp.sum(hits) / count
