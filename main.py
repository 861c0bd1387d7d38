"""Entry point: `python main.py --config configs/<experiment>.py --workdir <dir>
[--mode=train|eval|recommend|answer|summarize|export]`.

Every field of the config can be overridden as `--config.a.b=value`; a variant
of a config is picked after a colon (`configs/default.py:tiny`). The config's
`workflow` names the module whose `run(config, workdir, mesh) -> metrics`
runs; main checks the config's values (infra/config_checks.py), builds the
mesh once, holds the workdir's lock for the run and refuses a workdir of
another workflow's run or of files not ours (infra/workdir.py), and only at a
successful end writes the metrics and the config to `<workdir>/results.json`
(infra/results.py). `--mode` (docs/using.md) picks what is done with the
workdir: `train` (the default: train what is not trained yet, evaluate),
`eval` (restore every stage, train none, evaluate: results.json again) or a
mode that reads a finished run (`MODES`: the workflow module's function of
that name), whose JSON is the only thing on stdout (progress goes to stderr)
and which leaves results.json as it is. A mode the workflow has not is a
one-line error. Errors that are the user's to fix print one line
`error: ...` and exit 2: the classes of infra/errors.py, and mistakes on the
command line (a config file that cannot be read, an unknown field, with the
nearest names in this config, an ill-typed value). SIGTERM saves a checkpoint
and exits 143.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from configs.common import WORKFLOWS  # config.workflow -> its module

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, "
                               "metrics and results.json; reused to resume.")
flags.mark_flags_as_required(["config", "workdir"])

# --mode -> (the workflow module's function, the flags it needs, those it may
# take); train and eval write results.json, the others print JSON
MODES = {
    "train": ("run", (), ()),
    "eval": ("evaluate", (), ()),
    "recommend": ("recommend", ("users",), ("k",)),
    "answer": ("answer", ("users", "task"), ("k", "item")),
    "summarize": ("summarize", ("users",), ()),
    "export": ("export", ("out",), ()),
}
WRITES_RESULTS = ("train", "eval")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do with the "
                          "workdir (docs/using.md): train, eval (restore, never "
                          "train, evaluate), recommend, answer, summarize, export.")
_USERS = flags.DEFINE_list("users", None, "recommend, answer, summarize: users by "
                           "their ids in the data files (MovieLens user ids; the "
                           "synthetic data's 1..N), comma-separated.")
_TASK = flags.DEFINE_string("task", None, "answer: the task asked (next_title, "
                            "favourite_genre, rating, title_genre, summary, "
                            "last_title).")
_K = flags.DEFINE_integer("k", 10, "recommend, answer: how many answers per user.",
                          lower_bound=1)
_ITEM = flags.DEFINE_integer("item", None, "answer with --task=rating or "
                             "title_genre: the item asked about (its id in the "
                             "data files).")
_OUT = flags.DEFINE_string("out", None, "export: a new or empty directory.")


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


def run_experiment(config, workdir: str, mode: str = "train") -> dict:
  """Runs `mode` (MODES) of the config's workflow: train and eval write and
  return `<workdir>/results.json`'s metrics, the other modes return their
  JSON payload."""
  from infra.errors import ConfigError
  if config.workflow not in WORKFLOWS:
    raise ConfigError(f"config.workflow={config.workflow!r} is not one of "
                      f"{sorted(WORKFLOWS)}")
  arguments = mode_arguments(mode)
  workflow = importlib.import_module(WORKFLOWS[config.workflow])
  function = mode_function(workflow, config.workflow, mode)
  from infra import config_checks, workdir as workdir_lib
  from userllm import use
  config_checks.check_config(config)  # every numeric field, before any work
  import jax
  if config.distributed:  # multi-host TPU / GPU: one process per host
    jax.distributed.initialize(**distributed_args())
  from infra import mesh as mesh_lib, results as results_lib
  mesh = mesh_lib.make_mesh(config.mesh)  # fails early, in one line, if it can't fit
  print(f"[mesh] data={mesh.shape['data']} model={mesh.shape['model']} over "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es)", flush=True)
  if mode != "train":  # a run of this workflow is there to be used
    use.check_workdir(workdir, config.workflow)
  if mode not in WRITES_RESULTS:
    return function(config, workdir, mesh, **arguments)
  # one run at a time, of one workflow, per workdir; no stale results.json
  with workdir_lib.claim(workdir, config.workflow):
    metrics = function(config, workdir, mesh)
    results = results_lib.write_results(workdir, metrics, config)
  print("results:")
  for name, value in sorted(results.items()):
    print(f"  {name}: {value:.6g}")
  return results


def mode_arguments(mode: str) -> dict:
  """The flags `mode` passes to its function ({name: value}); a flag it needs
  and was not given, or one given that it does not read, is a ConfigError."""
  from infra.errors import ConfigError
  _, needed, optional = MODES[mode]
  for name in needed:
    if not flags.FLAGS[name].present:
      raise ConfigError(f"--mode={mode} needs --{name} ({flags.FLAGS[name].help})")
  unread = [f"--{name}" for name in ("users", "task", "k", "item", "out")
            if flags.FLAGS[name].present and name not in needed + optional]
  if unread:
    raise ConfigError(f"--mode={mode} does not read {', '.join(unread)}")
  return {name: flags.FLAGS[name].value for name in needed + optional}


def mode_function(workflow, name: str, mode: str):
  """The workflow module's function for `mode`; a ConfigError naming the
  workflow's modes when it has none."""
  from infra.errors import ConfigError
  function = getattr(workflow, MODES[mode][0], None)
  if function is None:
    has = [m for m, (attr, *_) in MODES.items() if hasattr(workflow, attr)]
    raise ConfigError(f"--mode={mode}: the {name} workflow has no {mode} mode; "
                      f"its modes are {', '.join(has)} (docs/using.md)")
  return function


