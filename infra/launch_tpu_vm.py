"""Run an experiment on a Cloud TPU slice that gets capacity and survives
spot preemption, with gcloud:

  python -m infra.launch_tpu_vm run --name exp1 --zone us-west4-a \\
    --accelerator v5litepod-8 --tier spot --workdir gs://BUCKET/runs/exp1 \\
    --config configs/user_llm_gemma_tpu.py --data gs://BUCKET/ml-100k \\
    --checkpoint gs://BUCKET/gemma/2b --tokenizer gs://BUCKET/gemma/tokenizer.model \\
    -- --config.data.source=movielens
  python -m infra.launch_tpu_vm status --name exp1   # queued resource + job state
  python -m infra.launch_tpu_vm logs --name exp1     # the job's log
  python -m infra.launch_tpu_vm watch --name exp1    # take over supervising
  python -m infra.launch_tpu_vm delete --name exp1   # stop and give the TPU back

`run`:
1. asks for capacity with a queued resource (`gcloud compute tpus
   queued-resources create`) in the tier `--tier` names (spot, best-effort,
   reserved, on-demand), with the runtime image of the accelerator's TPU
   generation (RUNTIME_VERSIONS), and polls `describe` until it is ACTIVE;
2. on every worker: copies the committed code (`git archive HEAD`, made once
   per launch, so a requeued run gets the same code) and the launch scripts
   to ~/launch; installs CPython 3.11 with uv and the requirements with
   `jax[tpu]` into ~/venv (setup.sh; the TPU images ship Python 3.10, and the
   pinned numpy/jax/flax/orbax/scipy need >= 3.11); copies `--data`,
   `--checkpoint` and `--tokenizer` from gs:// to the worker's disk (stage.sh)
   and points their config fields at the copies;
3. starts main.py detached from the SSH session (start.sh: setsid + nohup, no
   terminal, nothing inherited): a closed laptop does not stop it. Its output
   goes to ~/job/attempt-N.log on each worker and, once the run has claimed
   its workdir, is copied every `--log-sync-s` seconds (and at its end) to
   `<workdir>/launch/attempt-N-worker-W.log`;
4. watches: every `--poll-s` seconds it describes the queued resource and
   asks each worker for the job's state. A preempted spot or
   best-effort resource goes SUSPENDING -> SUSPENDED (FAILED: its request
   could not be met); a Spot TPU cannot be restarted, only recreated, so the
   launcher deletes the queued resource, creates it again and repeats steps
   2-3 with the same command on the same workdir, where main.py resumes from
   its checkpoints by itself. A job that stopped on SIGTERM (main.py saves a
   checkpoint and exits 143) on a VM that is still ACTIVE is restarted there;
5. at the job's end (exit 0; or another code, with the log's tail printed)
   copies a local workdir back to `--results` and deletes the queued resource
   (`--keep` keeps it). Ctrl-C, or `run --detach`, leaves the job running on
   the TPU; `watch` takes over from any machine that has the launch record.

The launch record (flags, the code tarball, the scripts, the attempt and
requeue counts) lives in `<--state-dir>/<name>/`. `--dry-run` prints every
command and script and runs none.

gcloud syntax and the service's behaviour, as checked against Google's docs:
- queued resources, their states, `--spot`/`--reserved`, `delete --force`:
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/create
  https://cloud.google.com/sdk/gcloud/reference/compute/tpus/queued-resources/delete
  https://cloud.google.com/tpu/docs/queued-resources (WAITING_FOR_RESOURCES,
  PROVISIONING, ACTIVE, FAILED, SUSPENDING, SUSPENDED: "no longer eligible for
  further allocation")
- `--best-effort` exists only in `gcloud alpha`:
  https://cloud.google.com/sdk/gcloud/reference/alpha/compute/tpus/queued-resources/create
- "You can't restart TPU Spot VMs, and you must recreate them after
  preemption": https://cloud.google.com/tpu/docs/spot
- runtime images per generation: https://cloud.google.com/tpu/docs/runtimes
- a worker's index: the metadata attribute `agent-worker-number`, which JAX's
  own Cloud TPU cluster detection reads (jax/_src/clusters/cloud_tpu_cluster.py).
The flags were also parsed by gcloud 528.0.0 itself (`--help`), offline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

from infra.errors import ConfigError
from infra.workdir import LOCK, OWNER

# The TPU generation (the accelerator type before its last "-") -> the TPU VM
# runtime image Google recommends for JAX on it
# (https://cloud.google.com/tpu/docs/runtimes). v5e's types are v5litepod-N.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# --tier -> the queued-resources create flags that ask for it; on-demand is
# the default tier and has none. Best-effort is only in `gcloud alpha`.
TIER_FLAGS = {"spot": ("--spot",), "best-effort": ("--best-effort",),
              "reserved": ("--reserved",), "on-demand": ()}
ALPHA_TIERS = frozenset({"best-effort"})
PREEMPTIBLE_TIERS = frozenset({"spot", "best-effort"})
ACTIVE = "ACTIVE"
# queued-resource states after which the TPU is gone and the request must be
# made again (SUSPENDED: preempted; FAILED: the request could not be met;
# MISSING: deleted, other than by `delete`, which ends the launch)
LOST_STATES = frozenset({"SUSPENDING", "SUSPENDED", "FAILED", "MISSING"})
PREEMPTED_EXIT = 143  # main.py after SIGTERM, its checkpoint saved
PYTHON_VERSION = "3.11"  # requirements.txt was resolved on CPython 3.11
UV_VERSION = "0.13.9"
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
WORKER_NUMBER = ("curl -sf -H 'Metadata-Flavor: Google' http://metadata.google."
                 "internal/computeMetadata/v1/instance/attributes/agent-worker-number"
                 " || echo 0")
CODE_DIR = "userllm_repo"  # the code on each worker (under $HOME); main.py runs there
SCRIPTS = ("setup.sh", "stage.sh", "command.sh", "job.sh", "start.sh")
# --data / --checkpoint / --tokenizer: the folder under ~/stage they are copied
# to on each worker
STAGED_KINDS = ("data", "checkpoint", "tokenizer")


@dataclasses.dataclass
class Launch:
  """One launch: its flags and where it stands. Saved as
  `<state_dir>/<name>/launch.json` after every change."""
  name: str
  zone: str
  accelerator: str
  tier: str
  config: str
  workdir: str
  project: str = ""
  runtime_version: str = ""
  service_account: str = ""
  data: str = ""
  data_field: str = "data.dir"
  checkpoint: str = ""
  checkpoint_fields: tuple = ("llm.checkpoint",)
  tokenizer: str = ""
  tokenizer_field: str = "llm.tokenizer"
  main_args: tuple = ()
  results: str = "runs/from_tpu"
  keep: bool = False
  poll_s: float = 60.0
  log_sync_s: float = 60.0
  max_requeues: int = 20
  max_restarts: int = 20
  commit: str = ""
  attempt: int = 0  # jobs started so far (the log of attempt N is attempt-N-...)
  requeues: int = 0  # queued resources created again after a preemption
  restarts: int = 0  # jobs restarted on the same VM
  phase: str = "new"  # new, running, done, failed, deleted


def _fail(message: str):
  raise ConfigError(message)


def generation(accelerator: str) -> str:
  """'v5litepod-8' -> 'v5litepod': the TPU generation of an accelerator type."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator)
  if not match:
    _fail(f"--accelerator={accelerator}: not a TPU accelerator type such as "
          "v4-8, v5litepod-8, v5p-8 or v6e-8")
  return match.group(1)


