"""Run an experiment on a Cloud TPU VM (or a multi-host slice) and bring its
results back, with gcloud:

  python -m infra.launch_tpu_vm --name my-run --zone us-central2-b \\
    --accelerator v4-8 --config configs/fedavg.py -- --config.train.num_steps=1000

1. create the TPU VM (`gcloud compute tpus tpu-vm create`);
2. copy the code: `git archive HEAD` as a tarball, scp'd to every worker and
   unpacked (only committed files travel: no runs/, no data);
3. install on every worker: the requirements and `jax[tpu]` at the pinned
   jax version;
4. run `main.py --config ... --workdir ... --config.distributed=True` on every
   worker at once (`--worker=all`; `jax.distributed.initialize()` finds the
   slice), its output streamed here as gcloud prints it;
5. copy the workdir back from worker 0 (process 0 writes results.json);
6. delete the VM, also when a step before failed (`--keep` keeps it).

`--dry-run` prints every command and runs none. A workdir on `gs://` lets
orbax checkpoint to a bucket so a preempted run resumes elsewhere; the copy
back then has nothing to do and is skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

REMOTE_DIR = "userllm_repo"


def _version_of(package: str, requirements: str = "requirements.txt") -> str:
  """The pinned version of `package` in requirements.txt."""
  with open(requirements) as f:
    for line in f:
      match = re.match(rf"^{re.escape(package)}(\[[^\]]*\])?==([^\s;#]+)",
                       line.strip())
      if match:
        return match.group(2)
  raise SystemExit(f"{requirements}: no pinned {package}==<version> line")


def commands(args, tarball: str) -> tuple[list[list[str]], list[str]]:
  """(the steps in order, the delete command run at the end)."""
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"]
                                     if args.project else [])
  every = where + ["--worker=all"]
  remote = f"~/{REMOTE_DIR}"
  jax_version = _version_of("jax")
  # requirements.txt pins jax[cpu]; the TPU build of the same version replaces it
  install = (f"cd {remote} && grep -v '^jax\\[' requirements.txt > req-tpu.txt && "
             f"python3 -m pip install -q -r req-tpu.txt 'jax[tpu]=={jax_version}' -f "
             "https://storage.googleapis.com/jax-releases/libtpu_releases.html")
  run = " ".join(["cd", remote, "&&", "python3", "main.py", "--config",
                  shlex.quote(args.config), "--workdir", shlex.quote(args.workdir),
                  "--config.distributed=True",
                  *[shlex.quote(a) for a in args.main_args]])
  steps = [
      tpu + ["create", args.name, *where, f"--accelerator-type={args.accelerator}",
             f"--version={args.version}"] + (["--spot"] if args.spot else []),
      tpu + ["scp", tarball, f"{args.name}:~/{REMOTE_DIR}.tar.gz", *every],
      tpu + ["ssh", args.name, *every, "--command",
             f"mkdir -p {remote} && tar -xzf ~/{REMOTE_DIR}.tar.gz -C {remote}"],
      tpu + ["ssh", args.name, *every, "--command", install],
      tpu + ["ssh", args.name, *every, "--command", run],
  ]
  if not args.workdir.startswith("gs://"):
    steps.append(tpu + ["scp", "--recurse",
                        f"{args.name}:{remote}/{args.workdir}", args.results,
                        *where, "--worker=0"])
  delete = tpu + ["delete", args.name, *where, "--quiet"]
  return steps, delete


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default="")
  parser.add_argument("--accelerator", default="v4-8", help="e.g. v4-8, v5litepod-16")
  parser.add_argument("--version", default="tpu-ubuntu2204-base",
                      help="TPU VM software version")
  parser.add_argument("--spot", action="store_true", help="a spot (preemptible) VM")
  parser.add_argument("--config", required=True, help="e.g. configs/fedavg.py")
  parser.add_argument("--workdir", default="runs/tpu",
                      help="on the VM, relative to the code (or gs://...)")
  parser.add_argument("--results", default="runs/from_tpu",
                      help="where the workdir is copied back to here")
  parser.add_argument("--keep", action="store_true", help="do not delete the VM")
  parser.add_argument("--dry-run", action="store_true",
                      help="print every command, run none")
  parser.add_argument("main_args", nargs="*", help="after --: more main.py flags")
  return parser.parse_args(argv)


def _show(command: list[str]) -> str:
  return " ".join(shlex.quote(c) for c in command)


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  with tempfile.TemporaryDirectory() as tmp:
    tarball = os.path.join(tmp, f"{REMOTE_DIR}.tar.gz")
    steps, delete = commands(args, tarball)
    archive = ["git", "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    if args.dry_run:
      for command in [archive, *steps] + ([] if args.keep else [delete]):
        print(_show(command))
      return 0
    subprocess.run(archive, check=True)
    os.makedirs(args.results, exist_ok=True)
    failed = 0
    try:
      for command in steps:
        print(f"[tpu_vm] {_show(command)}", flush=True)
        failed = subprocess.run(command).returncode  # output streams through
        if failed:
          print(f"[tpu_vm] failed with exit code {failed}: {_show(command)}",
                file=sys.stderr, flush=True)
          break
    finally:
      if not args.keep:
        print(f"[tpu_vm] {_show(delete)}", flush=True)
        subprocess.run(delete)
  return failed


if __name__ == "__main__":
  sys.exit(main())
