"""Provenance of the benchmarks' artifacts (benchmarks/results/): every
artifact the README or docs cite exists; every artifact's JSON records the
command that made it, naming a benchmark module that exists today, whose
flags parse and whose `--out` is the artifact itself; and the harness writes
that record (command, commit, device, date, which split chose what)."""

import importlib
import json
import pathlib
import re
import shlex

import numpy as np
import pytest

from benchmarks import harness

ROOT = pathlib.Path(__file__).parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# a cited path under benchmarks/: `x.md`, `x.png`, `x.{json,md,png}`, `x.py`
CITED = re.compile(r"(benchmarks/[\w./-]+?)\.(\{[a-z,]+\}|json|md|png|py)\b")


def documents() -> list[pathlib.Path]:
  """README.md and the docs/ pages."""
  return [d for d in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("**/*.md"))
          if d.exists()]


def cited_paths() -> list[tuple[str, str]]:
  """(document, path) of every benchmarks/ file README.md and docs/ cite."""
  out = []
  for document in documents():
    for stem, extension in CITED.findall(document.read_text()):
      for ext in extension.strip("{}").split(","):
        out.append((str(document.relative_to(ROOT)), f"{stem}.{ext}"))
  return sorted(set(out))


def artifacts() -> list[pathlib.Path]:
  return sorted(RESULTS.glob("*.json"))


def test_every_cited_benchmark_file_exists_and_is_not_stale():
  missing = [f"{doc} cites {path}" for doc, path in cited_paths()
             if not (ROOT / path).exists()]
  assert not missing, "\n".join(missing)
  stale = []
  for doc, path in cited_paths():
    record = (ROOT / path).with_suffix(".json")
    if path.startswith("benchmarks/results/") and record.exists():
      payload = json.loads(record.read_text())
      if "stale" in payload:
        stale.append(f"{doc} cites {path}: {payload['stale']['why']}; regenerate "
                     f"with `{payload['stale']['regenerate']}`")
  assert not stale, "\n".join(stale)


def test_every_benchmark_module_the_docs_run_exists():
  import importlib.util
  quoted = {(str(d.relative_to(ROOT)), m.rstrip(".")) for d in documents()
            for m in re.findall(r"python -m (benchmarks[\w.]*)", d.read_text())}
  missing = [f"{doc}: python -m {module}" for doc, module in sorted(quoted)
             if importlib.util.find_spec(module) is None]
  assert not missing, "\n".join(missing)


def test_every_output_has_its_json_and_markdown():
  stems = {p.stem for p in RESULTS.iterdir() if p.suffix in (".json", ".md", ".png")}
  for stem in stems:
    assert (RESULTS / f"{stem}.json").exists(), f"{stem}: an output without its JSON"
    assert (RESULTS / f"{stem}.md").exists(), f"{stem}: an output without its markdown"


@pytest.mark.parametrize("path", artifacts(), ids=lambda p: p.stem)
def test_an_artifacts_command_names_a_module_whose_flags_parse(path, monkeypatch):
  """The recorded command (or, for an artifact marked stale, the command that
  regenerates it) runs a benchmark module of today's tree: its flags parse
  (config files and `--config.*` overrides included), and it writes here."""
  payload = json.loads(path.read_text())
  assert payload.get("command"), f"{path.name}: no command recorded"
  command = payload["command"]
  if "stale" in payload:
    assert payload["stale"]["why"], f"{path.name}: stale without a reason"
    command = payload["stale"]["regenerate"]
  words = shlex.split(command)
  assert words[:2] == ["python", "-m"], f"{path.name}: {command}"
  module_name = words[2]
  assert module_name.startswith("benchmarks."), f"{path.name}: {command}"
  module = importlib.import_module(module_name)  # the module exists
  monkeypatch.chdir(ROOT)  # config paths are relative to the repository
  run = harness.parse(module.EXPERIMENT, module_name, words[2:])
  assert run.out == f"benchmarks/results/{path.stem}", (
      f"{path.name}: its command writes {run.out}")


def test_every_plot_is_at_most_two_panels_wide():
  """A committed figure reads at screen width: at most two panels a row
  (plots.panels), about 1,500 pixels at 120 dpi."""
  from PIL import Image
  wide = [f"{p.name}: {Image.open(p).size[0]} px" for p in sorted(RESULTS.glob("*.png"))
          if Image.open(p).size[0] > 1500]
  assert not wide, wide


