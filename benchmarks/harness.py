"""The one harness every benchmark runs through: flags, a run's settings ->
rows, and `<out>.json`, `<out>.md`, `<out>.png` with their provenance.

A benchmark module holds one `EXPERIMENT = harness.Experiment(measure,
present, config=..., flags=(...))` and ends with
`if __name__ == "__main__": harness.main(EXPERIMENT)`:

- `measure(run) -> payload`: the work; `run` holds the flag values
  (`run.args.<name>`), the `--config` with its overrides, the workdir, the
  mesh, and `run.choose(...)` for settings picked on validation users.
- `present(payload) -> (markdown lines, figure or None)`: the table and the
  plot from the payload alone, so `--render` re-writes `<out>.md` and
  `<out>.png` from `<out>.json` without running anything.

The harness defines the shared flags (`--out`, `--render`, and with a config
`--config`, `--workdir`) and the experiment's own only when that experiment
runs (`main`), never at import: any number of benchmark modules import side
by side (tests, the provenance check), which per-module absl flags made
impossible (DuplicateFlagError on `--out`). `<out>.json` holds the payload
plus the exact command line that made it, the git commit, the device, the
date, the wall seconds, and which split chose what (`selected_on`,
`selection`). Two keys only older artifacts carry: `moved_from`, the command
as first recorded when a script moved here unchanged (`command` then names
its new module), and `stale`: {"why", "regenerate"} when today's code would
not make the artifact again as it stands (a module gone, a choice made on
test users); the docs may not cite a stale artifact (tests/test_provenance.py).

Validation-only selection: a benchmark that chooses a setting (a server
batch, a scale) scores every candidate on validation users, and `choose`
picks on those scores alone and hands back the chosen candidate's test
figures, the only ones the table reports. `user_halves` splits the users (or
clients) a benchmark scores into the two sets.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import types
from typing import Any, Callable

import numpy as np
from absl import app, flags, logging

from infra import results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "benchmarks/results"  # where every artifact lives (from the repo root)
SHARED_FLAGS = ("out", "render", "config", "workdir")
# what the harness adds to a payload; a benchmark's payload must not use them
PROVENANCE_KEYS = ("command", "commit", "device", "date", "seconds",
                   "selected_on", "selection", "moved_from")


@dataclasses.dataclass(frozen=True)
class Flag:
  """One of a benchmark's own flags; its absl type follows `default` (bool,
  int, float, list of str, or str / None), or an enum of `choices`."""
  name: str
  default: Any
  help: str
  choices: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A benchmark: `measure(run) -> payload`, `present(payload) -> (markdown
  lines, matplotlib figure or None)`; `config`: the default `--config` file
  (None: the benchmark takes no config and no workdir); `flags`: its own."""
  measure: Callable[["Run"], dict]
  present: Callable[[dict], tuple[list[str], Any]]
  config: str | None = None
  flags: tuple[Flag, ...] = ()


@dataclasses.dataclass(frozen=True)
class Scored:
  """One candidate setting: `valid`, the selection metric on the validation
  users; `test`, what the table reports on the test users (handed back only
  for the chosen candidate)."""
  valid: float
  test: Any


class Run:
  """What `measure` works from: `args` (every flag's value by name), `config`
  (None without one), `out`, `workdir`, `mesh()`, and `choose`."""

  def __init__(self, args: types.SimpleNamespace, config=None):
    self.args, self.config = args, config
    self.selection: dict[str, dict] = {}
    self._mesh = None

  @property
  def out(self) -> str:
    return self.args.out

  @property
  def workdir(self) -> str:
    """`--workdir`, by default runs/<out's name>."""
    return getattr(self.args, "workdir", "") or os.path.join(
        "runs", os.path.basename(self.out))

  def mesh(self):
    """The device mesh of `config.mesh`, made once."""
    if self._mesh is None:
      from infra import mesh as mesh_lib
      self._mesh = mesh_lib.make_mesh(self.config.mesh)
    return self._mesh

  def choose(self, row: str, field: str, metric: str,
             candidates: dict[Any, Scored], higher_is_better: bool = True
             ) -> tuple[Any, Any]:
    """(chosen candidate, its test figures): the candidate of `row` with the
    best `valid` score (the first of equals, in the order given); records
    every candidate's validation score and the choice for the artifact."""
    if not candidates:
      raise ValueError(f"{row}: no candidates for {field}")
    valid = {c: float(s.valid) for c, s in candidates.items()}
    if not all(math.isfinite(v) for v in valid.values()):
      raise FloatingPointError(f"{row}: a validation score of {field} is not "
                               f"finite: {valid}")
    sign = 1.0 if higher_is_better else -1.0
    chosen = max(valid, key=lambda c: sign * valid[c])  # max keeps the first
    self.selection[row] = {"field": field, "metric": metric, "chosen": chosen,
                           "valid": {str(c): v for c, v in valid.items()}}
    return chosen, candidates[chosen].test


