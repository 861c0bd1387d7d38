"""The policy writing summaries: greedy or sampled, over fixed-shape prompt
batches (decoding.generate with the KV cache)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from summarize import examples as ex
from summarize.corpus import Corpus
from userllm.models import decoding, llm


class Summarizer:
  """The policy's summaries of fixed-shape prompt batches: greedy
  (temperature 0) or sampled."""

  def __init__(self, model: llm.DecoderLM, params, corpus: Corpus,
               batch_size: int):
    self.model, self.params, self.corpus = model, params, corpus
    self.batch_size = batch_size

  def write(self, prompt_rows: list[list[int]], temperature: float = 0.0,
            seed: int = 0) -> np.ndarray:
    """[n, summary_len] ids (0 after eos) of each prompt's summary."""
    out, rng = [], jax.random.PRNGKey(seed)
    for start in range(0, len(prompt_rows), self.batch_size):
      rows = prompt_rows[start:start + self.batch_size]
      rows = rows + [rows[-1]] * (self.batch_size - len(rows))
      prompt, mask = self.corpus.pad_prompts(rows, self.corpus.prompt_len)
      ids = decoding.generate(self.model, self.params, jnp.asarray(prompt),
                              jnp.asarray(mask), jax.random.fold_in(rng, start),
                              max_new_tokens=self.corpus.summary_len,
                              temperature=temperature, eos_id=self.corpus.eos)
      out.append(np.asarray(ids))
    return np.concatenate(out)[:len(prompt_rows)]

  def summaries(self, cuts: ex.Cuts) -> list[str]:
    """Greedy summaries of each cut's history."""
    prompts_ = [self.corpus.policy_prompt(int(u), int(c))
                for u, c in zip(cuts.users, cuts.cuts)]
    return self.corpus.decode_summaries(self.write(prompts_))
