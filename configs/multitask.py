"""Multi-task adaptation with LoRA experts (userllm/models/adapters.py) on the embedded
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
ratings; adapters on every attention and MLP projection; 600 + 600 steps of
batch 32. `configs/multitask.py:tiny` is the tests' variant.
"""

from configs import common, user_llm


def get_config(arg: str = ""):
  return user_llm.build(common.is_tiny(arg), multitask=True)
