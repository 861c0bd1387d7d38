"""tfds builder over local sources and the seqio text-to-text tasks."""

import numpy as np
import seqio
import tensorflow_datasets as tfds

from conftest import ML100K_DIR
from data import seqio_tasks, sources, splits, tfds_builder


def test_tasks_yield_tokenized_examples(tiny_config, tmp_path):
  names = seqio_tasks.register_tasks(tiny_config.data, str(tmp_path))
  assert set(names) == set(seqio_tasks.TASKS)
  lengths = {"inputs": 256, "targets": 32}
  title_task = seqio.get_mixture_or_task(names["next_title"])
  vocab = title_task.output_features["targets"].vocabulary
  data = sources.load_timelines(tiny_config.data)
  split = splits.leave_last_out(data)
  examples = list(title_task.get_dataset(lengths, split="test", shuffle=False))
  assert len(examples) == len(split.test)
  for ex in examples[:5]:
    assert ex["inputs"].dtype == np.int32 and ex["inputs"][-1] == 1  # EOS
    assert vocab.decode(ex["targets"].numpy().tolist()) == (
        ex["targets_pretokenized"].numpy().decode())
    assert ex["inputs_pretokenized"].numpy().decode().startswith("Watched: ")
  # Targets are exactly the held-out items' titles, in some order.
  assert sorted(ex["targets_pretokenized"].numpy().decode() for ex in examples) == (
      sorted(str(t) for t in data.items.titles[split.test.targets]))

  genre_task = seqio.get_mixture_or_task(names["favourite_genre"])
  for ex in genre_task.get_dataset(lengths, split="validation", shuffle=False).take(5):
    assert ex["targets_pretokenized"].numpy().decode() in data.items.genre_names


def test_vocabulary_is_trained_locally_and_covers_the_prompts(tiny_config, tmp_path):
  vocab = seqio_tasks.vocabulary(tiny_config.data, str(tmp_path))
  data = sources.load_timelines(tiny_config.data)
  text = f"Watched: {data.items.titles[1]}; {data.items.titles[2]}. Next title:"
  ids = vocab.encode(text)
  assert 2 not in ids  # no unknown pieces
  assert vocab.decode(ids) == text


def test_tfds_builder_reads_real_movielens(tmp_path):
  builder = tfds_builder.UserTimelines(config="movielens_100k", data_dir=str(tmp_path),
                                       source_dir=ML100K_DIR)
  builder.download_and_prepare()
  assert builder.info.splits["test"].num_examples == 943
  ex = next(iter(tfds.as_numpy(builder.as_dataset(split="test").take(1))))
  assert len(ex["history_items"]) == len(ex["history_titles"]) >= 19
  assert ex["target_title"]
