"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
ML100K_DIR = os.path.join(REPO, "..", "shared", "data", "movielens-100k")

import pytest  # noqa: E402


@pytest.fixture
def tiny_config():
  from configs import tiny
  return tiny.get_config()
