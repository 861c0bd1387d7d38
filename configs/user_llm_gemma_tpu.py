"""User-LLM on a real Gemma (v1) checkpoint on a TPU slice (not run in CI).

Point `llm.checkpoint` at the official Flax checkpoint directory (e.g. the
`2b` folder of the Kaggle `gemma/flax/2b` release) and `llm.tokenizer` at its
`tokenizer.model`; LM pretraining is then skipped. The LLM is frozen and
adapted with LoRA; activations are bfloat16; parameters shard over a
data x model mesh (vocabulary, heads and MLP over `model`).

    python main.py --config configs/user_llm_gemma_tpu.py \
      --config.llm.checkpoint=/data/gemma/2b \
      --config.llm.tokenizer=/data/gemma/tokenizer.model \
      --config.data.source=movielens --config.data.dir=/data/ml-100k --workdir W
"""

from configs import user_llm


def get_config():
  config = user_llm.get_config()
  config.llm.update(checkpoint="/data/gemma/2b",
                    tokenizer="/data/gemma/tokenizer.model", dtype="bfloat16",
                    cross_attention_every=6)  # 3 blocks in Gemma 2B's 18 layers
  config.adapter.update(kind="lora", rank=8, alpha=16.0)
  config.encoder.update(embed_dim=256, num_layers=4, num_heads=4, mlp_dim=1024)
  config.userllm.update(strategy="adapters", history_len=200, num_latents=32,
                        perceiver_layers=2, perceiver_heads=4, eval_users=0)
  config.mesh.update(data=-1, model=4)  # a v4-8 / v5e-8: 2 x 4
  config.train.update(batch_size=64, num_steps=3000, learning_rate=1e-4)
  config.encoder_train.update(num_steps=3000)
  return config
