"""The five personalisation tasks (prompts, answers, candidates, metrics) and
multi-task adapter training through the workflow (configs/multitask.py:tiny),
from in-memory batches and from the seqio Mixture."""

import json

import numpy as np
import pytest

from data import prompts, splits
from conftest import ConfigReads, run_workflow
from infra.errors import ConfigError


@pytest.fixture
def tiny_text(tiny_timelines, tiny_tokenizer):
  return tiny_timelines, tiny_tokenizer


def _decode(tok, batch, row=0):
  text = tok.decode(batch["prompt"][row][batch["prompt_mask"][row]])
  return text.replace(" .", ".").replace(" :", ":").replace(" ;", ";")


def test_every_task_asks_its_question_and_answers_from_its_candidates(tiny_text):
  timelines, tok = tiny_text
  builder = prompts.PromptBuilder(timelines, tok, "text", history_len=3,
                                  prompt_len=200, answer_len=40, show_ratings=True)
  user, cut = 5, 6
  items = timelines.user_items(user)
  ratings = timelines.ratings[timelines.user_offsets[user]:][:len(items)]
  target = timelines.items.titles[items[cut]]
  history = items[cut - 3:cut]
  genres = timelines.items.genre_names
  first, second = prompts.top_two_genres(timelines.items, history)
  level = prompts.LEVELS[prompts.rating_level(ratings[cut - 3:cut])]
  expected = {
      "next_title": ("Next title:", target),
      "favourite_genre": ("Favourite genre:",
                          genres[prompts.favourite_genre_index(timelines.items,
                                                               history)]),
      "rating": (f"Rating of {target}:", prompts.RATINGS[
          prompts.rating_bucket(ratings[cut])]),
      "title_genre": (f"Genre of {target}:",
                      genres[int(np.argmax(timelines.items.genres[items[cut]]))]),
      "summary": ("Summary:", f"{genres[first]}, {genres[second]}; {level}")}
  for task, (question, answer) in expected.items():
    ex = prompts.Examples(np.array([user]), np.array([cut]),
                          np.array([prompts.TASKS.index(task)]))
    batch = builder.batch(ex, np.arange(1))
    text = _decode(tok, batch)
    latest = timelines.items.titles[items[cut - 1]]
    bucket = prompts.RATINGS[prompts.rating_bucket(ratings[cut - 1])]
    assert text.startswith("Watched:") and text.endswith(question), text
    assert text.endswith(f"{latest} ({bucket}). {question}"), text
    got = batch["tokens"][0][batch["target_mask"][0]]
    assert tok.decode(got) == answer, task
    assert batch["task_ids"][0] == prompts.TASKS.index(task)
    candidates, mask = builder.candidates(task)
    label = builder.label(user, cut, task)
    np.testing.assert_array_equal(candidates[label][mask[label]], got)


def test_task_metrics_from_fixed_scores(tiny_text):
  from userllm import evaluation
  timelines, tok = tiny_text
  split = splits.leave_last_out(timelines)
  builder = prompts.PromptBuilder(timelines, tok, "text", 3, 60, 40)
  examples = prompts.held_out_examples(split.test, "rating", 0, 0)
  evaluator = evaluation.TaskEvaluator(None, builder, examples, prompts.TASKS,
                                       "test", 4, 8, mesh=None)
  n = len(examples)
  for task in ("favourite_genre", "rating", "summary", "title_genre"):
    labels = evaluator.labels(task)
    perfect = np.eye(len(builder.answers[task]))[labels]
    assert evaluator.task_metrics(task, perfect)["accuracy"] == 1.0
  labels = evaluator.labels("rating")
  off_by_one = np.eye(5)[np.where(labels < 4, labels + 1, labels - 1)]
  metrics = evaluator.task_metrics("rating", off_by_one)
  assert metrics == {"accuracy": 0.0, "mae": 1.0}
  # title_genre: any of the item's genres is right, the others are not
  targets = timelines.item_ids[timelines.user_offsets[examples.users] + examples.cuts]
  item_genres = timelines.items.genres[targets]
  other = np.argmin(item_genres, 1)  # a genre the item does not have
  assert (item_genres[np.arange(n), other] == 0).all()
  wrong = np.eye(item_genres.shape[1])[other]
  assert evaluator.task_metrics("title_genre", wrong)["accuracy"] == 0.0
  last = np.eye(item_genres.shape[1])[item_genres.shape[1] - 1 - np.argmax(
      item_genres[:, ::-1], 1)]  # the item's last-listed genre
  assert evaluator.task_metrics("title_genre", last)["accuracy"] == 1.0


