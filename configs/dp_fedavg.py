"""DP-FedAvg: federated next-item training with client-level differential
privacy (federated/aggregators.gaussian_dp, accounted by federated/privacy.py
with dp-accounting). Every client's update is clipped to L2 norm
`dp.clip_norm`, the clipped sum gets Gaussian noise of std z * clip_norm, and
the average divides by the cohort size however many clients finish.

  python main.py --config configs/dp_fedavg.py --workdir runs/dp
  --config.federated.dp.target_epsilon=4   (pick z for epsilon 4 at delta)
  --config.federated.dp.noise_multiplier=0 (clipping only: no privacy)
  --config.federated.dp.target_quantile=0.5 (adaptive clipping to the median)

`configs/dp_fedavg.py:tiny` is the tests' variant. epsilon after each
evaluation and at the end is `dp_epsilon` in metrics.jsonl and results.json.
"""

import ml_collections

from configs import fedavg


def get_config(arg: str = ""):
  config = fedavg.get_config(arg)
  fed = config.federated
  fed.algorithm = "fedavgm"  # server momentum helps under noise (McMahan et al.)
  fed.aggregator = "dp"
  fed.weighting = "uniform"  # each client counts once: sensitivity clip_norm
  fed.server_learning_rate = 1.0
  fed.dp = ml_collections.ConfigDict(dict(
      clip_norm=1.0,
      noise_multiplier=1.0,
      target_epsilon=0.0,  # > 0: choose the noise multiplier for this epsilon
      delta=1e-5,  # below 1 / number of clients
      accountant="rdp",  # rdp | pld
      target_quantile=0.0,  # > 0: adaptive clipping to this quantile of norms
      clip_learning_rate=0.2))
  return config
