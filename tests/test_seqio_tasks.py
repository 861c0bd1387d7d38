"""tfds builder over local sources and the seqio text-to-text tasks."""

import numpy as np
import seqio
import tensorflow_datasets as tfds

from conftest import ML100K_DIR
from data import seqio_tasks, sources, splits, tfds_builder


def _text_config():
  from configs import user_llm
  config = user_llm.get_config("tiny")
  config.userllm.update(text_ratings=True, history_len=5)
  return config


def test_tasks_yield_tokenized_examples(tmp_path):
  tiny_config = _text_config()
  names = seqio_tasks.register_tasks(tiny_config, str(tmp_path))
  assert set(names) == set(seqio_tasks.TASKS) | {"multitask"}
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

  # the other tasks: the question names the held-out title; ratings shown
  user = split.test.users[0]
  items = data.user_items(user)
  ratings = data.ratings[data.user_offsets[user]:][:len(items)]
  title, rating = str(data.items.titles[items[-1]]), ratings[-1]
  expected = {
      "rating": (f"Rating of {title}:", str(int(np.clip(np.round(rating), 1, 5)))),
      "title_genre": (f"Genre of {title}:", data.items.genre_names[
          int(np.argmax(data.items.genres[items[-1]]))]),
      "summary": ("Summary:", tfds_builder.summary(data.items, items[:-1],
                                                   ratings[:-1]))}
  stars = lambda r: str(int(np.clip(np.round(r), 1, 5)))  # noqa: E731
  shown = [f"{data.items.titles[i]} ({stars(r)})" for i, r in
           zip(items[:-1][-tiny_config.userllm.history_len:],
               ratings[:-1][-tiny_config.userllm.history_len:])]
  for task, (question, answer) in expected.items():
    pairs = {ex["inputs_pretokenized"].numpy().decode():
             ex["targets_pretokenized"].numpy().decode()
             for ex in seqio.get_mixture_or_task(names[task]).get_dataset(
                 lengths, split="test", shuffle=False)}
    assert pairs[f"Watched: {'; '.join(shown)}. {question}"] == answer
  mixed = seqio.get_mixture_or_task(names["multitask"]).get_dataset(
      lengths, split="train", shuffle=True, seed=0)
  questions = {vocab.decode(ex["inputs"].numpy().tolist()).split(". ")[-1].split(" ")[0]
               for ex in mixed.take(60)}
  assert questions == {"Next", "Favourite", "Rating", "Genre", "Summary:"}


def test_vocabulary_is_trained_locally_and_covers_the_prompts(tmp_path):
  tiny_config = _text_config()
  vocab = seqio_tasks.vocabulary(tiny_config, str(tmp_path))
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
