"""User-LLM (arXiv 2402.13598): a user encoder's embeddings, compressed by a
Perceiver and projected, condition a decoder LLM.

Parameters: {"encoder": the fused `ItemSequenceTransformer`, "perceiver",
"projector", "llm": `DecoderLM` (its "cross_attention_i" blocks belong to the
integration, its "<target>_adapter" subtrees to the adapters: LoRA, MoLoRA,
MoDE; `userllm/models/adapters.py`)}.

Integrations (`UserLLMConfig.integration`):
- "cross_attention": the user tokens are attended to by gated cross-attention
  blocks inside the LLM; the LLM's input is the task prompt alone;
- "soft_prompt": the user tokens are prepended to the prompt's embeddings;
- "text": no user tokens; the LLM alone (the text-prompt and no-history
  baselines, whose prompts carry the history as text or not at all).

Training strategies (`STRATEGIES`) say which of those parts train; frozen ones
are wrapped in `stop_gradient` (no weight gradients are computed for them) and
get `optax.set_to_zero` inside `optax.multi_transform`, so they carry no
optimiser state at all.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from userllm.models import adapters, decoding, llm as llm_lib
from userllm.models import perceiver as perceiver_lib
from userllm.models import sequence_model as sm

INTEGRATIONS = ("cross_attention", "soft_prompt", "text")
# Which parts train under each strategy. "integration" is the cross-attention
# blocks: new parameters that exist only to read the user tokens.
STRATEGIES = {
    "full": {"encoder", "projector", "integration", "llm", "adapter"},
    "adapters": {"encoder", "projector", "integration", "adapter"},
    "frozen_llm": {"encoder", "projector", "integration"},
    "projector": {"projector", "integration"},
}


@dataclasses.dataclass(frozen=True)
class UserLLMConfig:
  encoder: sm.SequenceModelConfig
  llm: llm_lib.LLMConfig
  integration: str
  num_latents: int = 16  # Perceiver queries; 0: every encoder state is a user token
  perceiver_layers: int = 1
  perceiver_heads: int = 2
  # > 0: a linear head from the mean user token to this many item logits, for
  # the auxiliary next-item loss that keeps the user tokens informative
  aux_items: int = 0
  normalise_user_tokens: bool = False  # a LayerNorm at the projector's output
  # add to each event's encoder state its title as the LLM reads it (the mean
  # of the LLM's embeddings of the title's tokens, normalised and projected):
  # the user tokens then say which items were seen in the LLM's own token
  # space, instead of by item ids the LLM would have to learn to spell
  item_text: bool = False

  def validate(self) -> "UserLLMConfig":
    if self.integration not in INTEGRATIONS:
      raise ValueError(f"integration={self.integration!r} is not one of "
                       f"{INTEGRATIONS}")
    has_cross = bool(self.llm.cross_attention_every)
    if has_cross != (self.integration == "cross_attention"):
      raise ValueError("llm.cross_attention_every must be > 0 exactly when "
                       "integration='cross_attention'")
    return self

  @property
  def uses_user(self) -> bool:
    return self.integration != "text"


class UserLLM(nn.Module):
  config: UserLLMConfig

  def setup(self):
    cfg = self.config.validate()
    if cfg.uses_user:
      self.encoder = sm.ItemSequenceTransformer(cfg.encoder)
      if cfg.num_latents:
        self.perceiver = perceiver_lib.PerceiverResampler(
            cfg.num_latents, cfg.perceiver_layers, cfg.perceiver_heads)
      self.projector = perceiver_lib.Projector(cfg.llm.embed_dim,
                                               cfg.normalise_user_tokens)
      if cfg.item_text:
        self.title_norm = nn.LayerNorm(name="title_norm")
        self.title_projection = nn.Dense(
            cfg.encoder.embed_dim, name="title_projection",
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")))
      if cfg.aux_items:  # its rows padded as the LM's vocabulary is, so they
        # split over the mesh's `model` axis (1,683 MovieLens items would not)
        rows = -(-cfg.aux_items // llm_lib.VOCAB_MULTIPLE) * llm_lib.VOCAB_MULTIPLE
        self.user_head = nn.Dense(rows, kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("embed", "vocab")), name="user_head")
    self.llm = llm_lib.DecoderLM(cfg.llm)

  def user_tokens(self, events: dict, train: bool = False):
    """events: {"items", "ratings": [b, h] int, "genres": [b, h, g] (an
    encoder of fusion "id" reads the items only), and with item_text
    "titles": [b, h, t] title token ids (0 = padding)} -> (tokens
    [b, n, llm width], mask [b, n] bool); n = num_latents or h."""
    states = self.encoder.encode(events["items"], train,  # fusion "id": items only
                                 ratings=events.get("ratings"),
                                 genres=events.get("genres"))
    if self.config.item_text:
      states = states + self.title_projection(self.title_norm(
          self.title_text(events["titles"])))
    mask = events["items"] != sm.PAD_ITEM
    if self.config.num_latents:
      states = self.perceiver(states, mask)
      mask = jnp.ones(states.shape[:2], bool)
    return self.projector(states), mask

  def title_text(self, titles: jax.Array) -> jax.Array:
    """titles [b, h, t] token ids -> [b, h, llm width]: the mean of the LLM's
    input embeddings of each title's tokens (zeros for a padding event)."""
    real = (titles != 0)[..., None]
    embedded = self.llm.embed(titles.reshape(titles.shape[0], -1)).reshape(
        *titles.shape, -1)
    return (embedded * real).sum(-2) / jnp.maximum(real.sum(-2), 1)

  def conditioning(self, events: dict | None, train: bool = False) -> dict:
    """The keyword arguments that carry the user into `DecoderLM.__call__`."""
    if not self.config.uses_user:
      return {}
    return self._conditioning(*self.user_tokens(events, train))

  def _conditioning(self, user: jax.Array, mask: jax.Array) -> dict:
    if self.config.integration == "soft_prompt":
      return {"prefix": user, "prefix_mask": mask}
    return {"user_tokens": user, "user_mask": mask}

  def __call__(self, events: dict | None, tokens: jax.Array, token_mask: jax.Array,
               train: bool = False, task_ids: jax.Array | None = None,
               with_user_items: bool = False):
    """-> logits [b, t, vocab] for the text tokens (soft-prompt slots dropped);
    task_ids [b] feed task-routed adapters. With `with_user_items` (a model
    built with aux_items) -> (logits, [b, aux_items] next-item logits from the
    mean user token), from the same pass over the user path."""
    conditioning, item_logits = {}, None
    if self.config.uses_user:
      user, mask = self.user_tokens(events, train)
      conditioning = self._conditioning(user, mask)
      if self.config.aux_items and (with_user_items or self.is_initializing()):
        item_logits = self.user_head(mean_token(user, mask))[..., :self.config.aux_items]
    logits, _ = self.llm(tokens, token_mask, task_ids=task_ids, **conditioning)
    logits = logits[:, logits.shape[1] - tokens.shape[1]:]
    return (logits, item_logits) if with_user_items else logits


