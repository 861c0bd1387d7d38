"""Federated personalisation of the LLM itself (federated/llm_workflow.py):
clients train LoRA adapters of a small decoder LLM whose base weights are
frozen and held once; the task is the next title after a history of titles,
every title one vocabulary piece, ranked over the whole catalogue.

Run on the embedded synthetic data:
  python main.py --config configs/federated_llm.py --workdir runs/fed_llm
On MovieLens-100K, clients = users:
  python main.py --config configs/federated_llm.py --config.data.source=movielens \\
    --config.data.dir=../shared/data/movielens-100k --workdir runs/fed_llm_ml100k
Variants: FELLRec's dynamic balance --config.federated.personalisation=fellrec,
local-only adapters =local; centralised LoRA through the same round
--config.federated.pooling=central --config.federated.clients_per_round=1;
MoDE adapters --config.adapter.kind=mode; federated User-LLM (the user
encoder, Perceiver, projector and cross-attention trained by the clients,
the LLM frozen) --config.federated.task=user_llm --config.adapter.kind=none
(docs/federated_llm.md).
Scale: a 2-layer, 64-wide Gemma-style LM (0.25M base parameters on
MovieLens-100K's 1.9k-piece vocabulary, 1 MB, held once), LoRA rank 4 on q,
k, v and the attention output (3.6k parameters, 14 KB a round each way),
histories of the latest 20 titles; 500 warm-up steps (chosen on validation
clients among 250, 500 and 1,000: benchmarks/results/federated_llm_ml100k.md),
200 rounds of 32 clients. `configs/federated_llm.py:tiny` is the tests'
variant.
"""

import ml_collections

from configs import common


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = common.experiment("federated_llm")
  config.data = common.data(
      tiny,
      vocab_size=100 if tiny else 200,  # word pieces beside the titles
      vocab_model="bpe",
      title_pieces=True,  # every catalogue title one piece (required)
      history_len=8 if tiny else 20)  # H: titles a prompt shows
  config.llm = ml_collections.ConfigDict(dict(
      embed_dim=32 if tiny else 64, num_layers=2, num_heads=2, num_kv_heads=1,
      head_dim=16 if tiny else 32, mlp_dim=64 if tiny else 256,
      rope_max_wavelength=10_000, family="gemma1",
      variant="",  # a released Gemma's shapes (gemma_variants), trained here
      tokenizer="",  # title pieces need a vocabulary trained here
      dtype="float32",
      remat=False))  # recompute layers in the backward pass (llm.LLMConfig.remat)
  # the clients' adapters (userllm/models/adapters.py): lora | molora | mode
  # | molora_sd on the named projections
  config.adapter = ml_collections.ConfigDict(dict(
      kind="lora", rank=4, alpha=8.0, num_experts=4, top_k=0,
      targets=("q", "k", "v", "out")))
  # federated User-LLM (--config.federated.task=user_llm,
  # federated/user_llm_task.py): the clients train this user encoder over
  # the history's item ids, the Perceiver, the projector and the LLM's gated
  # cross-attention blocks; the LLM stays the frozen warm-up
  config.encoder = common.sequence_model(tiny, dropout=0.0)
  config.encoder.fusion = "id"  # item ids only (the clients' rows carry no more)
  config.userllm = ml_collections.ConfigDict(dict(
      integration="cross_attention",  # or soft_prompt
      cross_attention_every=1,  # a block after every LLM layer
      # tanh of the blocks' gates at init: 0 (Flamingo's) leaves a fresh block
      # without gradient until its gate opens; 0.1 learnt faster here
      # (benchmarks/results/federated_user_llm_ml100k.md)
      gate_init=0.1,
      num_latents=4 if tiny else 8, perceiver_layers=1, perceiver_heads=2,
      normalise_user_tokens=True,  # unit-scale user tokens (docs/user_llm.md)
      # + each event's title piece as the frozen LLM embeds it on its encoder
      # state (UserLLMConfig.item_text): the user tokens name the titles in
      # the LLM's own token space
      item_text=True))
  # x the mean cross-entropy of the history's titles in every client's loss
  # (the adapters' task; the User-LLM's history is not text)
  # (besides the answer's): every title of a history a target
  config.task = ml_collections.ConfigDict(dict(history_lm_weight=1.0))
  # the base LLM's centralised warm-up on the training histories as text
  config.base_train = common.train(
      common.schedule(num_steps=4 if tiny else 500, log_every=2 if tiny else 100,
                      eval_every=0 if tiny else 250,
                      checkpoint_every=4 if tiny else 250,
                      eval_batch_size=16 if tiny else 256),
      common.optimizer(8 if tiny else 64, 3e-3, 1 if tiny else 50))
  config.federated = common.federated(
      tiny, task="next_title", algorithm="fedavg",
      clients_per_round=8 if tiny else 32,
      # a client keeps its latest 8 windows (160 titles): every client runs
      # as many local steps as the largest (padded, masked), so the cap
      # sets a round's cost (MovieLens-100K: 2,976 of 3,513 windows kept)
      max_examples_per_client=0 if tiny else 8,
      client_batch_size=4 if tiny else 8,
      client_optimizer="adam", client_learning_rate=3e-3,
      # "local": every participating client keeps its own adapters, never
      # mixed (the control for "fellrec")
      personalisation="none")
  config.train = (  # rounds
      common.schedule(num_steps=4, log_every=2, eval_every=2, checkpoint_every=2,
                      eval_batch_size=16) if tiny else
      common.schedule(num_steps=200, log_every=20, eval_every=100,
                      checkpoint_every=50, eval_batch_size=256))
  return config
