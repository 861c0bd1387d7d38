"""Every config holds only fields its workflow reads (the User-LLM configs are
checked on the end-to-end runs of test_user_llm.py and test_multitask.py, the
DP one on test_privacy.py's)."""

import pytest

from conftest import ConfigReads, ML100K_DIR, run_workflow


@pytest.mark.parametrize("name", ["default", "fedavg", "movielens_100k",
                                  "retrieval"])
def test_every_config_field_is_read(name, tmp_path):
  import importlib
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  if name == "movielens_100k":
    config.data.dir = ML100K_DIR
  with ConfigReads() as reads:
    run_workflow(config, tmp_path)
  assert reads.unread(config) == []


def test_the_tiny_variant_has_the_fields_of_the_full_config():
  import importlib
  for name in ("default", "fedavg", "dp_fedavg", "movielens_100k", "user_llm",
               "multitask", "retrieval", "rlpf", "rlpf_movielens", "federated_llm", "movielens_1m",
               "amazon_beauty"):
    module = importlib.import_module(f"configs.{name}")
    full, tiny = module.get_config(), module.get_config("tiny")
    assert sorted(full.to_dict()) == sorted(tiny.to_dict()), name
    for section in full.keys():
      if hasattr(full[section], "keys"):
        assert sorted(full[section].keys()) == sorted(tiny[section].keys()), (
            name, section)


def test_unknown_variant_is_an_error():
  from configs import default
  with pytest.raises(ValueError, match="unknown config variant 'big'"):
    default.get_config("big")