def runtime_version(accelerator: str) -> str:
  """The runtime image Google recommends for JAX on this accelerator."""
  gen = generation(accelerator)
  if gen not in RUNTIME_VERSIONS:
    _fail(f"--accelerator={accelerator}: no runtime image known for {gen} "
          f"(known: {', '.join(sorted(RUNTIME_VERSIONS))}); pass --runtime-version")
  return RUNTIME_VERSIONS[gen]


def _version_of(package: str, requirements: str = "requirements.txt") -> str:
  """The pinned version of `package` in requirements.txt."""
  with open(requirements) as f:
    for line in f:
      match = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^\s;#]+)",
                       line.strip())
      if match:
        return match.group(2)
  _fail(f"{requirements}: no pinned {package}==<version> line")


def _is_gs(path: str) -> bool:
  return path.startswith("gs://")


# ---------------------------------------------------------------- gcloud argv

def _where(launch: Launch) -> list[str]:
  return [f"--zone={launch.zone}"] + (
      [f"--project={launch.project}"] if launch.project else [])


def create_command(launch: Launch) -> list[str]:
  """Asks for the TPU as a queued resource in `launch.tier`; the node has the
  launch's name too."""
  alpha = ["alpha"] if launch.tier in ALPHA_TIERS else []
  extra = ([f"--service-account={launch.service_account}"]
           if launch.service_account else [])
  return ["gcloud", *alpha, "compute", "tpus", "queued-resources", "create",
          launch.name, f"--node-id={launch.name}", *_where(launch),
          f"--accelerator-type={launch.accelerator}",
          f"--runtime-version={launch.runtime_version}",
          *TIER_FLAGS[launch.tier], *extra]


def describe_command(launch: Launch) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", "describe",
          launch.name, *_where(launch), "--format=value(state.state)"]