def run_argv(argv: list[str]) -> dict:
  """What `python main.py <argv[1:]>` does, in this process: the results of
  train and eval, or a use mode's JSON payload. For notebooks: a Colab TPU
  that the kernel has opened cannot be opened again by a subprocess, and a
  run in the kernel shares its imports. A mistake on the command line exits
  2 as the CLI does; an error of a run raises."""
  flags.FLAGS.unparse_flags()
  parse_flags(argv)
  quiet_logs()
  return run_experiment(_CONFIG.value, _WORKDIR.value, _MODE.value)


def quiet_logs() -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  quiet_logs()
  from infra.errors import USER_ERRORS, Preempted
  mode = _MODE.value
  try:
    if mode in WRITES_RESULTS:
      run_experiment(_CONFIG.value, _WORKDIR.value, mode)
    else:  # stdout holds the JSON alone: progress lines go to stderr
      with contextlib.redirect_stdout(sys.stderr):
        payload = run_experiment(_CONFIG.value, _WORKDIR.value, mode)
      print(json.dumps(payload, indent=2))
  except USER_ERRORS as e:
    exit_with_error(str(e))
  except Preempted as e:  # the checkpoint is saved; no results.json
    print(f"stopped: {e}; rerun to resume", file=sys.stderr)
    # stop_after_steps did what was asked; SIGTERM: 128 + 15, as if killed by it
    sys.exit(0 if e.requested else 143)


def parse_flags(argv):
  """absl's parser, but every mistake in --config or its overrides is one line
  and exit 2: a config file that cannot be read, an unknown field (with the
  nearest names), an ill-typed value, a config file that raised."""
  try:
    rest = flags.FLAGS(argv)
    # ml_collections stands in for a config file it could not read with an
    # object that raises the OSError at first use: use it now
    getattr(_CONFIG.value, "workflow", None)
    return rest
  except OSError as e:
    exit_with_error(config_file_error(config_argument(argv), e))
  except (AttributeError, KeyError) as e:  # raised by config_flags overrides
    exit_with_error(unknown_field_error(config_argument(argv), argv, e))
  except (flags.Error, ValueError) as e:
    # a config file that raised carries its traceback: its last line says why
    # (`ValueError: unknown config variant 'huge'; ...`, less the class name)
    lines = [line for line in str(e).splitlines() if line.strip()]
    reason = lines[-1] if "Traceback" in str(e) else " ".join(lines)
    exit_with_error(re.sub(r"^\w+(Error|Exception): ", "", reason))


def exit_with_error(message: str) -> None:
  """The front door's one way to refuse: `error: <one line>`, exit code 2."""
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(2)


# --- what a mistake on the command line is ------------------------------------

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def config_argument(argv: list[str]) -> str:
  """The value given to --config (`path[:variant]`), read as absl reads it:
  `--config=X` or `--config X`, flag files expanded."""
  args = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)[1:]
  for i, arg in enumerate(args):
    name, equals, value = arg.partition("=")
    if name in ("--config", "-config"):
      return value if equals else (args[i + 1] if i + 1 < len(args) else "")
  return ""


def experiment_configs() -> list[str]:
  """Paths of the experiment configs under configs/ (those with get_config)."""
  paths = [os.path.join(CONFIGS_DIR, name) for name in sorted(os.listdir(CONFIGS_DIR))
           if name.endswith(".py")]
  return [path for path in paths if "def get_config(" in open(path).read()]


