"""RLPF on the embedded synthetic data: warm up a policy LM on programmatic
summaries and a predictor LM on questions about users, then train the policy by
RL from the frozen predictor's feedback, and score every context on held-out
users (summarize/workflow.py).

Scale: two 2-layer, 128-wide Gemma-style LMs trained from scratch (the value
model is a third copy of the policy's trunk), histories of the latest N = 50
events (title + rating), summaries of at most 32 tokens. Most of the time
goes to the two warm-ups; a new RL setting on the same warm-ups reruns only
RL and the evaluation (docs/rlpf.md: timings, results and why each setting
below is what it is). `configs/rlpf.py:tiny` is the variant the tests run; configs/rlpf_movielens.py reads
MovieLens-100K; configs/rlpf_gemma_tpu.py starts both LMs from Gemma
checkpoints.
"""

import ml_collections

from configs import common


def stage(tiny: bool, batch_size: int, num_steps: int, learning_rate: float,
          warmup_steps: int, eval_every: int = 0) -> ml_collections.ConfigDict:
  if tiny:
    batch_size, num_steps, warmup_steps, eval_every = 8, 4, 1, 2 if eval_every else 0
  return common.train(
      common.schedule(num_steps=num_steps, log_every=2 if tiny else 50,
                      eval_every=eval_every, checkpoint_every=4 if tiny else 200,
                      eval_batch_size=8 if tiny else 32),
      common.optimizer(batch_size, learning_rate, warmup_steps))