def delete_command(launch: Launch) -> list[str]:
  """Deletes the queued resource and its TPU VM (--force: also when ACTIVE)."""
  return ["gcloud", "compute", "tpus", "queued-resources", "delete",
          launch.name, *_where(launch), "--force", "--quiet"]


def ssh_command(launch: Launch, command: str, worker: str = "all") -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", launch.name,
          *_where(launch), f"--worker={worker}", f"--command={command}"]


def scp_to_workers(launch: Launch, files: list[str], dest: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", *files,
          f"{launch.name}:{dest}", *_where(launch), "--worker=all"]


def copy_back_command(launch: Launch) -> list[str]:
  """Copies a local (on-VM) workdir from worker 0 back to `--results`."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse",
          f"{launch.name}:{_vm_path(launch.workdir, home='~')}", launch.results,
          *_where(launch), "--worker=0"]


# --------------------------------------------------------- the VM's scripts

def _vm_path(path: str, home: str = "$HOME") -> str:
  """A workdir as the VM sees it: gs:// or absolute as is, else relative to
  the code (`home`: "$HOME" in scripts, "~" for scp)."""
  if _is_gs(path) or path.startswith("/"):
    return path
  return f"{home}/{CODE_DIR}/{path}"


def staged(launch: Launch) -> list[tuple[str, str, tuple]]:
  """[(gs:// source, its copy on each worker, the config fields pointed at
  the copy)] for --data, --checkpoint and --tokenizer."""
  sources = {"data": (launch.data, (launch.data_field,)),
             "checkpoint": (launch.checkpoint, tuple(launch.checkpoint_fields)),
             "tokenizer": (launch.tokenizer, (launch.tokenizer_field,))}
  items = []
  for kind in STAGED_KINDS:
    source, fields = sources[kind]
    if source:
      base = source.rstrip("/").rsplit("/", 1)[-1]
      items.append((source, f"$HOME/stage/{kind}/{base}", fields))
  return items


def job_command(launch: Launch) -> str:
  """main.py's command line: the same on every worker, every attempt and
  every requeued VM (the staged copies are at the same paths on each)."""
  overrides = [f'--config.{field}="{copy}"'
               for _, copy, fields in staged(launch) for field in fields]
  return " ".join(["exec", "~/venv/bin/python", "main.py",
                   "--config", shlex.quote(launch.config),
                   "--workdir", shlex.quote(launch.workdir),
                   "--config.distributed=True", *overrides,
                   *[shlex.quote(a) for a in launch.main_args]])


def setup_script(jax_version: str) -> str:
  return f"""#!/bin/bash
# The code and a Python >= {PYTHON_VERSION} environment on this TPU VM worker.
# The TPU images are Ubuntu 22.04 with Python 3.10, and the pinned numpy, jax,
# flax, orbax and scipy need >= 3.11: uv installs a standalone CPython
# {PYTHON_VERSION} (no apt, no PPA, no root) and makes the venv ~/venv with it.
set -euo pipefail
mkdir -p ~/{CODE_DIR}
tar -xzf ~/launch/code.tar.gz -C ~/{CODE_DIR}
export PATH="$HOME/.local/bin:$PATH"
command -v uv >/dev/null || python3 -m pip install --user --quiet uv=={UV_VERSION}
uv python install {PYTHON_VERSION}
[ -x ~/venv/bin/python ] || uv venv --python {PYTHON_VERSION} ~/venv
cd ~/{CODE_DIR}
# requirements.txt pins jax[cpu]; the TPU build of the same version replaces it
grep -v '^jax\\[' requirements.txt > req-tpu.txt
uv pip install --python ~/venv/bin/python -r req-tpu.txt 'jax[tpu]=={jax_version}' \\
  --find-links {LIBTPU_RELEASES}
~/venv/bin/python -c 'import sys; assert sys.version_info >= ({PYTHON_VERSION.replace(".", ", ")}), sys.version'
"""


def stage_script(launch: Launch) -> str:
  lines = ["#!/bin/bash",
           "# Copies the run's data and checkpoints from gs:// to this worker's",
           "# disk before the job starts (the config points at these copies).",
           "set -euo pipefail"]
  for source, copy, _ in staged(launch):
    parent = copy.rsplit("/", 1)[0]
    lines.append(f'mkdir -p "{parent}" && gcloud storage cp --recursive '
                 f'{shlex.quote(source.rstrip("/"))} "{parent}/"')
  return "\n".join(lines) + "\n"


def command_script(launch: Launch) -> str:
  return (f"#!/bin/bash\n# The job; job.sh runs it with its output in the log.\n"
          f"cd ~/{CODE_DIR}\n{job_command(launch)}\n")


def _log_copy_functions(workdir: str) -> str:
  """Bash functions `claimed` (the run has claimed the workdir: its owner
  record exists) and `copy_log`, for a gs:// or an on-VM workdir."""
  owner = f"{workdir}/{OWNER}"
  if _is_gs(workdir):
    return (f'claimed() {{ gcloud storage ls "{owner}" >/dev/null 2>&1; }}\n'
            'copy_log() { gcloud storage cp "$LOG" "$COPY" >/dev/null 2>&1; }\n')
  return (f'claimed() {{ [ -e "{owner}" ]; }}\n'
          f'copy_log() {{ mkdir -p "{workdir}/launch" && cp "$LOG" "$COPY"; }}\n')


