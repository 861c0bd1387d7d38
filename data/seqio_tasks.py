"""seqio tasks over `user_timelines` (data/tfds_builder.py): the prompt tasks
of data/prompts.py as a seqio Task each and their equal-rate Mixture, and the
training batches the User-LLM workflow reads from that Mixture when
`config.userllm.input_pipeline="seqio"`.

There is one definition of a task: `prompts.PromptBuilder`. A Task reads a
tfds example's `user` and `cut` and asks the builder for that row's prompt
and answer ids, so a seqio example holds exactly the tokens of the in-memory
path (`inputs`: the prompt, no eos; `targets`: the answer + eos), with their
text (`*_pretokenized`, decoded from those ids) for reading. Names:
`user_timelines_<config>_<task>` and `user_timelines_<config>_multitask`.

The tfds train split holds the (user, cut) rows of `prompts.training_examples`
with the workflow's seed, so both input paths train on the same examples; they
differ in order only (seqio samples the tasks at equal rates from shuffled
streams, the in-memory path shuffles every (user, cut, task) row per epoch).
The vocabulary is the workflow's (`userllm/language_model.py: tokenizer`).

This module imports TensorFlow; the training process loads it only when the
seqio input path is chosen.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import seqio
import tensorflow as tf

from data import prompts, sources, tfds_builder
from data.prompts import TASKS


def tfds_data_dir(data_config, workdir: str, cuts_per_user: int, seed: int) -> str:
  """`<workdir>/tfds/<hash>`: prepared data is reused only for the same
  config.data and train cuts."""
  blob = json.dumps([data_config.to_dict(), cuts_per_user, seed], sort_keys=True,
                    default=str)
  return os.path.join(workdir, "tfds", hashlib.sha1(blob.encode()).hexdigest()[:10])


def prepare(data_config, workdir: str, cuts_per_user: int, seed: int
            ) -> tuple[str, seqio.TfdsDataSource]:
  """Builds user_timelines/<config> into the workdir: (<config>, its seqio
  source)."""
  config_name = tfds_builder.builder_config_name(data_config)
  data_dir = tfds_data_dir(data_config, workdir, cuts_per_user, seed)
  kwargs = {"source_dir": data_config.dir or None,
            "synthetic_spec": sources.synthetic_spec(data_config),
            "train_cuts_per_user": cuts_per_user, "train_seed": seed}
  if data_config.source != "synthetic":
    kwargs["duplicates"] = data_config.duplicates
  builder = tfds_builder.UserTimelines(config=config_name, data_dir=data_dir,
                                       **kwargs)
  builder.download_and_prepare()
  return config_name, seqio.TfdsDataSource(
      tfds_name=f"user_timelines/{config_name}:{builder.VERSION}",
      tfds_data_dir=data_dir, tfds_builder_kwargs=kwargs)


def _task_rows(builder: prompts.PromptBuilder, task: str):
  """A preprocessor: tfds example -> the builder's tokens of (user, cut, task)."""
  task_id = TASKS.index(task)

  def tokens(user, cut):
    user, cut = int(user), int(cut)
    prompt = builder.prompt(user, cut, task)
    answer = builder.answer(user, cut, task)
    return (np.asarray(prompt, np.int32), np.asarray(answer, np.int32),
            builder.tokenizer.processor.decode(prompt).encode(),
            builder.tokenizer.decode(answer).encode())

  def fn(ex):
    prompt, answer, prompt_text, answer_text = tf.numpy_function(
        tokens, [ex["user"], ex["cut"]], [tf.int32, tf.int32, tf.string, tf.string],
        stateful=False)
    prompt.set_shape([None])
    answer.set_shape([None])
    prompt_text.set_shape([])
    answer_text.set_shape([])
    return {"inputs": prompt, "targets": answer, "inputs_pretokenized": prompt_text,
            "targets_pretokenized": answer_text, "user": ex["user"],
            "cut": ex["cut"], "task_id": tf.constant(task_id, tf.int32)}

  return lambda ds: ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def exact_match(targets, predictions) -> dict[str, float]:
  return {"exact_match": float(np.mean([t == p for t, p in zip(targets, predictions)]))}


