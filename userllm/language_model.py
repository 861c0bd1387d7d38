"""The decoder LM of any workflow, from its config: its LLMConfig, its
tokenizer, and its parameters from a released Gemma checkpoint or fresh.

One implementation for every workflow that builds an LM (User-LLM, RLPF's
policy and predictor, the federated LLM): `config.llm` holds the shapes
(`embed_dim`, `num_layers`, ...), the Gemma family or released variant
(`family`, `variant`: userllm/models/gemma_variants.py), `dtype`, and where a
checkpoint and tokenizer are (`checkpoint` or a workflow's own names for them,
`tokenizer`, `drop_vision`). `config.data` says how a vocabulary trained here
is made (`vocab_size`, `vocab_model`, `title_pieces`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax

from data.vocab import Tokenizer, train_vocabulary
from infra import paths
from infra.errors import ConfigError
from userllm.models import gemma_loader, gemma_variants, llm

# config.llm fields that say where an LM comes from, not what it is
SOURCE_FIELDS = ("checkpoint", "policy_checkpoint", "predictor_checkpoint",
                 "tokenizer", "drop_vision", "family", "variant")
VOCAB_MODELS = ("unigram", "bpe")


def llm_config(config, vocab_size: int, **overrides) -> llm.LLMConfig:
  """`config.llm` as the LLMConfig of an LM built here: the released
  `variant`'s shapes and constants when one is named, else the config's shapes
  with its `family`'s constants; `overrides` set other fields (cross-attention,
  adapters). Errors name the config field."""
  fields = {k: v for k, v in config.llm.items() if k not in SOURCE_FIELDS}
  try:
    fields.update(gemma_variants.scratch_fields(
        config.llm.family, config.llm.variant,
        {k: fields[k] for k in gemma_variants.SHAPE_FIELDS}))
    return llm.LLMConfig(vocab_size=vocab_size, **{**fields, **overrides}).validate()
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e) if str(e).startswith("config.")
                      else f"config.llm: {e}") from None


def tokenizer(config, workdir: str, corpus: Callable[[], list[str]],
              titles: Sequence[str] = ()) -> Tokenizer:
  """`config.llm.tokenizer` (a released Gemma tokenizer.model, or any
  SentencePiece model), else a vocabulary trained on `corpus()` with
  `config.data.vocab_size` pieces of `config.data.vocab_model` and kept at
  `<workdir>/spm.model` (the workflow, its seqio tasks and its benchmarks all
  read that one file), with each of `titles` one piece when
  `config.data.title_pieces`."""
  d = config.data
  if config.llm.tokenizer:
    if not paths.exists(config.llm.tokenizer):
      raise ConfigError(f"config.llm.tokenizer={config.llm.tokenizer!r} does not "
                        "exist")
    if d.title_pieces:
      raise ConfigError("config.data.title_pieces needs a vocabulary trained "
                        "here; config.llm.tokenizer is given")
    return Tokenizer(paths.local_file(config.llm.tokenizer))  # gs:// copied
  if d.vocab_model not in VOCAB_MODELS:
    raise ConfigError(f"config.data.vocab_model={d.vocab_model!r} is not one of "
                      f"{VOCAB_MODELS}")
  # SentencePiece reads and writes local files: for a workdir on object
  # storage, trained locally and uploaded, and read from a local copy
  path = paths.local_file(
      paths.join(workdir, "spm.model"),
      lambda local: train_vocabulary(corpus(), local, d.vocab_size,
                                     model_type=d.vocab_model,
                                     whole=tuple(titles) if d.title_pieces else ()))
  return Tokenizer(path)


def pretrained(config, path: str, mesh, vocab_size: int | None = None
               ) -> tuple[llm.LLMConfig, dict]:
  """(LLMConfig, parameters) of the Gemma checkpoint at `path`, restored onto
  `mesh` with `config.llm.variant`'s constants (or those of its shapes).
  `vocab_size`: the tokenizer's pieces, which the checkpoint's embedding rows
  must cover; the logits are then over those pieces only (Gemma's table has
  128 spare rows)."""
  base, params = gemma_loader.load_checkpoint(
      path, drop_vision=config.llm.drop_vision, mesh=mesh,
      variant=config.llm.variant)
  if vocab_size is None:
    return base, params
  if vocab_size > base.vocab_size:
    raise ConfigError(f"config.llm.tokenizer has {vocab_size} pieces, more than "
                      f"the {base.vocab_size} embeddings of {path}")
  table = params["embedder"]["input_embedding"]
  rows = dataclasses.replace(base, vocab_size=vocab_size).padded_vocab
  params["embedder"]["input_embedding"] = table[:rows]
  return dataclasses.replace(base, vocab_size=vocab_size), params


def load_into(state, shardings, pretrained_params: dict, subtree: str = ""):
  """`state` with its parameters (those under `subtree` when given) replaced
  leaf by leaf by `pretrained_params` (host or device arrays, resharded on
  device to the state's shardings); leaves the checkpoint lacks (adapters,
  cross-attention, heads) keep their fresh values."""
  params = dict(state.params)
  if subtree:
    params[subtree] = gemma_loader.merge_pretrained(params[subtree],
                                                    pretrained_params, subtree)
  else:
    params = gemma_loader.merge_pretrained(params, pretrained_params, "llm")
  return state.replace(params=jax.device_put(params, shardings.params))

