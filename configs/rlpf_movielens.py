"""RLPF on MovieLens-100K (configs/rlpf.py's recipe on real histories).

Run: python main.py --config configs/rlpf_movielens.py --workdir runs/rlpf_ml
(reads ../shared/data/movielens-100k; set --config.data.dir elsewhere).
Scale: 943 users (150 test, 50 valid, the rest train), N = 50 rated titles
("Toy Story (4)"), every title one vocabulary piece (`data.title_pieces`),
a predictor that also learns histories as a language model, the same two
small LMs and RL setting as configs/rlpf.py (results: docs/rlpf.md).
"""

from configs import common, rlpf


def get_config(arg: str = ""):
  tiny = common.is_tiny(arg)
  config = rlpf.build(tiny, source="movielens",
                      directory="../shared/data/movielens-100k")
  # every title one vocabulary piece: histories take about half the tokens,
  # a title is one token to copy, and the predictor learns one embedding per
  # title (with titles split into pieces the policy miscopied most of its
  # titles: docs/rlpf.md, benchmarks/results/rlpf_fidelity_movielens.md)
  config.data.title_pieces = True
  # the predictor also learns its history contexts as a language model: with
  # the answer alone as target it read the whole history no better than no
  # context (docs/rlpf.md)
  config.predictor.history_lm_weight = 1.0
  # the RL setting its runs were made with (configs/rlpf.py's earlier
  # default; MovieLens has no runs at other length weights to choose among)
  config.rl.length_beta = 0.001
  if not tiny:
    config.data.valid_users, config.data.test_users = 50, 150
    config.summary.prompt_len = 256
    # 743 training users x 8 cuts; the predictor needs several hundred steps
    # before it reads histories better than no context (its valid curve)
    config.policy_train.num_steps = 800
    config.predictor_train.num_steps = 1000
    config.rl_train.num_steps = 150
    config.rl_train.eval_every = 50
  return config
