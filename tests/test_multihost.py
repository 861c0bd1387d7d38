"""The multi-host path (`--config.distributed=True`) on CPU: two local
processes joined by `jax.distributed.initialize` (a local coordinator, gloo
collectives), two fake devices each, run the federated workflow: stopped
after 3 rounds (both processes checkpoint), resumed to the end, and the
results equal a single process's over the same 4-device mesh. (The next-item
workflow's train step runs the same way: `--config configs/default.py:tiny`
in two processes logs the same losses in both; checked by hand, not in the
suite, to keep it under 8 minutes.)"""

import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()  # the session's compile cache stays
         if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
  # the conftest's fast-compile flags stay; only the device count changes
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [
      f"--xla_force_host_platform_device_count={devices}"])
  env.update(extra)
  return env


def run_processes(config: str, workdir, *args, processes: int = 2):
  """main.py in `processes` processes (2 fake devices each); their outputs."""
  port = _free_port()
  command = [sys.executable, "main.py", "--config", config, "--workdir", str(workdir),
             "--config.distributed=True", *args]
  procs = [subprocess.Popen(
      command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(2, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
      for i in range(processes)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def results(workdir) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def test_two_processes_train_checkpoint_resume_and_match_one(tmp_path):
  config = "configs/fedavg.py:tiny"
  outputs = run_processes(config, tmp_path / "two", "--config.train.stop_after_steps=3")
  assert all("2 process(es)" in out for out in outputs)
  assert all("stopped at round 3" in out for out in outputs)
  outputs = run_processes(config, tmp_path / "two")
  assert all("resumed" in out for out in outputs)
  single = subprocess.run(
      [sys.executable, "main.py", "--config", config, "--workdir",
       str(tmp_path / "one")], cwd=REPO, env=_env(4), capture_output=True, text=True,
      timeout=600)
  assert single.returncode == 0, single.stderr[-3000:]
  two, one = results(tmp_path / "two"), results(tmp_path / "one")
  rows = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
  steps = [(r["step"], r["split"]) for r in rows]
  assert len(steps) == len(set(steps))  # process 0 alone writes the metrics
  for key in ("out_of_sample/model/next_item/recall@10_mean",
              "in_sample/model/next_item/recall@10_mean",
              "non_participating/model/next_item/ndcg@10_mean"):
    assert two[key] == pytest.approx(one[key], abs=1e-6), key