def job_script(launch: Launch) -> str:
  workdir = _vm_path(launch.workdir)
  return f"""#!/bin/bash
# Runs the job (command.sh) with no terminal, detached from the SSH session
# that started it (start.sh: setsid + nohup), and records its exit code.
# Usage: job.sh ATTEMPT
set -u
ATTEMPT=$1
JOB="$HOME/job"
echo $$ > "$JOB/pid"
WORKER=$({WORKER_NUMBER})
LOG="$JOB/attempt-$ATTEMPT.log"
COPY="{workdir}/launch/attempt-$ATTEMPT-worker-$WORKER.log"
ln -sf "$LOG" "$JOB/log"
# The copy in the workdir starts once the run has claimed the workdir
# (written {OWNER}): a new workdir must be empty for main.py to take it.
{_log_copy_functions(workdir)}sync_log() {{ if claimed; then copy_log || true; fi; }}
# SIGTERM (the VM shutting down) reaches main.py, which saves a checkpoint and
# exits 143; this wrapper stays to copy the last of the log and record that.
trap 'echo "[launch] SIGTERM: waiting for the run to save and stop" >> "$LOG"' TERM
# (appended to: the note above and the job's output share the file)
PYTHONUNBUFFERED=1 bash ~/launch/command.sh >> "$LOG" 2>&1 < /dev/null &
MAIN=$!
( while sleep {launch.log_sync_s:g}; do sync_log; done ) &
SYNC=$!
wait "$MAIN"; CODE=$?
while kill -0 "$MAIN" 2>/dev/null; do wait "$MAIN"; CODE=$?; done
kill "$SYNC" 2>/dev/null
sync_log
echo "$CODE" > "$JOB/exit_code"
"""


def start_script(launch: Launch) -> str:
  lock = f"{_vm_path(launch.workdir)}/{LOCK}"
  clear = (f'gcloud storage rm "{lock}" >/dev/null 2>&1 || true'
           if _is_gs(launch.workdir) else f'rm -f "{lock}"')
  return f"""#!/bin/bash
# Starts job.sh in a new session (setsid) immune to hangups (nohup), with no
# terminal and every stream redirected, so it outlives this SSH session.
# Usage: start.sh ATTEMPT [--clear-lock]
set -euo pipefail
JOB="$HOME/job"
mkdir -p "$JOB"
if [ -s "$JOB/pid" ] && [ ! -f "$JOB/exit_code" ] && kill -0 "$(cat "$JOB/pid")" 2>/dev/null; then
  echo "[launch] the job is already running (pid $(cat "$JOB/pid"))"; exit 0
fi
rm -f "$JOB/pid" "$JOB/exit_code"
# after a requeue the run.lock left by the deleted VM's run names a host that
# is gone: nothing holds it any more
if [ "${{2:-}}" = "--clear-lock" ]; then {clear}; fi
setsid nohup bash ~/launch/job.sh "$1" > "$JOB/job.out" 2>&1 < /dev/null &
for _ in $(seq 300); do [ -s "$JOB/pid" ] && break; sleep 0.1; done
[ -s "$JOB/pid" ] || {{ echo "[launch] the job did not start: see $JOB/job.out" >&2; exit 1; }}
echo "[launch] attempt $1 started (pid $(cat "$JOB/pid")); log: $JOB/attempt-$1.log"
"""


def status_command() -> str:
  """One line per worker: its job's state (absent, running, exited CODE,
  lost). Sent inline: a new VM has no scripts yet."""
  return f"""JOB="$HOME/job"
WORKER=$({WORKER_NUMBER})
if [ -f "$JOB/exit_code" ]; then echo "worker=$WORKER state=exited code=$(cat "$JOB/exit_code")"
elif [ -s "$JOB/pid" ] && kill -0 "$(cat "$JOB/pid")" 2>/dev/null; then echo "worker=$WORKER state=running"
elif [ -s "$JOB/pid" ]; then echo "worker=$WORKER state=lost"
else echo "worker=$WORKER state=absent"; fi
"""


def scripts(launch: Launch, jax_version: str) -> dict[str, str]:
  """The launch scripts by file name (copied to ~/launch on every worker)."""
  return {"setup.sh": setup_script(jax_version), "stage.sh": stage_script(launch),
          "command.sh": command_script(launch), "job.sh": job_script(launch),
          "start.sh": start_script(launch)}


