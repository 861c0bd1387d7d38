"""The TPU launcher (infra/launch_tpu_vm.py) against a fake `gcloud` on the
PATH. The fake records every call and plays the TPU service: `describe`
answers from a scripted state sequence, a SUSPENDED answer preempts the VM
(SIGTERM to the job, as a spot VM's shutdown does, then the VM is gone), and
`create` makes a new, empty VM: a folder per VM whose worker home the
launcher's real scripts run in (`ssh --command` runs bash there, `scp`
copies into it), with fake `uv` and `curl` on its PATH and gs:// mapped to
a local folder. The job is a fake main.py in a throwaway git repository (the
launcher ships `git archive HEAD`): it checks what was staged, claims the
workdir, waits for SIGTERM and saves a "checkpoint", or resumes from one.
No network, no real gcloud; polls are 0 s apart."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from infra import launch_tpu_vm as launcher  # noqa: E402

FAKE_GCLOUD = r'''#!{python}
"""A fake gcloud: the TPU service, the VMs and gs:// (see the test's docstring)."""
import json, os, shutil, signal, subprocess, sys, time
ROOT = os.environ["FAKE_ROOT"]
GCS = os.environ["FAKE_GCS"]
argv = sys.argv[1:]
with open(os.path.join(ROOT, "gcloud.log"), "a") as f:  # on_vm: called on a VM
  f.write(json.dumps({"argv": argv, "on_vm": os.environ.get("FAKE_ON_VM")}) + "\n")
if argv[0] == "alpha":
  argv = argv[1:]

def local(path):  # gs://bucket/key -> a file under FAKE_GCS
  return os.path.join(GCS, path[len("gs://"):]) if path.startswith("gs://") else path

def vm_dir():
  return os.path.join(ROOT, "vm-" + open(os.path.join(ROOT, "vm")).read())

def home():
  return os.path.join(vm_dir(), "worker-0")

def counter(name):
  path = os.path.join(ROOT, name)
  n = int(open(path).read()) if os.path.exists(path) else 0
  open(path, "w").write(str(n + 1))
  return n