def test_multitask_adapters_train_through_the_workflow(tmp_path):
  """configs/multitask.py:tiny: every kind trains only its adapters on the
  shared, frozen LM stage and reports every task."""
  from configs import multitask
  config = multitask.get_config("tiny")
  config.userllm.eval_base = True
  results = {}
  for kind in ("mode", "lora"):
    config.adapter.kind = kind
    with ConfigReads() as reads:
      results[kind] = run_workflow(config, tmp_path)
    if kind == "mode":  # the first run reads every stage's fields
      assert reads.unread(config) == []
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["adapter"]["kind"] == kind
    # the second kind reads its batches from the seqio Mixture of the tasks
    config.userllm.update(eval_base=False, eval_valid=False, input_pipeline="seqio")
  mode, lora = results["mode"], results["lora"]
  assert not any(k.startswith("valid/") or "/base/" in k for k in lora)  # test only
  for task in config.userllm.tasks:
    metric = "recall@10" if task in prompts.TITLE_TASKS else "accuracy"
    for prefix in ("test/model", "valid/model", "test/base", "test/prior"):
      assert 0 <= mode[f"{prefix}/{task}/{metric}"] <= 1
  assert 0 <= mode["test/model/rating/mae"] <= 4
  for r in (mode, lora):  # only the adapters train
    assert r["trainable_parameters"] == r["adapter_parameters"] == r[
        "adapter_parameters_formula"] > 0
  # equal budgets: LoRA's rank is picked to match MoLoRA's (= MoDE's) count
  assert abs(lora["adapter_parameters"] - mode["adapter_parameters"]) <= (
      0.1 * mode["adapter_parameters"])
  assert (tmp_path / "text_prompt_h8_ctx48_mode_r2_e2").is_dir()
  assert (tmp_path / "text_prompt_h8_ctx48_lora_r5").is_dir()
  seqio_losses = [json.loads(line)["loss"] for line in (
      tmp_path / "text_prompt_h8_ctx48_lora_r5" / "metrics.jsonl").read_text().splitlines()]
  assert len(seqio_losses) == 2 and all(np.isfinite(seqio_losses))
  assert list((tmp_path / "tfds").iterdir())  # the data went through tfds
  lm_lines = [json.loads(line) for line in
              (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
  logged = [line["step"] for line in lm_lines if line["split"] == "lm"]
  assert logged == list(range(config.lm_train.log_every, config.lm_train.num_steps + 1,
                              config.lm_train.log_every))  # trained once, reused


def test_multitask_config_errors_name_the_field(tmp_path):
  from configs import multitask
  config = multitask.get_config("tiny")
  config.adapter.kind = "none"
  with pytest.raises(ConfigError, match="config.adapter.kind"):
    run_workflow(config, tmp_path)
  config.adapter.kind = "mode"
  config.userllm.tasks = ("next_title", "horoscope")
  with pytest.raises(ConfigError, match="config.userllm.tasks.*horoscope"):
    run_workflow(config, tmp_path)
  config.userllm.tasks = ("rating",)
  config.adapter.router = "by_mood"
  with pytest.raises(ConfigError, match="config.adapter.router='by_mood'"):
    run_workflow(config, tmp_path)


def test_adapter_benchmark_kinds_may_name_a_router():
  from benchmarks.userllm import adapters as adapter_benchmark
  from configs import multitask
  base = multitask.get_config()
  plain, routed = (adapter_benchmark.config_for(base, k)
                   for k in ("molora", "mode+token_task"))
  assert (plain.adapter.kind, plain.adapter.router) == ("molora", "token")
  assert (routed.adapter.kind, routed.adapter.router) == ("mode", "token_task")
  assert base.adapter.kind == "mode"  # the base config is not changed


def test_adapter_benchmark_table_has_a_row_per_kind_and_baselines(tmp_path):
  from benchmarks.userllm import adapters as adapter_benchmark
  tasks = ("next_title", "rating")
  def result(kind, rank, recall):
    r = {"adapter_rank": rank, "adapter_experts": 1 if kind == "lora" else 4,
         "adapter_parameters": 1000, "train_step_seconds": 0.02,
         "test/model/next_title/recall@10": recall,
         "test/model/rating/accuracy": 0.5, "test/model/rating/mae": 0.6,
         "test/model/all/average": (recall + 0.5) / 2,
         "test/prior/next_title/recall@10": 0.01,
         "test/prior/rating/accuracy": 0.3, "test/prior/all/average": 0.155}
    if kind == "lora":
      r.update({"test/base/next_title/recall@10": 0.02,
                "test/base/rating/accuracy": 0.1, "test/base/all/average": 0.06})
    return r
  rows = adapter_benchmark.rows_from(
      {"lora": result("lora", 18, 0.2), "mode": result("mode", 4, 0.3)})
  assert [r["kind"] for r in rows] == ["lora", "mode", "base (no adapter)", "prior"]
  assert rows[1]["next_title/recall@10"] == 0.3 and rows[1]["experts"] == 4
  assert rows[2]["average"] == 0.06 and rows[3]["rating/accuracy"] == 0.3
  assert not any(k.startswith(("prior/", "base/")) for r in rows for k in r)
  out = str(tmp_path / "table")
  adapter_benchmark.write(out, rows, {"data": "synthetic", "eval_users": 100,
                                      "device": "cpu", "jax": "x", "command": "c",
                                      "tasks": list(tasks)})
  lines = open(out + ".md").read().splitlines()
  assert lines[-4].startswith("| base (no adapter) | - | - | - | - | 0.020 | 0.100 |")
  assert lines[-6].startswith("| lora | 18 | 1 | 1,000 | 20.0 | 0.200 | 0.500 | 0.600")
  # the noisiest rate is the rating accuracy 0.5: sqrt(0.25 / 100) = 0.05
  assert lines[-1].startswith("One binomial standard error over 100 users is at "
                              "most 0.050 (at rate 0.500); gaps under about 0.100")
  assert json.load(open(out + ".json"))["rows"] == rows
