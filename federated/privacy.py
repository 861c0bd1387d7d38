"""Privacy accounting for DP-FedAvg (the `dp` aggregator of
federated/aggregators.py), with Google's `dp-accounting` library.

A round samples a cohort of m of the N participating clients and releases the
Gaussian-noised sum of their clipped updates, noise std z C for sensitivity C:
a Poisson-subsampled Gaussian mechanism with q = m / N, composed over the
rounds. (Cohorts are drawn without replacement at a fixed size; accounting
them as Poisson-sampled is the standard approximation of DP-FedAvg papers.)
The accountant is RDP (`dp_accounting.rdp`) or PLD (`dp_accounting.pld`,
tighter). `target_epsilon` > 0 picks the smallest z whose epsilon after
`num_rounds` is at most the target.

With adaptive clipping the clipped-count query spends budget too: the update
query runs at z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) for the account's z
(Andrew et al. 2021), so the whole round is accounted at z.
"""

from __future__ import annotations

import contextlib
import dataclasses

import dp_accounting
from absl import logging as absl_logging

from infra.errors import ConfigError

ACCOUNTANTS = ("rdp", "pld")


def _accountant(name: str):
  if name == "rdp":
    return dp_accounting.rdp.RdpAccountant()
  if name == "pld":
    return dp_accounting.pld.PLDAccountant()
  raise ConfigError(f"config.federated.dp.accountant={name!r} is not one of "
                    f"{ACCOUNTANTS}")


@contextlib.contextmanager
def _quiet_accountant():
  """The RDP accountant logs a warning for every order whose series does not
  converge at small q; it then leaves that order out, which is correct, and
  the warnings (dozens per calibration) are not the user's to act on."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)


def dp_event(noise_multiplier: float, sampling_probability: float, rounds: int):
  """The DpEvent of `rounds` Poisson-sampled Gaussian rounds."""
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)),
      rounds)


def epsilon(noise_multiplier: float, sampling_probability: float, rounds: int,
            delta: float, accountant: str = "rdp") -> float:
  """(epsilon, delta)-DP after `rounds` rounds; inf without noise."""
  if noise_multiplier <= 0:
    return float("inf")
  if rounds == 0:
    return 0.0
  account = _accountant(accountant)
  account.compose(dp_event(noise_multiplier, sampling_probability, rounds))
  with _quiet_accountant():
    return float(account.get_epsilon(delta))


def noise_for_epsilon(target_epsilon: float, sampling_probability: float,
                      rounds: int, delta: float, accountant: str = "rdp") -> float:
  """The smallest noise multiplier with epsilon <= target after `rounds`."""
  with _quiet_accountant():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda z: dp_event(z, sampling_probability, rounds),
        target_epsilon, delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0)))


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a DP run is accounted at."""
  noise_multiplier: float  # z of the whole round (what the accountant sees)
  update_noise_multiplier: float  # z_delta, the update query's own noise
  count_noise_std: float  # sigma_b of the adaptive clipped-count query (0: none)
  sampling_probability: float
  delta: float
  accountant: str

  def epsilon(self, rounds: int) -> float:
    return epsilon(self.noise_multiplier, self.sampling_probability, rounds,
                   self.delta, self.accountant)


def budget(fed, population: int, rounds: int) -> Budget:
  """`config.federated.dp` resolved for `population` participating clients
  and `rounds` rounds (z from `target_epsilon` when it is > 0)."""
  dp = fed.dp
  if population < fed.clients_per_round:
    raise ConfigError(f"config.federated.clients_per_round={fed.clients_per_round}"
                      f" is more than the {population} participating clients")
  if not 0 < dp.delta < 1:
    raise ConfigError(f"config.federated.dp.delta={dp.delta} must be in (0, 1)")
  _accountant(dp.accountant)  # a one-line error for an unknown name
  q = fed.clients_per_round / population
  z = (noise_for_epsilon(dp.target_epsilon, q, rounds, dp.delta, dp.accountant)
       if dp.target_epsilon > 0 else dp.noise_multiplier)
  count_std = 0.0
  update_z = z
  if dp.target_quantile > 0:
    count_std = fed.clients_per_round / 20.0  # sigma_b = m / 20 (Andrew et al.)
    if z > 0 and z >= 2 * count_std:
      raise ConfigError(
          f"noise multiplier {z:.3g} leaves no budget for the adaptive clip's "
          f"count noise (std {count_std:.3g}): raise clients_per_round")
    update_z = (z ** -2 - (2 * count_std) ** -2) ** -0.5 if z > 0 else 0.0
  return Budget(z, update_z, count_std, q, dp.delta, dp.accountant)