def register_tasks(config, workdir: str, builder: prompts.PromptBuilder,
                   tasks=TASKS, seed: int | None = None) -> dict[str, str]:
  """Prepares the data and registers one seqio Task per task and their
  equal-rate Mixture.

  Args:
    config: a user_llm config (its `data` and `userllm.cuts_per_user`).
    workdir: where the tfds data is prepared.
    builder: the PromptBuilder over the *full* timelines (held-out cuts index
      them) whose tokens the tasks yield.
    tasks: the tasks to register and mix.
    seed: the training examples' seed (the workflow's stage-3 seed).

  Returns:
    {task: registered seqio task name, "multitask": the mixture's name}.
    Registering again replaces them.
  """
  seed = config.seed + 1 if seed is None else seed
  config_name, source = prepare(config.data, workdir, config.userllm.cuts_per_user,
                                seed)
  vocab = seqio.SentencePieceVocabulary(builder.tokenizer.path)
  features = {k: seqio.Feature(vocab, add_eos=False) for k in ("inputs", "targets")}
  names = {}
  for task in tasks:
    name = f"user_timelines_{config_name}_{task}"
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, source=source,
                           preprocessors=[_task_rows(builder, task)],
                           output_features=features, metric_fns=[exact_match])
    names[task] = name
  mixture = f"user_timelines_{config_name}_multitask"
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [names[t] for t in tasks], default_rate=1.0)
  return {**names, "multitask": mixture}


class MixtureBatches:
  """step -> the training batch of that step, read from a seqio Mixture.

  The stream is the Mixture's shuffled, equal-rate sample with a fixed seed,
  so it is a pure function of the step: a call at step s that does not follow
  step s - 1 (a resumed run) restarts the stream and skips s batches.
  Batches have the in-memory path's keys and shapes ("tokens", "token_mask",
  "target_mask", "task_ids", and "events" when the history is shown as events).
  """

  def __init__(self, mixture: str, builder: prompts.PromptBuilder,
               batch_size: int, seed: int, with_events: bool):
    self.mixture, self.builder = seqio.get_mixture_or_task(mixture), builder
    self.batch_size, self.seed, self.with_events = batch_size, seed, with_events
    self.next_step, self.stream = None, None

  def _restart(self, step: int) -> None:
    lengths = {"inputs": self.builder.prompt_len, "targets": self.builder.answer_len}
    ds = self.mixture.get_dataset(lengths, split="train", shuffle=True,
                                  seed=self.seed, num_epochs=None,
                                  passthrough_features=["user", "cut", "task_id"])
    self.stream = ds.skip(step * self.batch_size).as_numpy_iterator()

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if step != self.next_step:
      self._restart(step)
    self.next_step = step + 1
    rows = [next(self.stream) for _ in range(self.batch_size)]
    pad = self.builder.tokenizer.pad
    prompt, prompt_mask = pad([r["inputs"].tolist() for r in rows],
                              self.builder.prompt_len, left=True)
    answer, answer_mask = pad([r["targets"].tolist() for r in rows],
                              self.builder.answer_len, left=False)
    batch = {"tokens": np.concatenate([prompt, answer], 1),
             "token_mask": np.concatenate([prompt_mask, answer_mask], 1),
             "target_mask": np.concatenate([np.zeros_like(prompt_mask),
                                            answer_mask], 1),
             "task_ids": np.array([r["task_id"] for r in rows], np.int32)}
    if self.with_events:
      examples = prompts.Examples(np.array([r["user"] for r in rows], np.int32),
                                  np.array([r["cut"] for r in rows], np.int32),
                                  batch["task_ids"])
      batch["events"] = self.builder.events(examples, np.arange(len(rows)))
    return batch


def training_batches(config, workdir: str, builder: prompts.PromptBuilder,
                     tasks, seed: int) -> MixtureBatches:
  """The workflow's stage-3 batches from the Mixture of `tasks`."""
  names = register_tasks(config, workdir, builder, tasks, seed)
  return MixtureBatches(names["multitask"], builder, config.train.batch_size, seed,
                        with_events=builder.gives_events)
