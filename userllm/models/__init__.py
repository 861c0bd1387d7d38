"""The shared Flax model library: what `userllm/`, `summarize/` and `federated/`
build on.

- `llm`: a Gemma-style decoder LM (Gemma 1/2/3 switches, KV cache, soft
  prompts, gated cross-attention to user tokens).
- `gemma_variants`: the released Gemma configs as data.
- `gemma_loader`: released Gemma checkpoints in and out.
- `decoding`: sampling, greedy decoding and continuation scoring.
- `adapters`: LoRA, MoLoRA and MoDE on any of the LM's projections.
- `sequence_model`: the item-sequence transformer (the user encoder).
- `perceiver`: the Perceiver that compresses encoder states into user tokens.
- `dual_encoder`: the retrieval dual encoder (user tower x item tower).
"""