def job_verdict(status_output: str) -> tuple[str, int]:
  """The status lines of every worker -> (verdict, exit code): 'unknown'
  (no answer), 'absent' (not started on some worker), 'failed' (some worker
  exited with neither 0 nor 143: that code), 'running', 'done' (all exited
  0), or 'stopped' (exited 143 after SIGTERM, or lost: restart it)."""
  states = re.findall(r"^worker=(\d+) state=(\w+)(?: code=(\d+))?\s*$",
                      status_output, flags=re.M)
  if not states:
    return "unknown", 0
  kinds = [state for _, state, _ in states]
  codes = [int(code) for _, state, code in states if state == "exited"]
  failed = [c for c in codes if c not in (0, PREEMPTED_EXIT)]
  if "absent" in kinds:
    return "absent", 0
  if failed:
    return "failed", failed[0]
  if "running" in kinds:
    return "running", 0
  if all(state == "exited" for state in kinds) and not any(codes):
    return "done", 0
  return "stopped", PREEMPTED_EXIT


# ------------------------------------------------------------ the launch record

def _record_dir(state_dir: str, name: str) -> str:
  return os.path.join(state_dir, name)


def save(launch: Launch, state_dir: str) -> None:
  path = os.path.join(_record_dir(state_dir, launch.name), "launch.json")
  with open(path + ".tmp", "w") as f:
    json.dump(dataclasses.asdict(launch), f, indent=1)
  os.replace(path + ".tmp", path)


def load(state_dir: str, name: str) -> Launch:
  path = os.path.join(_record_dir(state_dir, name), "launch.json")
  if not os.path.exists(path):
    _fail(f"--name={name}: no launch record at {path} (start it with `run`, or "
          "pass the --state-dir it was started with)")
  with open(path) as f:
    fields = json.load(f)
  for key in ("checkpoint_fields", "main_args"):
    fields[key] = tuple(fields[key])
  return Launch(**fields)


def write_bundle(launch: Launch, state_dir: str) -> None:
  """Writes the code tarball (git archive HEAD) and the scripts beside the
  record, once: every VM of this launch gets exactly these."""
  bundle = _record_dir(state_dir, launch.name)
  os.makedirs(bundle, exist_ok=True)
  subprocess.run(["git", "archive", "--format=tar.gz", "-o",
                  os.path.join(bundle, "code.tar.gz"), "HEAD"], check=True)
  launch.commit = subprocess.run(["git", "rev-parse", "HEAD"], check=True,
                                 capture_output=True, text=True).stdout.strip()
  for name, text in scripts(launch, _version_of("jax")).items():
    with open(os.path.join(bundle, name), "w") as f:
      f.write(text)


def bundle_files(state_dir: str, name: str) -> list[str]:
  bundle = _record_dir(state_dir, name)
  return [os.path.join(bundle, f) for f in ("code.tar.gz", *SCRIPTS)]


# ------------------------------------------------------------- running gcloud

def _show(command: list[str]) -> str:
  return " ".join(shlex.quote(c) for c in command)


def say(message: str) -> None:
  print(f"[launch] {message}", flush=True)


def run_shown(command: list[str]) -> int:
  """Runs a command with its output streaming through; its exit code."""
  say(_show(command))
  return subprocess.run(command).returncode


