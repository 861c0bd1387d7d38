"""Entry point: `python main.py --config configs/<experiment>.py --workdir <dir>`.

Every field of the config can be overridden as `--config.a.b=value`; a variant
of a config is picked after a colon (`configs/default.py:tiny`). The config's
`workflow` names the module whose `run(config, workdir, mesh) -> metrics`
runs; main builds the mesh once, and at the end writes the metrics and the
config to `<workdir>/results.json` (infra/results.py).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter

from absl import app, flags, logging
from ml_collections import config_flags

# config.workflow -> the workflow module (imported by this file and benchmarks only)
WORKFLOWS = {
    "next_item": "userllm.next_item_workflow",
    "user_llm": "userllm.workflow",
    "federated": "federated.workflow",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "metrics and results.json; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])


def run_experiment(config, workdir: str) -> dict[str, float]:
  """Dispatches to the workflow and writes `<workdir>/results.json`."""
  from infra.errors import ConfigError
  if config.workflow not in WORKFLOWS:
    raise ConfigError(f"config.workflow={config.workflow!r} is not one of "
                      f"{sorted(WORKFLOWS)}")
  import jax
  if config.distributed:
    jax.distributed.initialize()  # multi-host TPU / GPU: one process per host
  from infra import mesh as mesh_lib, results as results_lib
  mesh = mesh_lib.make_mesh(config.mesh)  # fails early, in one line, if it can't fit
  print(f"[mesh] data={mesh.shape['data']} model={mesh.shape['model']} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)", flush=True)
  os.makedirs(workdir, exist_ok=True)
  workflow = importlib.import_module(WORKFLOWS[config.workflow])
  results = results_lib.write_results(workdir, workflow.run(config, workdir, mesh),
                                      config)
  print("results:")
  for name, value in sorted(results.items()):
    print(f"  {name}: {value:.6g}")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  from data.movielens import MalformedRowError
  from infra.errors import ConfigError
  try:
    run_experiment(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, MalformedRowError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


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