def build(tiny: bool, source: str = "synthetic", directory: str = ""
          ) -> ml_collections.ConfigDict:
  config = common.experiment("rlpf")
  config.data = common.data(
      tiny, source, directory,
      vocab_size=400 if tiny else 2000,  # an upper bound on the trained pieces
      vocab_model="bpe",  # whole words: shorter histories than unigram
      history_len=8 if tiny else 50,  # N: events a history shows
      future_len=2 if tiny else 5,  # held-out events after a test cut
      min_history=4 if tiny else 10,  # events before any cut
      valid_users=8 if tiny else 100, test_users=8 if tiny else 300,
      cuts_per_user=2 if tiny else 8)
  # every catalogue title one vocabulary piece (SentencePiece user-defined
  # symbols): copying a title is then copying one token, and the predictor
  # learns one embedding per title (docs/rlpf.md)
  config.data.title_pieces = False
  config.llm = ml_collections.ConfigDict(dict(
      embed_dim=32 if tiny else 128, num_layers=2, num_heads=2 if tiny else 4,
      num_kv_heads=1, head_dim=16 if tiny else 32, mlp_dim=64 if tiny else 512,
      rope_max_wavelength=10_000, family="gemma1", dtype="float32",
      remat=False,  # recompute layers in the backward pass (llm.LLMConfig.remat)
      # a released Gemma (configs/user_llm.py says how; gemma_variants.VARIANTS)
      variant="",
      # Gemma Flax checkpoint dirs to start the warm-ups from (+ its tokenizer)
      policy_checkpoint="", predictor_checkpoint="", tokenizer="",
      drop_vision=False))  # Gemma 3 4B+: load the text model without its vision tower
  config.summary = ml_collections.ConfigDict(dict(
      max_len=16 if tiny else 32,  # tokens a summary may take (eos included)
      prompt_len=96 if tiny else 288,  # tokens of a policy prompt / context
      # the programmatic summaries the predictor learns to read: the chance
      # each part is written (texts.Style)
      style=ml_collections.ConfigDict(dict(genres=0.6, rating=0.5, recent=0.4,
                                           saw=0.5)),
      merge_fraction=0.25,  # warm-up rows that merge chunk summaries
      chunk_len=4 if tiny else 10))  # events per chunk (hierarchical summarizer)
  # the initial policy's warm-up summaries, in the same terms: what its
  # greedy summaries say before RL. recent=0.2 is a generic start (as the
  # paper's zero-shot one) that RL must improve on: at 0.4 the initial
  # policy already writes the latest titles (docs/rlpf.md)
  config.policy_style = ml_collections.ConfigDict(dict(genres=0.6, rating=0.5,
                                                       recent=0.2, saw=0.5))
  # the predictor's training contexts (examples.CONTEXTS) and their weights
  config.predictor = ml_collections.ConfigDict(dict(contexts=ml_collections.ConfigDict(
      dict(summary=0.5, last_k=0.1, random_k=0.1, first_k=0.1, full=0.15,
           none=0.05)),
      # x the cross-entropy of choosing the true answer among the options by
      # likelihood (+ its token loss): a next-token loss alone leaves the
      # titles' own likelihoods to decide among 4 options (chance accuracy)
      choice_weight=1.0,
      # x the next-token loss over the history contexts' own tokens: every
      # title of a history a target, not only the next one (a from-scratch
      # predictor has no pretrained knowledge of the items; docs/rlpf.md).
      # 0: off
      history_lm_weight=0.0,
      # choose titles by calibrated scores: a title's log-likelihood after the
      # context minus after the bare question (RL reward and evaluation)
      calibrate=True))
  config.rl = ml_collections.ConfigDict(dict(
      num_options=4,  # the multiple-choice question: the next item + distractors
      distractors="popularity_matched",  # | popularity | uniform
      group_size=2,  # samples per prompt
      # the sampling policy is softmax(logits / temperature) (its log-probs
      # and KL are RL's; how faithful its samples are at each temperature:
      # benchmarks/results/rlpf_rollouts_synthetic.md)
      temperature=1.0,
      baseline="value",  # value (the paper's) | rloo | grpo | none
      # x exact KL(policy || initial policy) per summary. The KL-regularised
      # optimum writes a part exp(worth / kl_coef) times as often (odds) as
      # the initial policy, so this weight decides which parts RL can make
      # the policy write (rlpf.kl_regularised_share;
      # benchmarks/results/rlpf_rollouts_kl.md)
      kl_coef=0.005,
      value_coef=0.5,
      # r = correct + length_weight * min(length_cap, length_beta * (L - tokens))
      # beta per token, chosen on validation users among the settings in
      # docs/rlpf.md (benchmarks/results/rlpf_selection.md)
      length_weight=1.0, length_cap=0.3, length_beta=0.005,
      truncated="keep",  # a summary without eos keeps its reward | "zero"
      # the prediction term: "correct" 1[predictor right] (the paper's) |
      # "probability" its softmax probability of the right option (docs/rlpf.md)
      reward="correct",
      length_target_prompts=16 if tiny else 256,  # prompts that measure L
      # > 0: RL trains LoRA adapters of this rank on every projection of the
      # policy (and of the value trunk), the warmed-up policy frozen beneath
      # them and read as the reference: one copy of the LM's weights, what
      # lets 7B+ policies fit a TPU slice (benchmarks/results/tpu_compile.md).
      # 0: the whole policy trains (the paper's)
      lora_rank=0, lora_alpha=16.0,
      # > 0: RL's samples and batch order drawn anew (config.seed also seeds
      # the warm-ups), to repeat RL on the same warm-ups
      seed=0))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8 if tiny else 50,
      verifier_tries=2 if tiny else 3))  # the verifier's rewrites
  # eval: how faithfully the valid users' greedy and sampled summaries copy
  # titles (workflow.policy_valid_fn); its copying improves with warm-up
  # steps (benchmarks/results/rlpf_fidelity_synthetic.md)
  config.policy_train = stage(tiny, 64, 1500, 3e-3, 50, eval_every=200)
  # eval: the valid users' next title read from no context, the whole history
  # and a programmatic summary (does the predictor read contexts yet?)
  config.predictor_train = stage(tiny, 64, 1500, 3e-3, 50, eval_every=250)
  # 16 prompts x group_size 2 = 32 sampled summaries a step
  config.rl_train = stage(tiny, 16, 400, 3e-4, 10, eval_every=100)
  return config


def get_config(arg: str = ""):
  return build(common.is_tiny(arg))
