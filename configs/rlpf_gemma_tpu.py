"""RLPF with Gemma checkpoints for the policy and the predictor, on a TPU slice
(not run in CI).

Point `llm.policy_checkpoint` and `llm.predictor_checkpoint` at official Flax
checkpoint directories (Gemma 1, 2 or 3 text models; e.g. the `2b` folder of
the Kaggle `gemma/flax/2b` release for both) and `llm.tokenizer` at their
`tokenizer.model`. Both warm-ups then start from those weights (a short
supervised stage on the programmatic summaries and the questions, so that the
policy writes in the summary format the hallucination checker parses and the
predictor answers in the options' format), activations are bfloat16, and
parameters shard over a data x model mesh. The paper's setup: N = 50
activities, batch 64, REINFORCE with a value baseline.

    python main.py --config configs/rlpf_gemma_tpu.py \
      --config.llm.policy_checkpoint=/data/gemma/2b \
      --config.llm.predictor_checkpoint=/data/gemma/2b \
      --config.llm.tokenizer=/data/gemma/tokenizer.model \
      --config.data.source=movielens --config.data.dir=/data/ml-100k --workdir W

What fits a v5e-8 (16 GiB a chip), compiled for it on a CPU host
(benchmarks/results/tpu_compile.md, docs/accelerators.md): the whole
policy's RL state (policy, reference, predictor, value trunk, two Adam
states) does not hold batch 64 on Gemma 2B in any layout tried, so RL trains
LoRA adapters (rank 16, every projection) over one bfloat16 copy of the
policy, with FSDP and recomputed layers: batch 64 on Gemma 2B. For the
whole policy, as in the paper: `--config.rl.lora_rank=0
--config.mesh.fsdp=false --config.mesh.model=8 --config.rl_train.batch_size=8`.
Larger variants (`--config.llm.variant=gemma_7b`, or the checkpoint's own)
need a smaller RL batch: the table gives the largest that fits. The RL
learning rate of the adapters (1e-5, 10x the whole policy's 1e-6: adapters
start at zero) has not been tuned on Gemma: choose it on validation users.
"""

from configs import rlpf


def get_config():
  config = rlpf.build(tiny=False)
  config.llm.update(policy_checkpoint="/data/gemma/2b",
                    predictor_checkpoint="/data/gemma/2b",
                    tokenizer="/data/gemma/tokenizer.model", dtype="bfloat16")
  config.summary.update(prompt_len=640, max_len=64)  # Gemma's tokenizer: longer ids
  # a v4-8 / v5e-8: 2 x 4, every weight also split over `data` (FSDP)
  config.mesh.update(data=-1, model=4, fsdp=True)
  config.llm.remat = True  # layers recomputed in the backward pass
  config.policy_train.update(batch_size=64, num_steps=500, learning_rate=2e-5)
  config.predictor_train.update(batch_size=64, num_steps=1000, learning_rate=2e-5)
  config.rl_train.update(batch_size=64, num_steps=2000, learning_rate=1e-5,
                         eval_every=250)
  config.rl.update(group_size=1, baseline="value", lora_rank=16)
  config.eval.batch_size = 64
  return config
