"""seqio text-to-text tasks over `user_timelines` and their SentencePiece vocabulary.

Tasks (names `user_timelines_<config>_<task>`), the text-to-text form of
data/prompts.py's tasks (same prompt words and answers; here the genre and
summary answers read the whole history, there the shown one):
- `next_title`: "Watched: t1; t2; ...; tN. Next title:" -> the next item's title.
- `favourite_genre`: "Watched: ... Favourite genre:" -> the most frequent genre.
- `rating`: "Watched: ... Rating of <title>:" -> the user's rating, "1".."5".
- `title_genre`: "Watched: ... Genre of <title>:" -> the title's first genre.
- `summary`: "Watched: ... Summary:" -> "<genre>, <genre>; <rating level>".
The prompt words and separators are data/prompts.py's. The config is a
`user_llm` one: `config.userllm.history_len` titles are shown, each followed by
"(rating)" with `config.userllm.text_ratings`. The mixture
`user_timelines_<config>_multitask` samples the five tasks equally.

The vocabulary is `config.llm.tokenizer` when given, else a SentencePiece model
trained locally on the data's text (titles, genre names, prompt words, with
`config.data.vocab_size`) and saved under the workdir, so a fresh offline
machine needs no download.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import numpy as np
import seqio
import tensorflow as tf

from data import sources, tfds_builder
from data.prompts import (HISTORY_HEAD, HISTORY_SEP, HISTORY_TAIL, ITEM_TAIL,
                          ITEM_TASKS, PROMPTS as _PROMPTS, TASKS, corpus)
from data import timelines as tl
from data.vocab import train_vocabulary
from infra.errors import ConfigError


def data_fingerprint(data_config: ml_collections.ConfigDict) -> str:
  """A short hash of config.data: prepared data is reused only for the same one."""
  blob = json.dumps(data_config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:10]


def tfds_data_dir(data_config, workdir: str) -> str:
  return os.path.join(workdir, "tfds", data_fingerprint(data_config))


def vocabulary(config, workdir: str, timelines: tl.UserTimelines | None = None
               ) -> seqio.SentencePieceVocabulary:
  """config.llm.tokenizer, or a locally trained model (cached in workdir)."""
  if config.llm.tokenizer:
    if not os.path.exists(config.llm.tokenizer):
      raise FileNotFoundError(f"config.llm.tokenizer={config.llm.tokenizer!r}"
                              " does not exist")
    return seqio.SentencePieceVocabulary(config.llm.tokenizer)
  path = os.path.join(tfds_data_dir(config.data, workdir), "spm.model")
  if not os.path.exists(path):
    timelines = timelines or sources.load_timelines(config.data, quiet=True)
    train_vocabulary(corpus(timelines), path, config.data.vocab_size)
  return seqio.SentencePieceVocabulary(path)


def prepare(data_config, workdir: str) -> tuple[str, dict]:
  """Builds user_timelines/<config> into the workdir; returns (name, builder kwargs)."""
  config_name = tfds_builder.builder_config_name(data_config)
  kwargs = {"source_dir": data_config.dir or None,
            "synthetic_spec": sources.synthetic_spec(data_config)}
  builder = tfds_builder.UserTimelines(
      config=config_name, data_dir=tfds_data_dir(data_config, workdir), **kwargs)
  builder.download_and_prepare()
  return f"user_timelines/{config_name}:{builder.VERSION}", kwargs


def _rating_text(ratings):
  return tf.strings.as_string(tf.clip_by_value(tf.round(ratings), 1, 5), precision=0)


def _to_text(task: str, max_history: int, show_ratings: bool):
  """Example -> {"inputs": prompt text, "targets": answer text}."""
  def fn(ex):
    titles = ex["history_titles"][-max_history:]
    if show_ratings:
      titles = tf.strings.join([titles, " (", _rating_text(
          ex["history_ratings"][-max_history:]), ")"])
    history = tf.strings.reduce_join(titles, separator=f"{HISTORY_SEP} ")
    question = [_PROMPTS[task]]
    if task in ITEM_TASKS:
      question += [" ", ex["target_title"], ITEM_TAIL]
    inputs = tf.strings.join([f"{HISTORY_HEAD} ", history, f"{HISTORY_TAIL} ",
                              *question])
    target = {"next_title": ex["target_title"],
              "favourite_genre": ex["favourite_genre"],
              "rating": _rating_text(ex["target_rating"]),
              "title_genre": ex["target_genre"], "summary": ex["summary"]}[task]
    return {"inputs": inputs, "targets": target}
  return fn


def _map(fn):
  return lambda ds: ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def exact_match(targets, predictions) -> dict[str, float]:
  return {"exact_match": float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def register_tasks(config, workdir: str) -> dict[str, str]:
  """Prepares the data and registers one seqio Task per entry of TASKS and
  their equal-rate Mixture.

  Returns:
    {task: registered seqio task name, "multitask": the mixture's name}.
    Registering again replaces them.
  """
  data_config, history = config.data, config.userllm.history_len
  if history < 1:
    raise ConfigError(f"config.userllm.history_len={history} must be >= 1")
  tfds_name, builder_kwargs = prepare(data_config, workdir)
  vocab = vocabulary(config, workdir)
  features = {k: seqio.Feature(vocab, add_eos=True) for k in ("inputs", "targets")}
  config_name = tfds_name.split("/")[1].split(":")[0]
  names = {}
  for task in TASKS:
    name = f"user_timelines_{config_name}_{task}"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.TfdsDataSource(
            tfds_name=tfds_name, tfds_data_dir=tfds_data_dir(data_config, workdir),
            tfds_builder_kwargs=builder_kwargs),
        preprocessors=[_map(_to_text(task, history, config.userllm.text_ratings)),
                       seqio.preprocessors.tokenize,
                       seqio.preprocessors.append_eos_after_trim],
        output_features=features, metric_fns=[exact_match])
    names[task] = name
  mixture = f"user_timelines_{config_name}_multitask"
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [names[t] for t in TASKS], default_rate=1.0)
  return {**names, "multitask": mixture}