def config_file_error(argument: str, error: OSError) -> str:
  """Why the file of `--config=path[:variant]` could not be loaded."""
  path = argument.split(":", 1)[0]
  if not os.path.exists(path):
    names = ", ".join(os.path.basename(p) for p in experiment_configs())
    return (f"--config={argument}: no such file {path} (relative paths are read "
            f"from {os.getcwd()}); the experiment configs in "
            f"{os.path.relpath(CONFIGS_DIR)}/ are {names}")
  if os.path.isdir(path):
    return f"--config={argument}: {path} is a directory, not a config file"
  if not os.access(path, os.R_OK):
    return f"--config={argument}: {path} cannot be read (permission denied)"
  cause = error.__cause__ or error  # a file that get_config itself failed to read
  return f"--config={argument}: {str(cause).splitlines()[-1]}"


def field_paths(config) -> list[str]:
  """Every leaf of `config` as a dotted path (`train.learning_rate`), in the
  config's order."""
  paths = []
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += [f"{name}.{inner}" for inner in field_paths(value)]
    else:
      paths.append(name)
  return paths


def has_field(paths: list[str], path: str) -> bool:
  """Whether `path` is a leaf of `paths` or a section above one."""
  return path in paths or any(p.startswith(path + ".") for p in paths)


def nearest_fields(path: str, candidates: list[str], n: int = 3) -> list[str]:
  """Up to `n` of `candidates` nearest `path` (difflib ratio >= 0.7 on the
  whole dotted path or on the last name alone, so a field moved to another
  section is still found), nearest first."""
  leaf = path.rsplit(".", 1)[-1]

  def closeness(candidate: str) -> float:
    return max(difflib.SequenceMatcher(None, path, candidate).ratio(),
               difflib.SequenceMatcher(None, leaf, candidate.rsplit(".", 1)[-1]).ratio())

  scored = sorted(((closeness(c), c) for c in candidates), key=lambda sc: -sc[0])
  return [candidate for score, candidate in scored[:n] if score >= 0.7]


def workflows_with_field(path: str, parser) -> list[str]:
  """The workflows whose experiment configs (default variant) have `path`."""
  found = set()
  for config_file in experiment_configs():
    config = parser.parse(config_file)
    if has_field(field_paths(config), path):
      found.add(config.workflow)
  return sorted(found)


def plain_text(error: Exception) -> str:
  """An exception's message as written, not its repr: a KeyError's str()
  quotes it, and config_flags wraps one KeyError in another error."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error.args[0] if error.args and isinstance(error.args[0], str) else str(error)


def override_paths(argv: list[str]) -> list[str]:
  """The fields named by `--config.<path>=value` (or `--noconfig.<path>`)."""
  pattern = r"^--?(no)?config\."
  return [re.sub(pattern, "", arg.split("=", 1)[0]) for arg in argv[1:]
          if re.match(pattern, arg)]


def unknown_field_error(argument: str, argv: list[str], error: Exception) -> str:
  """`--config.<path>` names no field of the config: which override, the
  other workflows whose configs have that field, and where to look instead."""
  parser = flags.FLAGS["config"].parser  # the loader absl used: get_config(variant)
  try:
    config = parser.parse(argument)
  except AttributeError as e:  # the file itself, not an override
    return (f"--config={argument} defines no get_config()" if "get_config" in str(e)
            else f"--config={argument}: {e}")
  paths = field_paths(config)
  unknown = [path for path in override_paths(argv) if not has_field(paths, path)]
  if not unknown:  # e.g. an index into a field that is not a list
    return f"--config override: {plain_text(error)}"
  path = unknown[0]
  message = (f"--config.{path}: {argument} (workflow {config.workflow}) has no "
             f"field {path}")
  elsewhere = [w for w in workflows_with_field(path, parser) if w != config.workflow]
  if elsewhere:
    names = ", ".join(elsewhere[:-1]) + " and " * (len(elsewhere) > 1) + elsewhere[-1]
    message += f"; it is a field of the {names} configs"
  return f"{message}; {where_to_look(config, path, plain_text(error))}"


def where_to_look(config, path: str, said: str) -> str:
  """ml_collections' suggestion when it made one (a near name in the same
  section), else the nearest fields of the whole config with their sections,
  else the config's sections."""
  suggestion = said.splitlines()[-1] if said.strip() else ""
  if suggestion.startswith("Did you mean"):
    return suggestion
  near = ["config." + name for name in nearest_fields(path, field_paths(config))]
  if not near:
    sections = [name for name, value in config.items()
                if isinstance(value, ml_collections.ConfigDict)]
    return f"this config's sections are {', '.join(sections)}"
  sections = sorted({name.rsplit(".", 1)[0] for name in near})
  return (f"nearest in this config: {', '.join(near)} "
          f"(section{'s' * (len(sections) > 1)} {', '.join(sections)})")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
