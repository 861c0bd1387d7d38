"""Training stages: the one way a multi-stage workflow trains each model it
builds (User-LLM's LM, encoder and task model; RLPF's policy, predictor and
RL; the federated LLM's warm-up).

A stage is a `train_loop.fit` run in its own sub-directory of the workdir,
scheduled by one config section (`config.<field>`: steps, batch size,
optimiser) and stamped with its identity: the values of the config fields it
depends on (`Stage.depends_on`). So each stage resumes on its own, refuses to
resume under changed values, and a finished stage is reused by any later run
in the same workdir whose values it shares (another User-LLM method over the
same LM, another RL seed over the same warm-ups).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from infra import checkpoint, mesh as mesh_lib, train_loop


@dataclasses.dataclass(frozen=True)
class Stage:
  """field: the config section that schedules it (`config.<field>`);
  depends_on: the dotted config fields its identity holds (None: all of
  them, for the last stage of a workflow)."""
  field: str
  depends_on: tuple[str, ...] | None = None

  def identity(self, config) -> dict:
    """{dotted field: value} of the config values this stage depends on."""
    return checkpoint.config_identity(config, self.depends_on)


def fit(stage: Stage, name: str, config, *, state, shardings, train_step: Callable,
        batches: Callable, mesh, workdir: str, eval_fn: Callable | None = None,
        identity_extras: dict | None = None):
  """Trains `stage` in `<workdir>/<name>` to `config.<stage.field>.num_steps`
  (resuming from its checkpoints); `identity_extras` adds values the config
  does not hold (e.g. a prompt length derived from the data). Returns the
  trained TrainState."""
  schedule = config[stage.field]
  field = f"config.{stage.field}"
  mesh_lib.check_batch_divides(schedule.batch_size, mesh, f"{field}.batch_size")
  return train_loop.fit(
      state=state, state_shardings=shardings, train_step=train_step,
      batch_fn=batches, mesh=mesh, workdir=f"{workdir}/{name}", schedule=schedule,
      eval_fn=eval_fn, name=name, schedule_field=field,
      identity={**stage.identity(config), **(identity_extras or {})})
