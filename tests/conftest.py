"""Test setup: 8 fake CPU devices (set before jax is imported) and shared,
session-scoped fixtures: the tiny data, a vocabulary, and one run of each
workflow that several tests assert on (each workflow compiles and trains once
per session, not once per test)."""

import os
import sys

# The tests' tiny models are compile-bound: LLVM optimising the generated CPU
# code costs more compile time than the code then saves (a User-LLM workflow
# test: 52 s at the default level, 40 s at 0). Put first, so a level in the
# caller's XLA_FLAGS still wins; subprocesses (main.py, the notebook, the two
# processes of the multi-host test) inherit it. The older fusion emitters
# compile faster still (configs/user_llm.py:tiny through main.py: 38 s of CPU
# at level 0, 21 s with them; the same results to float rounding).
os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                           "--xla_cpu_use_fusion_emitters=false "
                           + os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ML100K_DIR = os.path.join(REPO, "..", "shared", "data", "movielens-100k")


import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# A compilation cache for this session only, shared by the xdist workers and
# the main.py processes they start (through the environment): workflows that
# rebuild the same computation (a resumed run, the notebook's tiny runs, a
# second method over the same stages) load it instead of compiling it again.
# Nothing carries over between sessions: the controller removes it. (The
# "Fatal Python error: Aborted" once blamed on this cache was XLA:CPU's
# collective deadlock: train_loop.cpu_collectives_can_deadlock.)
_OWNER = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"userllm-jax-cache-{_OWNER}")
os.makedirs(_CACHE_DIR, exist_ok=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller, last out
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def tiny_config():
  """configs/default.py:tiny, fresh per test (tests may change it)."""
  from configs import default
  return default.get_config("tiny")


@pytest.fixture(scope="session")
def tiny_timelines():
  from configs import default
  from data import sources
  return sources.load_timelines(default.get_config("tiny").data, quiet=True)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_timelines, tmp_path_factory):
  """A SentencePiece vocabulary trained on the tiny data's text."""
  from data import prompts
  from data.vocab import Tokenizer, train_vocabulary
  path = tmp_path_factory.mktemp("vocab") / "spm.model"
  return Tokenizer(train_vocabulary(prompts.corpus(tiny_timelines), str(path), 300))


def run_workflow(config, workdir, num_devices=1):
  """A workflow's run as main.py does it (mesh from the config, results.json),
  on the first `num_devices` of the 8 fake devices.

  One device by default: these tests are about what a workflow computes, and
  on 2 cores 8 fake devices only add collectives and per-step waits
  (train_loop.cpu_collectives_can_deadlock). Sharding is tested where it is
  the point (the sharded == single-device tests, and tests/test_main.py's
  main.py runs on all 8 devices)."""
  import importlib
  from configs.common import WORKFLOWS
  from infra import mesh as mesh_lib, results
  workflow = importlib.import_module(WORKFLOWS[config.workflow])
  os.makedirs(workdir, exist_ok=True)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
  return results.write_results(
      str(workdir), workflow.run(config, str(workdir), mesh), config)


class ConfigReads:
  """Records which config fields are read (every ConfigDict lookup) while
  active; `unread(config)` lists the leaf fields nobody looked up."""

  def __enter__(self):
    import ml_collections
    self.read, original = set(), ml_collections.ConfigDict.__getitem__
    self._restore = (ml_collections.ConfigDict, original)
    reads = self.read

    def getitem(config, key):
      reads.add((id(config), key))
      return original(config, key)

    ml_collections.ConfigDict.__getitem__ = getitem
    return self

  def __exit__(self, *exc):
    cls, original = self._restore
    cls.__getitem__ = original

  def unread(self, config, prefix="config") -> list[str]:
    import ml_collections
    out = []
    for key in config.keys():
      value = config._fields[key]  # noqa: SLF001 (not a read)
      if isinstance(value, ml_collections.ConfigDict):
        out += self.unread(value, f"{prefix}.{key}")
      elif (id(config), key) not in self.read:
        out.append(f"{prefix}.{key}")
    return out


# The longest test files first (longest-processing-time scheduling): with
# `--dist loadfile` pytest-xdist hands files to the two workers in collection
# order (pytest.ini turns off its default reordering by test count, which put
# the one-test, two-minute notebook file last), so the long ones start early
# and no worker finishes a long file alone at the end. Seconds measured on
# 2 cores (2026-12-07, setup + call + teardown of each file's tests; the
# RecBole file runs only where its venv is); files not named here follow.
_LONGEST_FIRST = (
    "test_user_llm.py",  # 99
    "test_notebook.py",  # 76
    "test_use.py",  # 74
    "test_federated_llm.py",  # 63
    "test_summarize.py",  # 61
    "test_llm.py",  # 61
    "test_federated_user_llm.py",  # 57
    "test_multitask.py",  # 51
    "test_federated_algorithms.py",  # 45
    "test_adapters.py",  # 32
    "test_aot.py",  # 32
    "test_multihost.py",  # 30
    "test_recbole_peer.py",  # 30
    "test_seqio_tasks.py",  # 30
    "test_main.py",  # 26
    "test_federated_data.py",  # 23
    "test_federated_llm_split.py",  # 21
    "test_gcs_workdir.py",  # 21
    "test_compression.py",  # 17
    "test_reliability.py",  # 16
    "test_privacy.py",  # 15
    "test_train.py",  # 13
    "test_front_door.py",  # 11
    "test_mixed_fl.py",  # 11
    "test_retrieval.py",  # 11
    "test_launch_tpu_vm.py",  # 9
    "test_configs.py",  # 8
    "test_personalisation.py",  # 6
)


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