def mean_token(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """[b, n, d] tokens, [b, n] mask -> [b, d] mean of the real ones."""
  return (tokens * mask[..., None]).sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1)


def part_of(path: tuple[str, ...]) -> str:
  """Which trainable part a parameter path belongs to (see STRATEGIES)."""
  top = path[0]
  if top == "encoder":
    return "encoder"
  if top in ("perceiver", "projector", "user_head", "title_norm", "title_projection"):
    return "projector"
  if any(p.startswith("cross_attention_") for p in path):
    return "integration"
  if any(p.endswith(adapters.SUFFIX) for p in path):
    return "adapter"
  return "llm"


def trainable_mask(params, strategy: str):
  """Pytree of bools: True where `strategy` trains the parameter."""
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r} is not one of {sorted(STRATEGIES)}")
  parts = STRATEGIES[strategy]
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: part_of(tuple(k.key for k in path)) in parts, params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f"strategy={strategy!r} trains nothing in this model "
                     "(e.g. 'frozen_llm' or 'projector' with a text prompt)")
  return mask


# Parts created fresh for the task model (the LLM and encoder arrive pretrained).
NEW_PARTS = ("projector", "integration")


def masked_optimizer(tx: optax.GradientTransformation, mask,
                     new_scale: float = 1.0) -> optax.GradientTransformation:
  """`tx` on the trainable leaves, zero updates and no state for the rest; the
  updates of trainable NEW_PARTS leaves (Perceiver, projector, cross-attention
  blocks and their gates) are scaled by `new_scale`, i.e. their learning rate
  is `new_scale` x the stage's. A zero-initialised tanh gate passes no gradient
  to its block until it opens, and at the stage's rate it opens by at most
  about lr per step."""
  def label(path, trainable):
    if not trainable:
      return "frozen"
    return "new" if part_of(tuple(k.key for k in path)) in NEW_PARTS else "train"
  labels = jax.tree_util.tree_map_with_path(label, mask)
  return optax.multi_transform(
      {"train": tx, "new": optax.chain(tx, optax.scale(new_scale)),
       "frozen": optax.set_to_zero()}, labels)


def freeze(params, mask):
  """stop_gradient on the frozen leaves, so no gradient is computed for them."""
  return jax.tree.map(lambda p, m: p if m else jax.lax.stop_gradient(p),
                      params, mask)


def lm_loss(model: UserLLM, mask, params, batch: dict, rng: jax.Array,
            train: bool = True, aux_weight: float = 0.0):
  """Mean next-token cross-entropy over the target tokens, plus `aux_weight` x
  the cross-entropy of the next item ("events"["next_item"]) from the mean user
  token (`UserLLM(..., with_user_items=True)`; a model built with aux_items),
  computed in the same forward pass.

  batch: {"events" (absent for text integration), "tokens", "token_mask",
  "target_mask": [b, t], optionally "task_ids": [b]}; target_mask marks the
  answer tokens (prompt excluded).
  """
  out = model.apply({"params": freeze(params, mask)}, batch.get("events"),
                    batch["tokens"], batch["token_mask"], train,
                    batch.get("task_ids"), with_user_items=bool(aux_weight),
                    rngs={"dropout": rng})
  logits, item_logits = out if aux_weight else (out, None)
  loss, accuracy = decoding.target_token_loss(logits, batch["tokens"],
                                              batch["target_mask"])
  metrics = {"token_accuracy": accuracy}
  if aux_weight:
    aux = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(item_logits, -1),
                                        batch["events"]["next_item"][:, None], -1))
    metrics["aux_item_loss"] = aux
    loss = loss + aux_weight * aux
  return loss, metrics