def stop_vm(graceful):
  """The VM goes away: SIGTERM first (a spot VM's shutdown) and wait for the
  job to record its exit, then SIGKILL whatever is left of its session."""
  pid_file = os.path.join(home(), "job", "pid")
  if os.path.exists(pid_file):
    pgid = int(open(pid_file).read())
    if graceful:
      open(os.path.join(home(), ".vm_going_away"), "w").close()
      os.killpg(pgid, signal.SIGTERM)
      exit_file = os.path.join(home(), "job", "exit_code")
      deadline = time.monotonic() + 60
      while not os.path.exists(exit_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
      os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  open(os.path.join(vm_dir(), "gone"), "w").close()

def vm_env():
  return dict(os.environ, HOME=home(), FAKE_ON_VM=os.path.basename(vm_dir()),
              PATH=os.environ["FAKE_VM_BIN"] + ":" + os.environ["PATH"])

def copy(src, dst):
  src, dst = local(src), local(dst)
  if dst.endswith("/") or os.path.isdir(dst):
    dst = os.path.join(dst, os.path.basename(src.rstrip("/")))
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  if os.path.isdir(src):
    shutil.copytree(src, dst, dirs_exist_ok=True)
  else:
    shutil.copy(src, dst)

words = [a for a in argv if not a.startswith("--")]
if argv[:3] == ["compute", "tpus", "queued-resources"]:
  verb = argv[3]
  if verb == "create":
    n = counter("creates") + 1
    open(os.path.join(ROOT, "vm"), "w").write(str(n))
    os.makedirs(home())
  elif verb == "describe":
    states = os.environ["FAKE_STATES"].split(",")
    state = states[min(counter("describes"), len(states) - 1)]
    if state == "SUSPENDED" and not os.path.exists(os.path.join(vm_dir(), "gone")):
      stop_vm(graceful=True)
    print(state)
  elif verb == "delete":
    if os.path.exists(os.path.join(ROOT, "vm")):
      stop_vm(graceful=False)
elif argv[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  if os.path.exists(os.path.join(vm_dir(), "gone")):
    sys.exit("ssh: connect to host: Connection refused")
  command = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
  sys.exit(subprocess.run(["bash", "-c", command], cwd=home(), env=vm_env()).returncode)
elif argv[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  paths = words[4:]
  if paths[-1].startswith(os.environ["FAKE_NAME"] + ":"):  # to every worker
    dest = paths[-1].split(":", 1)[1].replace("~", home(), 1)
    for path in paths[:-1]:
      copy(path, dest)
  else:  # from worker 0
    src = paths[0].split(":", 1)[1].replace("~", home(), 1)
    copy(src, paths[1])
elif argv[:2] == ["storage", "cp"]:
  copy(words[-2], words[-1])
elif argv[:2] == ["storage", "ls"]:
  sys.exit(0 if os.path.exists(local(words[-1])) else 1)
elif argv[:2] == ["storage", "rm"]:
  if not os.path.exists(local(words[-1])):
    sys.exit(1)
  os.remove(local(words[-1]))
elif argv[:2] == ["storage", "cat"]:
  if not os.path.exists(local(words[-1])):
    sys.exit(1)
  print(open(local(words[-1])).read(), end="")
else:
  sys.exit("fake gcloud: unknown command " + " ".join(argv))
'''

FAKE_UV = r'''#!{python}
"""A fake uv: records its calls; `venv` makes a venv whose python is this one."""
import json, os, sys
with open(os.path.join(os.environ["FAKE_ROOT"], "uv.log"), "a") as f:
  req = open("req-tpu.txt").read() if os.path.exists("req-tpu.txt") else None
  f.write(json.dumps({"argv": sys.argv[1:], "home": os.environ["HOME"],
                      "req": req}) + "\n")
if sys.argv[1] == "venv":
  bin_dir = os.path.join(sys.argv[-1], "bin")
  os.makedirs(bin_dir, exist_ok=True)
  os.symlink("{python}", os.path.join(bin_dir, "python"))
'''

FAKE_CURL = "#!/bin/bash\necho 0  # agent-worker-number: the only worker\n"

# The job: the flags it got, what was staged, the workdir claimed; then it
# trains until SIGTERM, where it saves a "checkpoint" at step 7 and exits 143
# (as main.py does), or it resumes from that checkpoint and finishes. main.py
# releases its run.lock on the way out; on a VM that is being preempted the
# fake does not get that far (the VM is gone first), so the lock is left for
# the requeued run to find.
FAKE_MAIN = r'''
import json, os, signal, sys, time
def local(path):
  return os.path.join(os.environ["FAKE_GCS"], path[5:]) if path.startswith("gs://") else path
args = sys.argv[1:]
print("python:", sys.executable)
print("sid:", os.getsid(0))
print("argv:", json.dumps(args))
flags = dict(a.split("=", 1) for a in args if a.startswith("--config.") and "=" in a)
for flag in ("--config.data.dir", "--config.llm.checkpoint", "--config.llm.tokenizer"):
  if flag in flags:
    path = flags[flag]
    print(flag, sorted(os.listdir(path)) if os.path.isdir(path) else os.path.isfile(path))
if flags.get("--config.fail") == "True":
  print("error: --config.fail: asked to fail")
  sys.exit(2)
workdir = local(args[args.index("--workdir") + 1])
os.makedirs(workdir, exist_ok=True)
lock = os.path.join(workdir, "run.lock")
if os.path.exists(lock):
  print("error: the workdir is in use by", open(lock).read())
  sys.exit(2)
checkpoint = os.path.join(workdir, "checkpoint.json")
def on_sigterm(*_):
  json.dump({"step": 7}, open(checkpoint, "w"))
  print("SIGTERM: checkpoint saved at step 7", flush=True)
  if os.path.exists(os.path.join(os.environ["HOME"], ".vm_going_away")):
    os._exit(143)  # the VM is gone before the lock is released
  os.remove(lock)
  sys.exit(143)
resume = os.path.exists(checkpoint) or flags.get("--config.finish") == "True"
if not resume:
  signal.signal(signal.SIGTERM, on_sigterm)
print("resuming" if resume else "training from step 0", flush=True)
open(lock, "w").write(os.environ["HOME"])
json.dump({"workflow": "fake"}, open(os.path.join(workdir, "workflow.json"), "w"))
if resume:
  step = json.load(open(checkpoint))["step"] if os.path.exists(checkpoint) else 0
  print("resumed from step", step)
  json.dump({"resumed_from": step}, open(os.path.join(workdir, "results.json"), "w"))
  os.remove(lock)
  sys.exit(0)
deadline = time.monotonic() + 120  # never outlive the test by long
while time.monotonic() < deadline:
  time.sleep(0.02)
sys.exit(3)
'''


def _script(path, text):
  path.write_text(text.replace("{python}", sys.executable))
  path.chmod(0o755)


@pytest.fixture
def world(tmp_path):
  """The fakes, a git repository holding the fake main.py, and gs:// with a
  data folder, a Gemma checkpoint folder and a tokenizer."""
  bin_dir, vm_bin = tmp_path / "bin", tmp_path / "vm_bin"
  bin_dir.mkdir()
  vm_bin.mkdir()
  _script(bin_dir / "gcloud", FAKE_GCLOUD)
  _script(vm_bin / "uv", FAKE_UV)
  _script(vm_bin / "curl", FAKE_CURL)
  code = tmp_path / "code"
  (code / "configs").mkdir(parents=True)
  (code / "main.py").write_text(FAKE_MAIN)
  (code / "configs" / "tiny.py").write_text("# a config\n")
  (code / "requirements.txt").write_text("jax[cpu]==0.10.2\nnumpy==2.4.6\n")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(code)]
  subprocess.run(["git", "init", "-q", str(code)], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-qm", "fake"], check=True)
  gcs = tmp_path / "gcs"
  (gcs / "bucket" / "ml-100k").mkdir(parents=True)
  (gcs / "bucket" / "ml-100k" / "u.data").write_text("1\t2\t5\t0\n")
  (gcs / "bucket" / "gemma" / "2b").mkdir(parents=True)
  (gcs / "bucket" / "gemma" / "2b" / "_METADATA").write_text("{}")
  (gcs / "bucket" / "gemma" / "tokenizer.model").write_text("spm")
  yield tmp_path
  for pid_file in tmp_path.glob("vm-*/worker-0/job/pid"):  # a test that failed midway
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def launch(world, *args, states="ACTIVE"):
  """Runs the launcher in the fake repository; (result, gcloud calls)."""
  env = {**os.environ, "PATH": f"{world / 'bin'}:{os.environ['PATH']}",
         "PYTHONPATH": REPO, "FAKE_ROOT": str(world), "FAKE_GCS": str(world / "gcs"),
         "FAKE_VM_BIN": str(world / "vm_bin"), "FAKE_STATES": states,
         "FAKE_NAME": "exp1"}
  result = subprocess.run(
      [sys.executable, "-m", "infra.launch_tpu_vm", "--state-dir",
       str(world / "launches"), *args], cwd=world / "code", env=env,
      capture_output=True, text=True, timeout=300)
  return result, calls(world)


def calls(world, on_vm=False):
  """The launcher's gcloud calls in order (`on_vm`: those the VMs' scripts
  made too, each marked with its VM)."""
  log = world / "gcloud.log"
  entries = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return entries if on_vm else [e for e in entries if not e["on_vm"]]


def run_flags(*extra, tier="spot", workdir="gs://bucket/runs/exp1"):
  return ["run", "--name", "exp1", "--zone", "us-west4-a", "--accelerator",
          "v5litepod-8", "--tier", tier, "--config", "configs/tiny.py",
          "--workdir", workdir, "--poll-s", "0", "--log-sync-s", "0.05", *extra]


def verb(call):
  """'create', 'describe', 'delete', 'ssh <command>' ('ssh status': the job
  state probe), 'scp', 'storage ...'."""
  argv = [a for a in call["argv"] if a != "alpha"]
  if argv[2] == "tpu-vm" and argv[3] == "ssh":
    command = [a for a in argv if a.startswith("--command=")][0][10:]
    return "ssh status" if command == launcher.status_command() else "ssh " + command
  return argv[3] if argv[0] == "compute" else " ".join(argv[:2])


def wait_for(path):
  """Waits (bounded) for a file the detached job writes on its own."""
  deadline = time.monotonic() + 60
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert path.exists(), path


def test_a_spot_run_is_queued_staged_detached_and_requeued_after_preemption(world):
  staging = ["--data", "gs://bucket/ml-100k", "--checkpoint", "gs://bucket/gemma/2b",
             "--tokenizer", "gs://bucket/gemma/tokenizer.model"]
  states = "WAITING_FOR_RESOURCES,ACTIVE,ACTIVE,SUSPENDED,WAITING_FOR_RESOURCES,ACTIVE"
  # run --detach: queued, waited for, provisioned, started; then it returns
  result, log = launch(world, *run_flags(*staging, "--detach", "--",
                                         "--config.train.num_steps=5"), states=states)
  assert result.returncode == 0, result.stdout + result.stderr
  create = log[0]["argv"]
  assert create[:6] == ["compute", "tpus", "queued-resources", "create", "exp1",
                        "--node-id=exp1"]
  assert "--spot" in create and "--accelerator-type=v5litepod-8" in create
  assert "--runtime-version=v2-alpha-tpuv5-lite" in create  # v5e's image
  assert [verb(c) for c in log[1:]] == [
      "describe", "describe", "ssh status",
      "ssh mkdir -p ~/launch ~/job", "scp", "ssh bash ~/launch/setup.sh",
      "ssh bash ~/launch/stage.sh", "ssh bash ~/launch/start.sh 1"]
  vm1 = world / "vm-1" / "worker-0"
  job = vm1 / "job"
  wait_for(world / "gcs/bucket/runs/exp1/launch/attempt-1-worker-0.log")

  # the ssh session that started it is over; the job runs on, in its own session
  result, log = launch(world, "status", "--name", "exp1", states=states)
  assert "queued resource ACTIVE" in result.stdout and "attempt 1" in result.stdout
  assert "worker=0 state=running" in result.stdout
  result, _ = launch(world, "logs", "--name", "exp1", states=states)
  assert "training from step 0" in result.stdout

  # watch: SUSPENDED -> deleted, queued again, provisioned again, restarted
  result, log = launch(world, "watch", "--name", "exp1", states=states)
  assert result.returncode == 0, result.stdout + result.stderr
  verbs = [verb(c) for c in log]
  again = verbs.index("create", 1)  # the second request
  assert sum(v == "create" for v in verbs) == 2
  assert verbs[again - 2:again] == ["describe", "delete"]  # SUSPENDED: deleted
  assert "--force" in log[again - 1]["argv"]
  assert log[again]["argv"] == create  # the same request
  assert verbs[again + 1:again + 9] == [
      "describe", "describe", "ssh status",
      "ssh mkdir -p ~/launch ~/job", "scp", "ssh bash ~/launch/setup.sh",
      "ssh bash ~/launch/stage.sh", "ssh bash ~/launch/start.sh 2 --clear-lock"]
  assert verbs[-1] == "delete" and "--force" in log[-1]["argv"]

  # staged before the job: each VM copied the data, the checkpoint and the
  # tokenizer from gs:// (stage.sh) before its job was started
  everything = calls(world, on_vm=True)
  starts = [i for i, c in enumerate(everything)
            if not c["on_vm"] and verb(c).startswith("ssh bash ~/launch/start.sh")]
  for vm, start in zip(("vm-1", "vm-2"), starts):
    staging = [(i, c["argv"][-2]) for i, c in enumerate(everything)
               if c["on_vm"] == vm and c["argv"][:2] == ["storage", "cp"]
               and c["argv"][-2].startswith("gs://")]
    assert [source for _, source in staging] == [
        "gs://bucket/ml-100k", "gs://bucket/gemma/2b", "gs://bucket/gemma/tokenizer.model"]
    assert max(i for i, _ in staging) < start

  # Python >= 3.11 on both VMs: uv's CPython 3.11, a venv made with it, the
  # requirements with jax[tpu] at the pinned version instead of jax[cpu]
  uv_calls = [json.loads(line) for line in (world / "uv.log").read_text().splitlines()]
  for vm in ("vm-1", "vm-2"):
    home = str(world / vm / "worker-0")
    argvs = [c["argv"] for c in uv_calls if c["home"] == home]
    assert argvs[0] == ["python", "install", "3.11"]
    assert argvs[1] == ["venv", "--python", "3.11", f"{home}/venv"]
    assert argvs[2][:6] == ["pip", "install", "--python", f"{home}/venv/bin/python",
                            "-r", "req-tpu.txt"]
    assert "jax[tpu]==0.10.2" in argvs[2]
    assert [c["req"] for c in uv_calls if c["home"] == home][2] == "numpy==2.4.6\n"

  # attempt 1: the venv's python, its own session, the staged copies, the
  # log in the workdir, and the checkpoint saved on the preemption's SIGTERM
  first = (world / "gcs/bucket/runs/exp1/launch/attempt-1-worker-0.log").read_text()
  assert f"python: {vm1}/venv/bin/python" in first
  sid = int(first.split("sid: ")[1].split()[0])
  assert sid != os.getsid(0) and sid == int((job / "pid").read_text())
  assert "--config.data.dir ['u.data']" in first
  assert "--config.llm.checkpoint ['_METADATA']" in first
  assert "--config.llm.tokenizer True" in first
  assert "training from step 0" in first and "checkpoint saved at step 7" in first
  assert (job / "exit_code").read_text().strip() == "143"
  # attempt 2, on the new VM: the same command on the same workdir, resumed
  vm2 = world / "vm-2" / "worker-0"
  command = (vm1 / "launch" / "command.sh").read_text()
  assert (vm2 / "launch" / "command.sh").read_text() == command
  assert "--workdir gs://bucket/runs/exp1 --config.distributed=True" in command
  assert '--config.data.dir="$HOME/stage/data/ml-100k"' in command
  assert "--config.train.num_steps=5" in command
  second = (world / "gcs/bucket/runs/exp1/launch/attempt-2-worker-0.log").read_text()
  argv_of = lambda log, home: log.split("argv: ")[1].splitlines()[0].replace(
      str(home), "$HOME")  # each fake VM has its own home; real ones share the path
  assert argv_of(second, vm2) == argv_of(first, vm1)
  assert "resumed from step 7" in second  # after the stale lock was cleared
  results = json.loads((world / "gcs/bucket/runs/exp1/results.json").read_text())
  assert results == {"resumed_from": 7}
  record = json.loads((world / "launches/exp1/launch.json").read_text())
  assert (record["phase"], record["attempt"], record["requeues"]) == ("done", 2, 1)


def test_a_reserved_run_on_a_local_workdir_is_copied_back(world):
  result, log = launch(world, *run_flags(
      "--results", str(world / "back"), "--", "--config.finish=True",
      tier="reserved", workdir="runs/exp1"))
  assert result.returncode == 0, result.stdout + result.stderr
  assert "--reserved" in log[0]["argv"] and "--spot" not in log[0]["argv"]
  copy_back = [c["argv"] for c in log if verb(c) == "scp"][-1]
  assert "exp1:~/userllm_repo/runs/exp1" in copy_back and "--worker=0" in copy_back
  back = world / "back" / "exp1"
  assert json.loads((back / "results.json").read_text()) == {"resumed_from": 0}
  assert "resumed from step 0" in (back / "launch/attempt-1-worker-0.log").read_text()
  assert verb(log[-1]) == "delete"


def test_a_failed_job_prints_its_log_tail_and_gives_the_tpu_back(world):
  result, log = launch(world, *run_flags("--", "--config.fail=True"))
  assert result.returncode == 2
  assert "the job exited with code 2" in result.stdout
  assert "error: --config.fail: asked to fail" in result.stdout  # the log's tail
  assert [verb(c) for c in log[-2:]] == ["ssh tail -n 40 ~/job/log", "delete"]
  assert json.loads((world / "launches/exp1/launch.json").read_text())["phase"] == "failed"


def test_a_job_stopped_by_sigterm_on_a_live_vm_is_restarted_there(world):
  """Exit 143 while the queued resource stays ACTIVE (a SIGTERM that was no
  preemption): the job starts again on the same VM, no requeue."""
  result, _ = launch(world, *run_flags("--detach"))
  assert result.returncode == 0, result.stdout + result.stderr
  job = world / "vm-1" / "worker-0" / "job"
  wait_for(world / "gcs/bucket/runs/exp1/workflow.json")
  os.killpg(int((job / "pid").read_text()), signal.SIGTERM)
  wait_for(job / "exit_code")
  result, log = launch(world, "watch", "--name", "exp1")
  assert result.returncode == 0, result.stdout + result.stderr
  assert "restarting it" in result.stdout
  assert "ssh bash ~/launch/start.sh 2" in [verb(c) for c in log]
  assert sum(verb(c) == "create" for c in log) == 1
  assert "resumed from step 7" in (job / "attempt-2.log").read_text()


def test_delete_stops_the_job_and_ends_the_launch(world):
  result, _ = launch(world, *run_flags("--detach"))
  assert result.returncode == 0, result.stdout + result.stderr
  result, log = launch(world, "delete", "--name", "exp1")
  assert result.returncode == 0 and verb(log[-1]) == "delete" and "--force" in log[-1]["argv"]
  assert (world / "vm-1" / "gone").exists()
  result, log_after = launch(world, "watch", "--name", "exp1")
  assert result.returncode == 0 and "exp1 is deleted: nothing to watch" in result.stdout
  assert log_after == log


def test_dry_run_prints_every_command_and_script_and_runs_none(world):
  result, log = launch(world, *run_flags("--data", "gs://bucket/ml-100k", "--dry-run"))
  assert result.returncode == 0, result.stderr
  assert log == [] and not (world / "launches").exists()
  out = result.stdout
  assert "queued-resources create exp1 --node-id=exp1" in out
  assert "--runtime-version=v2-alpha-tpuv5-lite --spot" in out
  for script in launcher.SCRIPTS:
    assert f"# ---- ~/launch/{script}" in out
  assert "setsid nohup bash ~/launch/job.sh" in out


@pytest.mark.parametrize("accelerator,image", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_each_generation_gets_its_runtime_image(accelerator, image):
  assert launcher.runtime_version(accelerator) == image


def test_tiers_ask_for_their_capacity():
  base = launcher.Launch(name="n", zone="z", accelerator="v6e-8", tier="spot",
                         config="c", workdir="gs://b/w", runtime_version="v2-alpha-tpuv6e")
  for tier, flag in [("spot", "--spot"), ("reserved", "--reserved")]:
    command = launcher.create_command(dataclasses.replace(base, tier=tier))
    assert command[:3] == ["gcloud", "compute", "tpus"] and command[-1] == flag
  best_effort = launcher.create_command(dataclasses.replace(base, tier="best-effort"))
  assert best_effort[:2] == ["gcloud", "alpha"] and best_effort[-1] == "--best-effort"
  on_demand = launcher.create_command(dataclasses.replace(base, tier="on-demand"))
  assert not {"--spot", "--reserved", "--best-effort"} & set(on_demand)


@pytest.mark.parametrize("args,message", [
    (["--accelerator", "v9x-8"], "--accelerator=v9x-8: no runtime image known"),
    (["--accelerator", "tpu8"], "--accelerator=tpu8: not a TPU accelerator type"),
    (["--workdir", "runs/x"], "--workdir=runs/x: a spot run needs a gs:// workdir"),
    (["--data", "/data/ml-100k"], "--data=/data/ml-100k: stage from a gs:// path"),
])
def test_bad_flags_are_one_line_and_exit_2(world, args, message):
  flags = run_flags("--dry-run")
  for name, value in zip(args[::2], args[1::2]):
    if name in flags:
      flags[flags.index(name) + 1] = value
    else:
      flags += [name, value]
  result, log = launch(world, *flags)
  assert result.returncode == 2 and log == []
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_job_verdict_over_workers():
  verdict = launcher.job_verdict
  assert verdict("worker=0 state=running\nworker=1 state=running\n") == ("running", 0)
  assert verdict("worker=0 state=exited code=0\nworker=1 state=exited code=0") == ("done", 0)
  assert verdict("worker=0 state=exited code=143\nworker=1 state=running") == ("running", 0)
  assert verdict("worker=0 state=exited code=143\nworker=1 state=lost") == ("stopped", 143)
  assert verdict("worker=0 state=exited code=1\nworker=1 state=running") == ("failed", 1)
  assert verdict("worker=0 state=absent\nworker=1 state=running") == ("absent", 0)
  assert verdict("Connection refused") == ("unknown", 0)
