"""The front door's errors (issue 38): each mistake a newcomer makes at
`python main.py --config ... --workdir ...` is one line `error: ...`, exit 2,
with the workdir left exactly as it was; and the packages the pyproject
installs are every package of the repository."""

import fnmatch
import json
import os
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from infra import workdir as workdir_lib
from infra.errors import WorkdirError


def run_main(config, workdir, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "main.py", "--config", config,
                         "--workdir", str(workdir), *overrides], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def snapshot(directory) -> dict:
  """{relative path: (bytes, mtime_ns)} of every file under `directory`, and
  its folders; {} if it does not exist."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      content = open(path, "rb").read() if name in files else b"<dir>"
      found[os.path.relpath(path, directory)] = (content, os.stat(path).st_mtime_ns)
  return found


def refused(result, *needles) -> str:
  """The one line of a refusal (exit 2, `error: ...`, no traceback), checked to
  contain every needle."""
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished next_item run (configs/default.py:tiny): a workdir of ours."""
  workdir = tmp_path_factory.mktemp("next_item_run")
  result = run_main("configs/default.py:tiny", workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.parametrize("path,why", [("configs/no_such_experiment.py", "no such file"),
                                      ("configs", "is a directory, not a config file")])
def test_a_config_path_that_is_not_a_file(finished_run, path, why):
  before = snapshot(finished_run)
  line = refused(run_main(f"{path}:tiny", finished_run, "--config.seed=1"), path, why)
  if why == "no such file":  # says where the configs are
    assert "default.py" in line and "fedavg.py" in line
  assert snapshot(finished_run) == before


def test_an_unknown_field_prints_the_suggestion_as_text(finished_run):
  before = snapshot(finished_run)
  line = refused(run_main("configs/default.py:tiny", finished_run,
                          "--config.train.lerning_rate=1"),
                 "--config.train.lerning_rate", "configs/default.py:tiny",
                 'Did you mean "learning_rate" instead of "lerning_rate"?')
  assert "\\n" not in line and "\\'" not in line  # no Python repr
  assert snapshot(finished_run) == before


def test_a_field_of_another_workflow_names_the_section_that_holds_the_nearest(
    finished_run):
  before = snapshot(finished_run)
  # the federated config keeps its optimiser in config.federated
  refused(run_main("configs/fedavg.py:tiny", finished_run,
                   "--config.train.learning_rate=0.1"),
          "has no field train.learning_rate", "a field of the next_item",
          "config.federated.client_learning_rate", "section")
  # and the other way round: a federated field on the next_item config
  refused(run_main("configs/default.py:tiny", finished_run,
                   "--config.federated.client_learning_rate=0.1"),
          "a field of the federated",  # (and of any other workflow that has it)
          "nearest in this config: config.train.learning_rate "
          "(section config.train)")
  assert snapshot(finished_run) == before


def test_a_workdir_of_another_workflow_or_of_none_is_left_alone(finished_run, tmp_path):
  before = snapshot(finished_run)
  refused(run_main("configs/fedavg.py:tiny", finished_run),
          f"--workdir={finished_run} holds a next_item run", "workflow is federated")
  assert snapshot(finished_run) == before  # results.json and all
  theirs = tmp_path / "notes"
  theirs.mkdir()
  (theirs / "todo.txt").write_text("a directory of the user's own\n")
  before = snapshot(theirs)
  refused(run_main("configs/default.py:tiny", theirs),
          f"--workdir={theirs} is not empty (todo.txt) and holds no run of ours")
  assert snapshot(theirs) == before


def test_claim_records_the_workflow_and_resumes_only_its_own(tmp_path):
  """What "a workdir of ours" is, without a run: empty is anyone's; a record
  alone (a first run that failed before writing anything) is anyone's; a
  run's results.json from before workflow.json existed names its owner."""
  with workdir_lib.claim(str(tmp_path), "next_item", process_index=0):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
  assert json.loads((tmp_path / workdir_lib.OWNER).read_text()) == {
      "workflow": "next_item"}
  with workdir_lib.claim(str(tmp_path), "next_item", process_index=0):
    pass
  with pytest.raises(WorkdirError, match="holds a next_item run"):
    with workdir_lib.claim(str(tmp_path), "federated", process_index=0):
      pass
  assert not (tmp_path / workdir_lib.LOCK).exists()  # a refusal leaves no lock
  (tmp_path / "metrics.jsonl").unlink()  # only the record is left: anyone's
  with workdir_lib.claim(str(tmp_path), "federated", process_index=0):
    pass
  assert workdir_lib.owner(str(tmp_path)) == "federated"
  old = tmp_path / "old"
  old.mkdir()
  (old / "results.json").write_text(json.dumps({"config": {"workflow": "rlpf"}}))
  assert workdir_lib.owner(str(old)) == "rlpf"
  with pytest.raises(WorkdirError, match="holds a rlpf run"):
    with workdir_lib.claim(str(old), "user_llm", process_index=0):
      pass


def package_dirs(root) -> list[str]:
  """Every package of the repository as a dotted name: the directories with an
  __init__.py whose parents are packages too (what an install must carry)."""
  found = []

  def walk(directory, prefix):
    for name in sorted(os.listdir(directory)):
      path = os.path.join(directory, name)
      if "." not in name and os.path.isfile(os.path.join(path, "__init__.py")):
        found.append(prefix + name)
        walk(path, prefix + name + ".")

  walk(root, "")
  return found


def test_the_pyproject_installs_every_package():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
  packages = package_dirs(REPO)
  assert {"configs", "infra", "userllm", "userllm.models"} <= set(packages)
  missed = [p for p in packages
            if not any(fnmatch.fnmatchcase(p, pattern) for pattern in find["include"])]
  assert not missed, f"add {missed} to pyproject.toml's packages.find include"
  # a pattern for a package that is gone would hide a rename
  for pattern in find["include"]:
    assert any(fnmatch.fnmatchcase(p, pattern) for p in packages) or "*" in pattern
