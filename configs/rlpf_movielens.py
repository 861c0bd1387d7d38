"""RLPF on MovieLens-100K (configs/rlpf.py's recipe on real histories).

Run: python main.py --config configs/rlpf_movielens.py --workdir runs/rlpf_ml
(reads ../shared/data/movielens-100k; set --config.data.dir elsewhere).
Scale: 943 users (150 test, 50 valid, the rest train), N = 50 rated titles
("Toy Story (4)"), every title one vocabulary piece (`data.title_pieces`),
a predictor that also learns histories as a language model, the same two
small LMs and RL setting as configs/rlpf.py; about 80 minutes on 2 CPU
cores, most of it the two warm-ups (800 + 1,000 steps).
"""

from configs import common, rlpf


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = rlpf.build(tiny, source="movielens",
                      directory="../shared/data/movielens-100k")
  # every title one vocabulary piece: 50 events take at most 202 tokens (147
  # on average over the test contexts, 316 with titles split), a title is
  # one token to copy, and the predictor learns one embedding
  # per title (with real titles split into pieces, the policy miscopied 94%
  # of its titles and the predictor barely read histories: README, RLPF)
  config.data.title_pieces = True
  # the predictor also learns its history contexts as a language model: with
  # the answer alone as target it read the whole history at 0.193-0.293
  # against 0.267 from no context; with every title a target, 0.547 (the
  # co-occurrence ceiling is 0.567; README, RLPF on MovieLens)
  config.predictor.history_lm_weight = 1.0
  if not tiny:
    config.data.valid_users, config.data.test_users = 50, 150
    config.summary.prompt_len = 256
    # 743 training users x 8 cuts. The predictor needs ~750 steps to read
    # histories (without title pieces, valid next title from the whole
    # history: 0.30 at step 250, 0.22 at 500, 0.42 at 750; 0.18 from no
    # context): a 250-step warm-up left it at the no-context level
    config.policy_train.num_steps = 800
    config.predictor_train.num_steps = 1000
    config.rl_train.num_steps = 150
    config.rl_train.eval_every = 50
  return config
