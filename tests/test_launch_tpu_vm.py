"""The TPU VM launcher (infra/launch_tpu_vm.py) against a fake `gcloud` on
the PATH that records its calls: the steps in order, every worker, the
distributed flag, the pinned jax[tpu], and the VM deleted even when a step
fails; --dry-run prints every command and runs none."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GCLOUD = """#!{python}
import json, os, sys
with open(os.environ["GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
fail = os.environ.get("GCLOUD_FAIL_ON", "")
sys.exit(3 if fail and any(fail in a for a in sys.argv[1:]) else 0)
"""


def launch(tmp_path, *extra, fail_on=""):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
  gcloud.chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "GCLOUD_LOG": str(log), "GCLOUD_FAIL_ON": fail_on}
  result = subprocess.run(
      [sys.executable, "-m", "infra.launch_tpu_vm", "--name", "exp1", "--zone",
       "us-central2-b", "--accelerator", "v4-16", "--config", "configs/fedavg.py",
       "--results", str(tmp_path / "back"), *extra, "--",
       "--config.train.num_steps=5"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return result, calls


def test_the_launcher_runs_every_step_on_every_worker_then_deletes(tmp_path):
  result, calls = launch(tmp_path)
  assert result.returncode == 0, result.stderr
  verbs = [c[3] for c in calls]
  assert verbs == ["create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
  assert "--accelerator-type=v4-16" in calls[0]
  for call in calls[1:5]:
    assert "--worker=all" in call
  install, run = calls[3][-1], calls[4][-1]
  assert "'jax[tpu]==0.10.2'" in install and "req-tpu.txt" in install
  assert "main.py --config configs/fedavg.py" in run
  assert "--config.distributed=True" in run and "--config.train.num_steps=5" in run
  assert "--worker=0" in calls[5] and calls[5][-3] == str(tmp_path / "back")
  assert "--quiet" in calls[6]


def test_a_failed_step_still_deletes_the_vm_and_returns_its_code(tmp_path):
  result, calls = launch(tmp_path, fail_on="main.py")
  assert result.returncode == 3
  assert [c[3] for c in calls] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]
  assert "failed with exit code 3" in result.stderr


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
  result, calls = launch(tmp_path, "--dry-run")
  assert result.returncode == 0 and calls == []
  lines = result.stdout.strip().splitlines()
  assert lines[0].startswith("git archive")
  assert [line.split()[4] for line in lines[1:]] == [
      "create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
