"""Multi-task adaptation with LoRA experts (userllm/adapters.py) on the embedded
synthetic data: five personalisation tasks (data/prompts.py: next title,
favourite genre, rating of a given title, genre of a given title, a summary
"<genre>, <genre>; <rating level>"), trained jointly through one frozen LLM with
one set of adapters, each example carrying its task id.

The base LLM is pretrained from scratch on next-title prompts only (the
`lm` stage; real runs load Gemma), so four of the five tasks are new to it.
Stage 3 trains only the adapters (`userllm.strategy="adapters"`). Pick the kind:

    python main.py --config configs/multitask.py --config.adapter.kind=mode --workdir W
    (kinds: lora | molora | mode | molora_sd)

Equal budgets: MoLoRA and MoDE use rank 4 with 4 experts (exactly the same
parameter count, see adapters.py); every other kind takes the rank that brings
its count closest to MoLoRA's (`adapter.match_params_of`). Runs of several
kinds can share a workdir: the LM stage is trained once.

Scale: a 2-layer, 128-wide LM; text prompts with the latest 10 titles and their
ratings; adapters on every attention and MLP projection.
"""

from configs import user_llm


def get_config():
  config = user_llm.get_config()
  config.userllm.update(
      method="text_prompt", strategy="adapters", history_len=10, lm_history=10,
      text_prompt_len=256, text_ratings=True,
      tasks=("next_title", "favourite_genre", "rating", "title_genre", "summary"),
      lm_tasks=("next_title",), cuts_per_user=2, eval_users=200, eval_base=False)
  config.adapter.update(
      kind="mode", rank=4, num_experts=4, alpha=16.0, top_k=0, router="token",
      targets=("q", "k", "v", "out", "gate", "up", "down"),
      match_params_of="molora")
  config.lm_train.update(batch_size=32, num_steps=600, learning_rate=3e-3)
  config.train.update(batch_size=32, num_steps=600, learning_rate=3e-3,
                      eval_every=0, eval_batch_size=16)
  return config