def _toy(choose: bool):
  """A benchmark of two candidate settings, scored on valid and test users."""
  def measure(run):
    rows = []
    if choose:
      chosen, test = run.choose("row", "lr", "valid accuracy", {
          0.1: harness.Scored(0.3, {"accuracy": 0.9}),   # best on test: not chosen
          0.01: harness.Scored(0.5, {"accuracy": 0.4})})
      rows.append({"lr": chosen, **test})
    return {"rows": rows, "scale": run.args.scale}

  def present(payload):
    return [f"| rows | {len(payload['rows'])} |"], None
  return harness.Experiment(measure, present, flags=(harness.Flag("scale", 2.0, "x"),))


def test_the_harness_records_the_command_and_chooses_on_validation_users(tmp_path):
  out = str(tmp_path / "toy")
  run = harness.parse(_toy(True), "benchmarks.toy",
                      ["benchmarks.toy", "--out", out, "--scale=3"])
  harness.execute(_toy(True), run, "python -m benchmarks.toy --out x --scale=3")
  payload = json.load(open(out + ".json"))
  assert payload["command"] == "python -m benchmarks.toy --out x --scale=3"
  assert payload["commit"] and payload["device"] and payload["date"]
  assert payload["scale"] == 3.0
  # chosen on validation users, and only the chosen candidate's test figure kept
  assert payload["selected_on"] == "valid"
  assert payload["selection"]["row"]["chosen"] == 0.01
  assert payload["selection"]["row"]["valid"] == {"0.1": 0.3, "0.01": 0.5}
  assert payload["rows"] == [{"lr": 0.01, "accuracy": 0.4}]
  markdown = open(out + ".md").read()
  assert "`python -m benchmarks.toy --out x --scale=3`" in markdown
  assert "row: lr = 0.01" in markdown
  # --render re-writes the markdown from the JSON alone
  open(out + ".md", "w").write("old")
  render = harness.parse(_toy(True), "benchmarks.toy",
                         ["benchmarks.toy", "--out", out, "--render"])
  harness.execute(_toy(True), render, "ignored")
  assert "`python -m benchmarks.toy --out x --scale=3`" in open(out + ".md").read()


def test_a_benchmark_that_chooses_nothing_says_so(tmp_path):
  out = str(tmp_path / "plain")
  run = harness.parse(_toy(False), "benchmarks.toy", ["benchmarks.toy", "--out", out])
  payload = harness.execute(_toy(False), run, "python -m benchmarks.toy")
  assert payload["selected_on"] is None and payload["selection"] == {}


def test_a_benchmarks_own_flag_may_not_shadow_a_shared_one():
  clash = harness.Experiment(lambda run: {}, lambda p: ([], None),
                             flags=(harness.Flag("out", "", "x"),))
  with pytest.raises(ValueError, match="--out is a shared flag"):
    harness.parse(clash, "benchmarks.clash", ["benchmarks.clash"])


def test_the_user_halves_are_fixed_per_user_and_seed():
  ids = np.arange(400)
  valid, test = harness.user_halves(ids, seed=3)
  assert np.all(valid ^ test) and 150 < valid.sum() < 250
  shuffled = np.random.default_rng(0).permutation(ids)
  again, _ = harness.user_halves(shuffled, seed=3)  # the order does not matter
  np.testing.assert_array_equal(again, valid[shuffled])
  subset, _ = harness.user_halves(ids[:50], seed=3)  # nor which users are scored
  np.testing.assert_array_equal(subset, valid[:50])
  other, _ = harness.user_halves(ids, seed=4)
  assert not np.array_equal(other, valid)


def test_a_tie_on_validation_keeps_the_first_candidate_and_nan_is_refused():
  run = harness.Run(args=None)
  chosen, _ = run.choose("r", "f", "m", {"a": harness.Scored(0.5, 1),
                                         "b": harness.Scored(0.5, 2)})
  assert chosen == "a"
  with pytest.raises(FloatingPointError, match="r: a validation score of f"):
    run.choose("r", "f", "m", {"a": harness.Scored(float("nan"), 1)})