def user_halves(ids, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(valid, test) bool masks over `ids` [n] (user or client ids >= 0): each
  id is a validation user with probability 1/2, drawn once per id from
  `seed`, so an id falls on the same side in every run that scores it."""
  ids = np.asarray(ids, np.int64)
  if ids.size and ids.min() < 0:
    raise ValueError(f"user ids must be >= 0, got {ids.min()}")
  draw = np.random.default_rng(seed).random(int(ids.max(initial=0)) + 1)
  valid = draw[ids] < 0.5
  return valid, ~valid


def mean_and_stderr(values) -> tuple[float, float]:
  """(mean, standard error of the mean) of `values` [n], n >= 2."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    raise ValueError(f"a standard error needs at least 2 values, got {len(values)}")
  return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def with_overrides(config, overrides: dict):
  """A deep copy of `config` with {"section.field": value} set (what a
  benchmark's settings change)."""
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def device() -> str:
  """e.g. "cpu (cpu; x86_64, 2 cores), jax 0.10.2"."""
  import jax
  first = jax.devices()[0]
  return (f"{first.platform} ({first.device_kind}; {platform.machine()}, "
          f"{os.cpu_count()} cores), jax {jax.__version__}")


def git_commit() -> str:
  """HEAD's hash, with "+dirty" when tracked files differ from it; "unknown"
  outside a git checkout. Reads only (no index refresh)."""
  def git(*args):
    return subprocess.run(["git", "--no-optional-locks", "-C", REPO, *args],
                          capture_output=True, text=True)
  head = git("rev-parse", "HEAD")
  if head.returncode:
    return "unknown"
  dirty = git("diff", "--quiet", "HEAD", "--").returncode != 0
  return head.stdout.strip() + ("+dirty" if dirty else "")


def command_line(module: str, argv: list[str]) -> str:
  """`python -m <module> <argv[1:]>`, quoted so that shlex.split gives argv back."""
  return " ".join(["python", "-m", module] + [shlex.quote(a) for a in argv[1:]])


def define_flags(experiment: Experiment, module: str, flag_values: flags.FlagValues,
                 argv: list[str]) -> None:
  """Defines the shared flags and `experiment`'s own in `flag_values`
  (`argv`: the command line, where ml_collections finds `--config.*`)."""
  from ml_collections import config_flags
  name = module.rsplit(".", 1)[-1]
  flags.DEFINE_string("out", f"{RESULTS}/{name}", "Path prefix of <out>.json, "
                      ".md and .png.", flag_values=flag_values)
  flags.DEFINE_bool("render", False, "Only re-write <out>.md and <out>.png from "
                    "<out>.json.", flag_values=flag_values)
  if experiment.config is not None:
    config_flags.DEFINE_config_file("config", experiment.config, "The experiment "
                                    "config file.", flag_values=flag_values,
                                    sys_argv=argv)
    flags.DEFINE_string("workdir", "", "Runs go here (default runs/<out's name>).",
                        flag_values=flag_values)
  for flag in experiment.flags:
    if flag.name in SHARED_FLAGS:
      raise ValueError(f"{module}: --{flag.name} is a shared flag of the harness")
    _define(flag, flag_values)


def _define(flag: Flag, flag_values: flags.FlagValues) -> None:
  kwargs = dict(flag_values=flag_values)
  if flag.choices:
    flags.DEFINE_enum(flag.name, flag.default, list(flag.choices), flag.help, **kwargs)
  elif isinstance(flag.default, bool):
    flags.DEFINE_bool(flag.name, flag.default, flag.help, **kwargs)
  elif isinstance(flag.default, int):
    flags.DEFINE_integer(flag.name, flag.default, flag.help, **kwargs)
  elif isinstance(flag.default, float):
    flags.DEFINE_float(flag.name, flag.default, flag.help, **kwargs)
  elif isinstance(flag.default, (list, tuple)):
    flags.DEFINE_list(flag.name, list(flag.default), flag.help, **kwargs)
  else:
    flags.DEFINE_string(flag.name, flag.default, flag.help, **kwargs)


def parse(experiment: Experiment, module: str, argv: list[str]) -> Run:
  """A `Run` of `argv` parsed in a fresh flag set (what the provenance test
  does with a recorded command); raises absl's flag errors."""
  flag_values = flags.FlagValues()
  define_flags(experiment, module, flag_values, argv)
  rest = flag_values(argv)
  if len(rest) > 1:
    raise flags.Error(f"unexpected arguments: {rest[1:]}")
  return _run_of(experiment, flag_values)


def _run_of(experiment: Experiment, flag_values: flags.FlagValues) -> Run:
  names = [f.name for f in experiment.flags] + [
      n for n in SHARED_FLAGS if n in flag_values and n != "config"]
  args = types.SimpleNamespace(**{n: flag_values[n].value for n in names})
  config = flag_values["config"].value if "config" in flag_values else None
  return Run(args, config)


def main(experiment: Experiment) -> None:
  """The entry point of `python -m <benchmark module> ...`."""
  spec = sys.modules["__main__"].__spec__
  if spec is None:  # run as a file: its command could not be recorded as run
    print("error: run a benchmark as a module from the repository root, e.g. "
          "python -m benchmarks.startup", file=sys.stderr)
    sys.exit(2)
  module, argv = spec.name, list(sys.argv)
  define_flags(experiment, module, flags.FLAGS, argv)

  def run_main(rest):
    if len(rest) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from infra.errors import USER_ERRORS
    try:
      execute(experiment, _run_of(experiment, flags.FLAGS), command_line(module, argv))
    except USER_ERRORS as e:
      print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
      sys.exit(2)
  app.run(run_main)


def execute(experiment: Experiment, run: Run, command: str) -> dict:
  """Measures (or with --render reads `<out>.json`) and writes the outputs;
  returns the payload."""
  if run.args.render:
    path = run.out + ".json"
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: nothing to render (run without --render)")
    with open(path) as f:
      payload = json.load(f)
    lines = render(experiment, payload, run.out)
  else:
    began = time.perf_counter()
    measured = experiment.measure(run)
    clash = sorted(set(measured) & set(PROVENANCE_KEYS))
    if clash:
      raise ValueError(f"the payload may not use the harness's keys {clash}")
    payload = {"command": command, "commit": git_commit(), "device": device(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "seconds": time.perf_counter() - began,
               "selected_on": "valid" if run.selection else None,
               "selection": run.selection, **measured}
    lines = write(experiment, run.out, payload)
  print("\n".join(lines))
  return payload


def write(experiment: Experiment, out: str, payload: dict) -> list[str]:
  """Writes `<out>.json` (the payload as given), `<out>.md` and `<out>.png`;
  returns the markdown lines."""
  results.write_json(out + ".json", payload, sort_keys=False)  # rows as run
  return render(experiment, payload, out)


def render(experiment: Experiment, payload: dict, out: str) -> list[str]:
  """Writes `<out>.md` (the provenance line, then the experiment's lines) and
  `<out>.png`; returns the markdown lines."""
  lines, figure = experiment.present(payload)
  header = provenance_lines(payload)
  lines = (header + [""] if header else []) + list(lines)
  results.write_markdown(out + ".md", lines)
  if figure is not None:
    from benchmarks import plots  # here: the Flower peer's environment has no matplotlib
    plots.save(figure, out)
  return lines


def provenance_lines(payload: dict) -> list[str]:
  """Where an artifact came from, for the top of its markdown."""
  facts = [payload[k] for k in ("commit", "date", "device") if payload.get(k)]
  lines = []
  if payload.get("command"):  # every artifact's (tests/test_provenance.py)
    lines.append(f"Command: `{payload['command']}`"
                 + (f" ({'; '.join(facts)})." if facts else "."))
  if payload.get("selection"):
    chosen = "; ".join(f"{row}: {s['field']} = {s['chosen']}"
                       for row, s in payload["selection"].items())
    lines.append(f"Settings chosen on validation users, every figure on test "
                 f"users: {chosen}.")
  return lines
