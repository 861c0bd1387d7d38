"""tfds builder over local sources and the seqio text-to-text tasks.

seqio and tfds (tensorflow: about 4 s) are imported by the tests that use
them, not when the module is collected: both xdist workers collect every
test file, only one runs these."""

import numpy as np
import pytest

from conftest import ML100K_DIR
from data import prompts, sources, splits
from userllm import builders


def _text_config():
  from configs import user_llm
  config = user_llm.get_config("tiny")
  config.userllm.update(text_ratings=True, history_len=5, method="text_prompt")
  return config


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  """The tiny text config's tasks, registered once: (config, split, builder over
  the full timelines, task names, workdir)."""
  from data import seqio_tasks
  config = _text_config()
  workdir = str(tmp_path_factory.mktemp("seqio"))
  timelines = sources.load_timelines(config.data, quiet=True)
  split = splits.leave_last_out(timelines)
  tokenizer = builders.tokenizer_for(config, workdir, timelines)
  u = config.userllm
  builder = prompts.PromptBuilder(
      split.train, tokenizer, builders.METHODS[u.method].history, u.history_len,
      u.text_prompt_len, u.answer_len, u.text_ratings)
  names = seqio_tasks.register_tasks(config, workdir, builder.over(timelines))
  return config, split, builder.over(timelines), names, workdir


def test_seqio_examples_are_the_prompt_builders_rows(registered):
  """One definition of a task: every seqio example holds the PromptBuilder's
  prompt and answer ids for its (user, cut), the text decodes from them, and
  the test split is the leave-last-out test events."""
  import seqio
  config, split, builder, names, _ = registered
  assert set(names) == set(prompts.TASKS) | {"multitask"}
  lengths = {"inputs": builder.prompt_len, "targets": builder.answer_len}
  for task in prompts.TASKS:
    examples = list(seqio.get_mixture_or_task(names[task]).get_dataset(
        lengths, split="test", shuffle=False))
    assert sorted((int(ex["user"]), int(ex["cut"])) for ex in examples) == sorted(
        zip(split.test.users.tolist(), split.test.history_lengths.tolist()))
    for ex in examples[:6]:
      user, cut = int(ex["user"]), int(ex["cut"])
      assert ex["inputs"].numpy().tolist() == builder.prompt(user, cut, task)
      assert ex["targets"].numpy().tolist() == builder.answer(user, cut, task)
      assert ex["targets"].numpy()[-1] == builder.tokenizer.eos_id
      assert int(ex["task_id"]) == prompts.TASKS.index(task)
      answer = ex["targets_pretokenized"].numpy().decode()
      assert answer == builder.tokenizer.decode(builder.answer(user, cut, task))
      question = prompts.PROMPTS[task]
      text = ex["inputs_pretokenized"].numpy().decode()
      assert text.startswith("Watched:") and question in text, text
  # the tfds train split holds the in-memory path's (user, cut) rows
  train = prompts.training_examples(split.train, config.userllm.cuts_per_user,
                                    config.seed + 1)
  rows = {(int(ex["user"]), int(ex["cut"])) for ex in seqio.get_mixture_or_task(
      names["next_title"]).get_dataset(lengths, split="train", shuffle=False)}
  assert rows == set(zip(train.users.tolist(), train.cuts.tolist()))


def test_mixture_batches_equal_the_in_memory_batches_of_their_rows(registered):
  """The seqio input path's batches: the in-memory path's keys, shapes and
  values for the same (user, cut, task) rows; every task is sampled; and
  batch s is the same whether reached in sequence or straight after a restart."""
  import seqio
  from data import seqio_tasks
  config, _, builder, names, _ = registered
  batches = seqio_tasks.MixtureBatches(names["multitask"], builder, 16, seed=1,
                                       with_events=True)
  in_order = [batches(step) for step in range(4)]
  seen_tasks = set()
  for batch in in_order:
    assert batch["tokens"].shape == (16, builder.prompt_len + builder.answer_len)
    seen_tasks |= set(batch["task_ids"].tolist())
  assert seen_tasks == set(range(len(prompts.TASKS)))
  # the Mixture's first 16 rows, rebuilt by the in-memory path
  stream = seqio.get_mixture_or_task(names["multitask"]).get_dataset(
      {"inputs": builder.prompt_len, "targets": builder.answer_len}, split="train",
      shuffle=True, seed=1, num_epochs=None,
      passthrough_features=["user", "cut", "task_id"]).as_numpy_iterator()
  rows = [next(stream) for _ in range(16)]
  examples = prompts.Examples(np.array([r["user"] for r in rows]),
                              np.array([r["cut"] for r in rows]),
                              np.array([r["task_id"] for r in rows]))
  expected = builder.batch(examples, np.arange(16))
  for key in ("tokens", "token_mask", "target_mask", "task_ids"):
    np.testing.assert_array_equal(in_order[0][key], expected[key], err_msg=key)
  events = builder.events(examples, np.arange(16))  # what encoders would read
  for key in ("items", "ratings", "genres"):
    np.testing.assert_array_equal(in_order[0]["events"][key], events[key],
                                  err_msg=key)
  resumed = seqio_tasks.MixtureBatches(names["multitask"], builder, 16, seed=1,
                                       with_events=False)(3)
  np.testing.assert_array_equal(resumed["tokens"], in_order[3]["tokens"])


def test_vocabulary_is_trained_locally_and_covers_the_prompts(registered):
  import seqio
  config, _, builder, names, workdir = registered
  vocab = seqio.get_mixture_or_task(names["rating"]).output_features[
      "inputs"].vocabulary
  assert vocab.sentencepiece_model_file == builder.tokenizer.path == (
      builders.tokenizer_for(config, workdir, None).path)  # one file, trained once
  titles = builder.timelines.items.titles
  text = f"Watched: {titles[1]}; {titles[2]}. Next title:"
  ids = vocab.encode(text)
  assert 2 not in ids  # no unknown pieces
  assert vocab.decode(ids) == text


def test_tfds_builder_reads_real_movielens(tmp_path):
  import tensorflow_datasets as tfds
  from data import tfds_builder
  builder = tfds_builder.UserTimelines(config="movielens_100k", data_dir=str(tmp_path),
                                       source_dir=ML100K_DIR)
  builder.download_and_prepare()
  assert builder.info.splits["test"].num_examples == 943
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test").take(1))))
  assert len(ex["history_items"]) == len(ex["history_titles"]) == ex["cut"] >= 19
  assert ex["target_title"] and 1 <= ex["target_rating"] <= 5