def run_quiet(command: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(command, capture_output=True, text=True)


def qr_state(launch: Launch) -> str:
  """The queued resource's state; MISSING if it does not exist, UNKNOWN if
  gcloud could not say (a network hiccup: the next poll asks again)."""
  answer = run_quiet(describe_command(launch))
  if answer.returncode == 0 and answer.stdout.strip():
    return answer.stdout.strip().split()[0]
  if "NOT_FOUND" in answer.stderr:
    return "MISSING"
  say(f"describe failed ({answer.stderr.strip()[-200:]}); asking again")
  return "UNKNOWN"


def job_states(launch: Launch) -> tuple[str, int]:
  answer = run_quiet(ssh_command(launch, status_command()))
  verdict = job_verdict(answer.stdout)
  if verdict[0] == "unknown":
    say(f"no answer from the workers ({answer.stderr.strip()[-200:]}); asking again")
  return verdict


# ------------------------------------------------------------------ the steps

class VmLost(Exception):
  """The queued resource stopped being ACTIVE while a step ran on its VM;
  `state` is what it became."""

  def __init__(self, state: str):
    super().__init__(state)
    self.state = state


def request_capacity(launch: Launch) -> None:
  if run_shown(create_command(launch)):
    raise RuntimeError(f"could not queue {launch.name}: gcloud's message above")


def start_job(launch: Launch, state_dir: str, clear_lock: bool) -> int:
  """Starts attempt N+1 of the job on every worker; start.sh's exit code."""
  launch.attempt += 1
  save(launch, state_dir)
  args = f" {launch.attempt}" + (" --clear-lock" if clear_lock else "")
  return run_shown(ssh_command(launch, f"bash ~/launch/start.sh{args}"))


def on_vm(launch: Launch, command: list[str], tries: int = 3) -> int:
  """Runs a step on the VM, again after a failure (a new VM may refuse SSH
  for a while); raises VmLost if the VM went away meanwhile."""
  for _ in range(tries):
    code = run_shown(command)
    if code == 0:
      return 0
    state = qr_state(launch)
    if state != ACTIVE:
      raise VmLost(state)
    time.sleep(launch.poll_s)
  return code


def provision(launch: Launch, state_dir: str) -> int:
  """Code, the Python 3.11 env, staged data and checkpoints, then the job,
  on every worker of an ACTIVE VM that has no job. Nonzero: a step failed
  every time."""
  steps = [ssh_command(launch, "mkdir -p ~/launch ~/job"),
           scp_to_workers(launch, bundle_files(state_dir, launch.name), "~/launch/"),
           ssh_command(launch, "bash ~/launch/setup.sh"),
           ssh_command(launch, "bash ~/launch/stage.sh")]
  for command in steps:
    code = on_vm(launch, command)
    if code:
      say(f"a step failed 3 times on {launch.name}: {_show(command)}")
      return code
  # on a later VM of this launch the workdir's run.lock is the deleted VM's
  return start_job(launch, state_dir, clear_lock=launch.attempt > 0)


def requeue(launch: Launch, state_dir: str, state: str) -> None:
  """Deletes the lost queued resource and asks for the TPU again."""
  if launch.requeues >= launch.max_requeues:
    raise RuntimeError(f"{launch.name} was lost ({state}) after "
                       f"{launch.requeues} requeues (--max-requeues)")
  launch.requeues += 1
  save(launch, state_dir)
  say(f"{launch.name} is {state}: deleting it and queueing it again "
      f"(requeue {launch.requeues} of at most {launch.max_requeues})")
  run_shown(delete_command(launch))
  request_capacity(launch)


def finish(launch: Launch, state_dir: str, code: int, job_ran: bool = True) -> int:
  """The job ended with `code` (or a setup step failed: not `job_ran`): print
  a failed job's log tail, copy a local workdir back, give the TPU back
  unless --keep."""
  if code and job_ran:
    say(f"the job exited with code {code}; the end of its log on worker 0:")
    run_shown(ssh_command(launch, "tail -n 40 ~/job/log", worker="0"))
  elif code == 0 and not _is_gs(launch.workdir):
    os.makedirs(launch.results, exist_ok=True)
    code = run_shown(copy_back_command(launch))
  launch.phase = "done" if code == 0 else "failed"
  save(launch, state_dir)
  if not launch.keep:
    run_shown(delete_command(launch))
  return code


def on_active(launch: Launch, state_dir: str, detach: bool) -> int | None:
  """One look at an ACTIVE VM's job: start it if absent, finish if it ended,
  restart it if it stopped on SIGTERM. An exit code ends the watch."""
  verdict, code = job_states(launch)
  if verdict == "absent":
    code = provision(launch, state_dir)
    if code:
      return finish(launch, state_dir, code, job_ran=False)
    return 0 if detach else None
  if verdict in ("done", "failed"):
    return finish(launch, state_dir, code)
  if verdict == "stopped":
    if launch.restarts >= launch.max_restarts:
      return finish(launch, state_dir, code)
    launch.restarts += 1
    say(f"the job stopped (exit {code}) on an ACTIVE VM: restarting it "
        f"(restart {launch.restarts} of at most {launch.max_restarts})")
    start_job(launch, state_dir, clear_lock=False)
  return None


def supervise(launch: Launch, state_dir: str, detach: bool = False) -> int:
  """Polls the queued resource and the job until the job ends (`detach`:
  until it has started): provisions an ACTIVE VM that has no job, requeues
  a lost resource, restarts a job that stopped on SIGTERM."""
  last = None
  while True:
    if load(state_dir, launch.name).phase == "deleted":  # `delete` meanwhile
      say(f"{launch.name} was deleted: stopped watching")
      return 0
    state = qr_state(launch)
    if state != last:
      say(f"{launch.name}: {state}")
      last = state
    try:
      if state == ACTIVE:
        code = on_active(launch, state_dir, detach)
        if code is not None:
          return code
    except VmLost as lost:
      say(f"{launch.name} became {lost.state} during a step")
      state = last = lost.state
    if state in LOST_STATES:
      requeue(launch, state_dir, state)
    time.sleep(launch.poll_s)


# --------------------------------------------------------------- subcommands

def _launch_from_flags(args: argparse.Namespace) -> Launch:
  if args.tier in PREEMPTIBLE_TIERS and not _is_gs(args.workdir):
    _fail(f"--workdir={args.workdir}: a {args.tier} run needs a gs:// workdir; a "
          "preempted VM takes its disk with it, so a requeued run could not resume")
  for flag in ("data", "checkpoint", "tokenizer"):
    value = getattr(args, flag)
    if value and not _is_gs(value):
      _fail(f"--{flag}={value}: stage from a gs:// path (copied to each worker)")
    if value and not re.fullmatch(r"[\w.\-]+", value.rstrip("/").rsplit("/", 1)[-1]):
      _fail(f"--{flag}={value}: its last part may hold only letters, digits, . _ -")
  return Launch(
      name=args.name, zone=args.zone, project=args.project,
      accelerator=args.accelerator, tier=args.tier,
      runtime_version=args.runtime_version or runtime_version(args.accelerator),
      service_account=args.service_account, config=args.config,
      workdir=args.workdir, data=args.data, data_field=args.data_field,
      checkpoint=args.checkpoint,
      checkpoint_fields=tuple(args.checkpoint_field or ("llm.checkpoint",)),
      tokenizer=args.tokenizer, tokenizer_field=args.tokenizer_field,
      main_args=tuple(args.main_args), results=args.results, keep=args.keep,
      poll_s=args.poll_s, log_sync_s=args.log_sync_s,
      max_requeues=args.max_requeues, max_restarts=args.max_restarts)


def dry_run(launch: Launch) -> int:
  files = [f"<{f}>" for f in ("code.tar.gz", *SCRIPTS)]
  plan = [
      ("capacity", [create_command(launch)]),
      (f"every {launch.poll_s:g} s until ACTIVE", [describe_command(launch)]),
      ("on every worker once ACTIVE", [
          ssh_command(launch, "mkdir -p ~/launch ~/job"),
          scp_to_workers(launch, files, "~/launch/"),
          ssh_command(launch, "bash ~/launch/setup.sh"),
          ssh_command(launch, "bash ~/launch/stage.sh"),
          ssh_command(launch, "bash ~/launch/start.sh 1")]),
      (f"every {launch.poll_s:g} s", [describe_command(launch),
                                      ssh_command(launch, status_command())]),
      ("after SUSPENDED/FAILED: again from capacity, after",
       [delete_command(launch)]),
      ("at the end" + (" (--keep: not run)" if launch.keep else ""),
       ([] if _is_gs(launch.workdir) else [copy_back_command(launch)])
       + [delete_command(launch)])]
  print("git archive --format=tar.gz -o <code.tar.gz> HEAD")
  for when, commands in plan:
    print(f"# {when}:")
    for command in commands:
      print(_show(command))
  for name, text in scripts(launch, _version_of("jax")).items():
    print(f"# ---- ~/launch/{name}\n{text}", end="")
  return 0


def cmd_run(args: argparse.Namespace) -> int:
  launch = _launch_from_flags(args)
  if args.dry_run:
    return dry_run(launch)
  record = os.path.join(_record_dir(args.state_dir, launch.name), "launch.json")
  if os.path.exists(record) and load(args.state_dir, launch.name).phase == "running":
    _fail(f"--name={launch.name}: a launch of that name is running; `watch "
          f"--name {launch.name}` to supervise it or `delete` it first")
  shutil.rmtree(_record_dir(args.state_dir, launch.name), ignore_errors=True)
  write_bundle(launch, args.state_dir)
  save(launch, args.state_dir)
  request_capacity(launch)
  launch.phase = "running"
  save(launch, args.state_dir)
  return _supervised(launch, args.state_dir, args.detach)


def _supervised(launch: Launch, state_dir: str, detach: bool) -> int:
  try:
    code = supervise(launch, state_dir, detach)
  except KeyboardInterrupt:
    say(f"stopped watching; the job goes on on {launch.name}. `watch --name "
        f"{launch.name}` to supervise it again, `delete --name {launch.name}` to stop")
    return 130
  if detach and launch.phase == "running":
    say(f"the job runs detached on {launch.name}. Nothing requeues it after a "
        f"preemption until `watch --name {launch.name}` runs")
  return code


def cmd_watch(args: argparse.Namespace) -> int:
  launch = load(args.state_dir, args.name)
  if launch.phase != "running":
    say(f"{launch.name} is {launch.phase}: nothing to watch")
    return 0 if launch.phase in ("done", "deleted") else 1
  return _supervised(launch, args.state_dir, detach=False)


def cmd_status(args: argparse.Namespace) -> int:
  launch = load(args.state_dir, args.name)
  state = qr_state(launch) if launch.phase == "running" else "-"
  print(f"launch {launch.name}: {launch.phase}; queued resource {state}; "
        f"{launch.accelerator} {launch.tier} ({launch.runtime_version}); "
        f"attempt {launch.attempt}, {launch.requeues} requeue(s), "
        f"{launch.restarts} restart(s); code {launch.commit[:12]}; "
        f"workdir {launch.workdir}")
  if state == ACTIVE:
    answer = run_quiet(ssh_command(launch, status_command()))
    print(answer.stdout.strip() or "workers: no answer")
  return 0


def cmd_logs(args: argparse.Namespace) -> int:
  """The job's log: for a gs:// workdir the copy there (kept after the VM is
  gone), else (or before the first copy) from the VM."""
  launch = load(args.state_dir, args.name)
  attempt = args.attempt or launch.attempt
  if _is_gs(launch.workdir):
    copy = f"{launch.workdir}/launch/attempt-{attempt}-worker-{args.worker}.log"
    answer = run_quiet(["gcloud", "storage", "cat", copy])
    if answer.returncode == 0:
      print("\n".join(answer.stdout.splitlines()[-args.tail:]))
      return 0
    say(f"no {copy} yet; reading the VM's")
  return subprocess.run(ssh_command(
      launch, f"tail -n {args.tail} ~/job/attempt-{attempt}.log",
      worker=str(args.worker))).returncode


def cmd_delete(args: argparse.Namespace) -> int:
  launch = load(args.state_dir, args.name)
  code = run_shown(delete_command(launch))
  launch.phase = "deleted"
  save(launch, args.state_dir)
  return code


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--state-dir", default="runs/launches",
                      help="where launch records live (one folder per --name)")
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="queue a TPU, run the job, requeue it")
  run.add_argument("--name", required=True, help="queued resource and TPU VM name")
  run.add_argument("--zone", required=True)
  run.add_argument("--project", default="")
  run.add_argument("--accelerator", required=True,
                   help="e.g. v4-8, v5litepod-8 (v5e), v5p-8, v6e-8")
  run.add_argument("--tier", choices=sorted(TIER_FLAGS), default="spot")
  run.add_argument("--runtime-version", default="",
                   help="the TPU VM image; default: the generation's (RUNTIME_VERSIONS)")
  run.add_argument("--service-account", default="",
                   help="the VMs' service account (needs read on --data/--checkpoint "
                        "and write on a gs:// --workdir); default: Compute Engine's")
  run.add_argument("--config", required=True, help="e.g. configs/user_llm_gemma_tpu.py")
  run.add_argument("--workdir", required=True,
                   help="gs://... (or, not for spot/best-effort, a path on the VM "
                        "relative to the code)")
  run.add_argument("--data", default="", help="gs:// data folder, staged to each worker")
  run.add_argument("--data-field", default="data.dir")
  run.add_argument("--checkpoint", default="", help="gs:// Gemma checkpoint folder")
  run.add_argument("--checkpoint-field", action="append",
                   help="config field(s) set to the staged checkpoint (repeat; "
                        "default llm.checkpoint; RLPF: llm.policy_checkpoint and "
                        "llm.predictor_checkpoint)")
  run.add_argument("--tokenizer", default="", help="gs:// tokenizer.model")
  run.add_argument("--tokenizer-field", default="llm.tokenizer")
  run.add_argument("--results", default="runs/from_tpu",
                   help="where a local workdir is copied back to")
  run.add_argument("--keep", action="store_true", help="do not delete the TPU at the end")
  run.add_argument("--detach", action="store_true",
                   help="return once the job has started (`watch` supervises later)")
  run.add_argument("--poll-s", type=float, default=60.0)
  run.add_argument("--log-sync-s", type=float, default=60.0,
                   help="how often the log is copied into the workdir")
  run.add_argument("--max-requeues", type=int, default=20)
  run.add_argument("--max-restarts", type=int, default=20)
  run.add_argument("--dry-run", action="store_true", help="print every command, run none")
  run.add_argument("main_args", nargs="*", help="after --: more main.py flags")
  for name, help_text in [("watch", "supervise a launch: requeue, resume, finish"),
                          ("status", "the queued resource's and the job's state"),
                          ("logs", "print the job's log"),
                          ("delete", "delete the queued resource and its TPU")]:
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--name", required=True)
    if name == "logs":
      sub.add_argument("--tail", type=int, default=100)
      sub.add_argument("--worker", type=int, default=0)
      sub.add_argument("--attempt", type=int, default=0, help="default: the latest")
  return parser.parse_args(argv)


COMMANDS = {"run": cmd_run, "watch": cmd_watch, "status": cmd_status,
            "logs": cmd_logs, "delete": cmd_delete}


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  try:
    return COMMANDS[args.command](args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    print(f"[launch] error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
