"""The one checkpoint helper: orbax CheckpointManager over `<workdir>/checkpoints`.

Saves every `save_every` steps and at the end, keeps the newest `keep`, and
restores the latest on start, so re-running a command with the same workdir
resumes. Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save never leaves a half-written checkpoint that
a resume would pick up.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from infra.errors import ConfigError


class Checkpointer:

  def __init__(self, workdir: str, save_every: int, keep: int):
    if save_every < 1 or keep < 1:
      raise ConfigError("checkpoint_every and keep_checkpoints must be >= 1, got "
                        f"{save_every} and {keep}")
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.save_every = save_every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def restore_or_keep(self, state):
    """The latest saved state (with `state`'s shardings), or `state` if none."""
    step = self.manager.latest_step()
    if step is None:
      return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def maybe_save(self, step: int, state, is_last: bool) -> bool:
    """Saves at every `save_every`-th step and at the last one."""
    if step % self.save_every and not is_last:
      return False
    return self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def close(self) -> None:
    """Waits for pending asynchronous saves to finish."""
    self.manager.wait_until_finished()
    self.manager.close()
