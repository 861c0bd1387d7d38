"""Entry point: `python main.py --config configs/<experiment>.py --workdir <dir>`.

Every field of the config can be overridden as `--config.a.b=value`; a variant
of a config is picked after a colon (`configs/default.py:tiny`). The config's
`workflow` names the module whose `run(config, workdir, mesh) -> metrics`
runs; main checks the config's values (infra/config_checks.py), builds the
mesh once, holds the workdir's lock for the run (infra/workdir.py), and only
at a successful end writes the metrics and the config to
`<workdir>/results.json` (infra/results.py). Errors that are the user's to fix
(infra/errors.py) print one line and exit 2; SIGTERM saves a checkpoint and
exits 143.
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter

from absl import app, flags, logging
from ml_collections import config_flags

from configs.common import WORKFLOWS  # config.workflow -> its module

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "metrics and results.json; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def distributed_args() -> dict:
  """jax.distributed.initialize's arguments: none on Cloud TPU, Slurm or
  Open MPI (it finds the cluster itself); elsewhere (e.g. several processes on
  one machine) from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. On CPU the processes' collectives run over gloo."""
  import jax
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if not all(os.environ.get(n) for n in names):
    return {}
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  return {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
          "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
          "process_id": int(os.environ["JAX_PROCESS_ID"])}


def run_experiment(config, workdir: str) -> dict[str, float]:
  """Dispatches to the workflow and writes `<workdir>/results.json`."""
  from infra.errors import ConfigError
  if config.workflow not in WORKFLOWS:
    raise ConfigError(f"config.workflow={config.workflow!r} is not one of "
                      f"{sorted(WORKFLOWS)}")
  from infra import config_checks, workdir as workdir_lib
  config_checks.check_config(config)  # every numeric field, before any work
  import jax
  if config.distributed:  # multi-host TPU / GPU: one process per host
    jax.distributed.initialize(**distributed_args())
  from infra import mesh as mesh_lib, results as results_lib
  mesh = mesh_lib.make_mesh(config.mesh)  # fails early, in one line, if it can't fit
  print(f"[mesh] data={mesh.shape['data']} model={mesh.shape['model']} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)", flush=True)
  with workdir_lib.claim(workdir):  # one run per workdir; no stale results.json
    workflow = importlib.import_module(WORKFLOWS[config.workflow])
    metrics = workflow.run(config, workdir, mesh)
    results = results_lib.write_results(workdir, metrics, config)
  print("results:")
  for name, value in sorted(results.items()):
    print(f"  {name}: {value:.6g}")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from infra.errors import USER_ERRORS, Preempted
  try:
    run_experiment(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except Preempted as e:  # the checkpoint is saved; no results.json
    print(f"stopped: {e}; rerun to resume", file=sys.stderr)
    # stop_after_steps did what was asked; SIGTERM: 128 + 15, as if killed by it
    sys.exit(0 if e.requested else 143)


def parse_flags(argv):
  """absl's parser, but an unknown --config.<field> or variant is a one-line error."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # raised by config_flags overrides
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config field {e} (overrides given: "
          f"{', '.join(overrides)})", file=sys.stderr)
    sys.exit(2)
  except (flags.Error, ValueError) as e:
    # a config file that raised carries its traceback: its last line says why
    lines = [line for line in str(e).splitlines() if line.strip()]
    reason = lines[-1] if "Traceback" in str(e) else " ".join(lines)
    print(f"error: {reason}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
