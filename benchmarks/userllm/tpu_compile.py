"""The TPU configs' steps compiled for their TPU slices on this CPU host:
per-chip memory against the chip's HBM, FLOPs, XLA's estimated step time and
the MFU bound it implies, and how the largest arrays are sharded.

  .venv-tpu/bin/python -m benchmarks.userllm.tpu_compile \
      --out benchmarks/results/tpu_compile

(requirements-tpu-aot.txt installs .venv-tpu: jax[tpu] and libtpu beside the
CPU stack). Nothing is materialised: every state and batch is a
`jax.ShapeDtypeStruct` with its sharding, the model a released Gemma
variant's shapes (`config.llm.variant`; the configs' checkpoint and tokenizer
paths are not read) at its vocabulary size (256,128 rows for Gemma 1 and 2,
262,144 for Gemma 3), compiled by libtpu's compiler (`infra/aot.py`).

Steps (what `train_loop.fit` jits, with its in/out shardings and donation):
- `user_llm`: configs/user_llm_gemma_tpu.py's stage 3 (cross-attention
  User-LLM, Gemma frozen, LoRA rank 8 on q/k/v/out, encoder + Perceiver +
  cross-attention blocks trained; `ul.lm_loss` with the auxiliary item loss)
  on MovieLens-100K's catalogue (1,682 items, 19 genres), a history of 200
  events, and `--prompt_tokens` + `--title_tokens` text tokens.
- `rlpf_rl`: configs/rlpf_gemma_tpu.py's RL step (`rlpf.make_rl_step`: 64
  sampled summary tokens per prompt by a KV-cache scan, the predictor's
  scores of the options, the value baseline, the update of policy and value)
  on the state summarize/workflow.py builds (`rl_state_params`): policy,
  reference, predictor and value trunk (four copies of Gemma, the frozen two
  in bfloat16), or with LoRA one bfloat16 base beside the predictor;
  prompts of `summary.prompt_len` = 640 tokens.
- `rlpf_rollout`: the sampling part of that step alone (`rlpf.make_rollout`).

Layouts tried until one fits the chip, each a set of config flags a run
sets to match it:
- `config`: the config's mesh (data x 4 on `model`) with infra/mesh.py's
  plain logical rules, no recomputation and (RLPF) the whole policy; each
  layout sets these switches itself, whatever the config file says (earlier
  runs' `as_built` rows are the workflows before two fixes: RLPF's RL state
  was replicated, User-LLM's item head had 1,683 rows no model axis divides).
- `model_all`: every chip on `model` (`--config.mesh.model=<chips>`, where
  the heads divide).
- `fsdp+remat`: `--config.mesh.fsdp=true` (the parameters' `embed` axis
  over `data` too) and `--config.llm.remat=true` (layers recomputed in the
  backward pass).
- `fsdp+lora<r>+remat` (RLPF): also `--config.rl.lora_rank=<r>`
  (`--rl_lora_rank`): RL trains LoRA adapters over one bfloat16 copy of the
  policy.
The config's batch is tried on every layout before half of it, and so on
down to `--min_batch`: the table gives the largest batch that fits, and the
first layout that holds it (`--config.rl_train.batch_size` /
`--config.train.batch_size` where it is below the config's). A case whose
inputs alone exceed the chip's HBM is refused without compiling; a compile
the compiler itself fails (an internal error, not memory) is compiled again
without libtpu's all-reduce-scatter fusion (`WORKAROUND`), and a row that
does not fit, with its message, if it fails again.

A compile takes minutes, so every row is appended to `--cache` as it is made;
a rerun takes those rows instead of compiling again (`--nocompile`: only
those, the rest listed as not compiled; `--budget_minutes`: start no case
after that long).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import harness, plots
from infra import aot, mesh as mesh_lib, optim, results, train_loop
from summarize import rlpf, workflow as rlpf_workflow
from userllm import builders, language_model, user_llm as ul
from userllm.models import gemma_variants, llm

FLAGS = (
    harness.Flag("slices", list(aot.SLICES), "TPU slices (infra/aot.py SLICES)."),
    harness.Flag("variants", ["gemma_2b", "gemma_7b", "gemma2_2b", "gemma2_9b",
                              "gemma3_4b"], "Released Gemma variants."),
    harness.Flag("steps", ["user_llm", "rlpf_rl", "rlpf_rollout"], "Steps to compile."),
    harness.Flag("prompt_tokens", 8, "User-LLM's task prompt tokens (bos + "
                 "'Next title:' / 'Favourite genre:' in Gemma's vocabulary: ~5)."),
    harness.Flag("title_tokens", 32, "Tokens of the longest answer (a MovieLens "
                 "title with its year + eos: ~10 on average in Gemma's vocabulary)."),
    harness.Flag("rl_lora_rank", 16, "RLPF's layouts after the whole policy's: "
                 "RL as LoRA adapters of this rank over one bfloat16 copy of "
                 "the LM (config.rl.lora_rank); 0: none."),
    harness.Flag("min_batch", 8, "The smallest batch tried before a layout is "
                 "given up."),
    harness.Flag("cache", "runs/tpu_compile/rows.jsonl", "Rows compiled before "
                 "(JSON lines, appended to as rows are compiled): a rerun takes "
                 "them instead of compiling again; empty: none."),
    harness.Flag("compile", True, "Compile the cases the cache lacks (false: "
                 "list them as not compiled)."),
    harness.Flag("budget_minutes", 0.0, "Start no new case after this many "
                 "minutes (0: no limit); later cases are listed as not compiled."),
)

CONFIGS = {"user_llm": "configs.user_llm_gemma_tpu",
           "rlpf_rl": "configs.rlpf_gemma_tpu",
           "rlpf_rollout": "configs.rlpf_gemma_tpu"}
# RLPF's predictor prompt pieces (ids only set the lengths: bos + "Summary:",
# "Next title:" in Gemma's vocabulary) and eos
SUMMARY_HEAD, QUESTION, EOS = (2, 12, 13), (14, 15, 16, 17), 1


@dataclasses.dataclass(frozen=True)
class ItemTable:
  genre_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Catalogue:
  """What `builders.build_model` reads of a data set's timelines."""
  num_items: int
  items: ItemTable


MOVIELENS_100K = Catalogue(1682, ItemTable((
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western")))


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh shape and the logical rules that place parameters on it."""
  name: str
  data: int
  model: int
  rules: tuple = mesh_lib.LOGICAL_RULES
  lora_rank: int = 0  # RLPF: RL trains LoRA adapters of this rank (config.rl.lora_rank)
  remat: bool = False  # config.llm.remat: layers recomputed in the backward pass


_SHAPES: dict = {}


def once(key: tuple, make: Callable):
  """`make()` (abstract shapes: the same for every mesh and batch), traced
  once per key in this process."""
  if key not in _SHAPES:
    _SHAPES[key] = make()
  return _SHAPES[key]


@dataclasses.dataclass(frozen=True)
class Step:
  """A step ready to compile: fn(*args) with its shardings."""
  fn: Callable
  args: tuple
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple = ()


def load_config(step: str, variant: str):
  """The step's TPU config, its LM the released `variant` (no checkpoint)."""
  config = importlib.import_module(CONFIGS[step]).get_config()
  config.llm.update(variant=variant, tokenizer="")
  for field in ("checkpoint", "policy_checkpoint", "predictor_checkpoint"):
    if field in config.llm:
      config.llm[field] = ""
  return config


def batch_spec(mesh, shapes: dict) -> dict:
  """{name: (shape, dtype)} -> abstract arrays with the batch's leading axis
  over `data` (infra/mesh.py batch_sharding)."""
  return aot.with_shardings({k: jax.ShapeDtypeStruct(*v) for k, v in shapes.items()},
                            mesh_lib.batch_sharding(mesh))


def train_step_of(state, state_shardings, batch, mesh, train_step) -> Step:
  """What `train_loop.fit` jits: the guarded step, state donated."""
  return Step(train_loop.guard_step(train_step, False), (state, batch),
              (state_shardings, mesh_lib.batch_sharding(mesh)),
              (state_shardings, None), (0,))


# -- User-LLM


def user_llm_step(config, vocab: int, mesh, layout: Layout, batch: int, args
                  ) -> Step:
  """Stage 3 of configs/user_llm_gemma_tpu.py (userllm/workflow.py: run)."""
  config = with_layout(config, layout)
  u = config.userllm
  model = builders.build_model(config, MOVIELENS_100K, vocab, u.method)
  h, tokens = u.history_len, args.prompt_tokens + args.title_tokens
  genres = len(MOVIELENS_100K.items.genre_names)
  events = {"items": ((batch, h), jnp.int32), "ratings": ((batch, h), jnp.int32),
            "genres": ((batch, h, genres), jnp.float32),
            "titles": ((batch, h, args.title_tokens), jnp.int32),
            "next_item": ((batch,), jnp.int32)}
  text = {k: ((batch, tokens), jnp.int32) for k in ("tokens", "token_mask",
                                                     "target_mask")}
  abstract_batch = {**batch_spec(mesh, text), "events": batch_spec(mesh, events),
                    "task_ids": batch_spec(mesh, {"t": ((batch,), jnp.int32)})["t"]}
  init = lambda rng: model.init(  # noqa: E731
      rng, {k: jnp.zeros((1, h) + v[0][2:], v[1]) for k, v in events.items()
            if k != "next_item"}, jnp.zeros((1, 2), jnp.int32),
      jnp.ones((1, 2), jnp.int32))["params"]
  key = ("user_llm", config.llm.variant, layout.remat)
  mask = ul.trainable_mask(once(key + ("params",), lambda: jax.eval_shape(
      lambda: nn.meta.unbox(init(jax.random.PRNGKey(0))))), u.strategy)
  tx = ul.masked_optimizer(optim.make_optimizer(config.train), mask,
                           u.new_params_lr_scale)
  state, shardings = aot.place_train_state(
      once(key, lambda: aot.boxed_train_state(init, tx)), mesh, layout.rules)
  loss = functools.partial(ul.lm_loss, model, mask, aux_weight=u.aux_item_weight)
  return train_step_of(state, shardings, abstract_batch, mesh,
                       train_loop.make_train_step(loss, tx))


# -- RLPF


def rlpf_models(config, vocab: int):
  """(the RL policy, its value model or None, RLConfig) of the RLPF config
  (summarize/workflow.py rl_models: with config.rl.lora_rank, LoRA)."""
  rl_cfg = rlpf_workflow.rl_config(config, length_target=10.0)
  policy = llm.DecoderLM(language_model.llm_config(config, vocab))
  return (*rlpf_workflow.rl_models(config, policy, rl_cfg), rl_cfg)


def rl_params(config, vocab: int):
  """rng -> the RL state's parameters, boxed with the models' logical axes,
  as summarize/workflow.py reinforce builds them (rl_state_params: the
  warm-ups' LM as policy and predictor, frozen parts in bfloat16)."""
  policy, value, _ = rlpf_models(config, vocab)
  lm = llm.DecoderLM(language_model.llm_config(config, vocab))
  prompt = jnp.zeros((1, 2), jnp.int32)

  def init(rng):
    fresh = lambda model, key, part=lambda p: p: part(model.init(  # noqa: E731
        jax.random.fold_in(rng, key), prompt, prompt > 0)["params"])
    warm = fresh(lm, 1)
    return rlpf_workflow.rl_state_params(policy, value, warm, warm, fresh,
                                         rlpf_workflow.frozen_dtype(config))
  return init


def rl_batch(mesh, config, batch: int, args) -> dict:
  """summarize/examples.py rl_batch's arrays."""
  p, k, t = config.summary.prompt_len, config.rl.num_options, args.title_tokens
  return batch_spec(mesh, {
      "prompt": ((batch, p), jnp.int32), "prompt_mask": ((batch, p), jnp.bool_),
      "options": ((batch, k, t), jnp.int32), "option_mask": ((batch, k, t), jnp.bool_),
      "answer": ((batch,), jnp.int32)})


def with_layout(config, layout: Layout):
  """The config with the layout's switches: llm.remat, mesh.fsdp and RLPF's
  LoRA rank (0: the whole policy)."""
  config = config.copy_and_resolve_references()
  config.llm.remat = layout.remat
  config.mesh.fsdp = layout.rules == mesh_lib.FSDP_RULES
  if "rl" in config:
    config.rl.lora_rank = layout.lora_rank
  return config


def rl_state(config, vocab: int, mesh, layout: Layout):
  """(abstract RL state, shardings, tx)."""
  init = rl_params(config, vocab)
  key = ("rlpf", config.llm.variant, layout.lora_rank, layout.remat)
  labels = once(key + ("params",),
                lambda: jax.eval_shape(lambda: init(jax.random.PRNGKey(0))))
  tx = rlpf.rl_optimizer(optim.make_optimizer(config.rl_train), labels)
  state, shardings = aot.place_train_state(
      once(key, lambda: aot.boxed_train_state(init, tx)), mesh, layout.rules)
  return state, shardings, tx


def prompt_ids(config) -> dict:
  """summarize/workflow.py rl_prompt_ids, with ids of Gemma's lengths."""
  return dict(head_ids=SUMMARY_HEAD, question_ids=QUESTION, eos_id=EOS,
              bare_question_ids=((SUMMARY_HEAD[0],) + QUESTION
                                 if config.predictor.calibrate else None))


def rlpf_rl_step(config, vocab: int, mesh, layout: Layout, batch: int, args
                 ) -> Step:
  """configs/rlpf_gemma_tpu.py's RL step."""
  config = with_layout(config, layout)
  policy, value, rl_cfg = rlpf_models(config, vocab)
  state, shardings, tx = rl_state(config, vocab, mesh, layout)
  predictor = llm.DecoderLM(language_model.llm_config(config, vocab))
  step = rlpf.make_rl_step(policy, value, predictor, tx, rl_cfg,
                           **prompt_ids(config))
  return train_step_of(state, shardings, rl_batch(mesh, config, batch, args), mesh,
                       step)


def rlpf_rollout_step(config, vocab: int, mesh, layout: Layout, batch: int,
                      args) -> Step:
  """The RL step's sampling and scoring alone (rlpf.make_rollout), from the
  RL state's policy parts (rlpf.rl_views) and predictor."""
  config = with_layout(config, layout)
  policy, _, rl_cfg = rlpf_models(config, vocab)
  state, shardings, _ = rl_state(config, vocab, mesh, layout)
  predictor = llm.DecoderLM(language_model.llm_config(config, vocab))
  rollout = rlpf.make_rollout(policy, predictor, rl_cfg, **prompt_ids(config))
  used = [k for k in ("policy", "base", "predictor") if k in state.params]

  def sample(params, batch, rng):
    policy_params = params["policy"]  # the whole policy, or LoRA's adapters
    if "base" in params:  # over the frozen base
      policy_params = rlpf.rl_views({"policy": policy_params},
                                    {"base": params["base"]})[0]
    return rollout({"policy": policy_params, "predictor": params["predictor"]},
                   batch, rng)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32,
                             sharding=NamedSharding(mesh, P()))
  return Step(sample, ({k: state.params[k] for k in used},
                       rl_batch(mesh, config, batch, args), rng),
              ({k: shardings.params[k] for k in used},
               mesh_lib.batch_sharding(mesh), NamedSharding(mesh, P())), None)


BUILDERS = {"user_llm": user_llm_step, "rlpf_rl": rlpf_rl_step,
            "rlpf_rollout": rlpf_rollout_step}


def config_batch(step: str, config) -> int:
  return config.train.batch_size if step == "user_llm" else config.rl_train.batch_size


# -- the search


def layouts(step: str, config, variant: str, chips: int, lora_rank: int
            ) -> list[Layout]:
  """The layouts to try, in order (module docstring)."""
  model = config.mesh.model
  data = chips // model
  found = [Layout("config", data, model)]
  if chips != model and gemma_variants.get(variant).num_heads % chips == 0:
    found.append(Layout("model_all", 1, chips))
  found.append(Layout("fsdp+remat", data, model, mesh_lib.FSDP_RULES, remat=True))
  if step != "user_llm" and lora_rank:
    found.append(Layout(f"fsdp+lora{lora_rank}+remat", data, model,
                        mesh_lib.FSDP_RULES, lora_rank=lora_rank, remat=True))
  return found


def batches(first: int, smallest: int) -> list[int]:
  """The config's batch, halved down to the smallest tried."""
  found = [first]
  while found[-1] // 2 >= smallest:
    found.append(found[-1] // 2)
  return found


# libtpu 0.0.42's all-reduce-scatter fusion fails a RET_CHECK on some FSDP
# steps (a dynamic slice of the option scores' logits, all-reduced over
# `data`, replaced by a fusion of another shape); a case it fails is
# compiled again without that fusion, which a run sets the same way:
# LIBTPU_INIT_ARGS=--xla_tpu_enable_all_reduce_scatter_fusion=false
WORKAROUND = {"xla_tpu_enable_all_reduce_scatter_fusion": False}


def try_one(step: str, config, vocab: int, devices, layout: Layout, batch: int,
            args, chip: aot.Chip) -> dict | None:
  """Builds and compiles one (layout, batch); a row of the table. None when
  it would need the compiler and `args.compile` is false."""
  mesh = aot.slice_mesh(devices, layout.data, layout.model)
  row = {"layout": layout.name, "mesh": f"{layout.data}x{layout.model}",
         "batch": batch}
  try:
    built = BUILDERS[step](config, vocab, mesh, layout, batch, args)
  except ValueError as e:  # jax's IndivisibleError: a dimension the mesh cannot split
    return {**row, "fits": False, "why": str(e).splitlines()[0][:300]}
  args_bytes = sum(aot.chip_bytes(x) for x in jax.tree.leaves(built.args))
  state_bytes = sum(aot.chip_bytes(x) for x in jax.tree.leaves(built.args[0]))
  row.update(argument_gib=args_bytes / aot.GiB, state_gib=state_bytes / aot.GiB,
             largest=aot.largest_arrays(built.args[0], 3))
  if args_bytes > chip.hbm_bytes:  # no need to ask the compiler
    return {**row, "fits": False, "why": f"the inputs alone take "
            f"{args_bytes / aot.GiB:.1f} GiB of a chip's "
            f"{chip.hbm_bytes / aot.GiB:.0f} GiB"}
  if not args.compile:
    return None
  began = time.perf_counter()
  for options in (None, WORKAROUND):
    try:
      report = aot.compile_step(built.fn, built.args, built.in_shardings,
                                built.out_shardings, built.donate_argnums, options)
      break
    except aot.DoesNotFit as e:
      return {**row, "fits": False, "why": str(e), "compiled": True,
              "compiler_options": options,
              "compile_seconds": time.perf_counter() - began}
    except Exception as e:  # the compiler's own failure (libtpu's RET_CHECKs)
      if "RET_CHECK" not in str(e) and "INTERNAL" not in str(e):
        raise
      if options is not None:
        return {**row, "fits": False, "compiled": True, "compiler_options": options,
                "why": "compiler error: " + str(e).strip().splitlines()[0][:240],
                "compile_seconds": time.perf_counter() - began}
  return {**row, "compiled": True, "compiler_options": options,
          **report_fields(report, chip, len(devices))}


def report_fields(report: aot.CompileReport, chip: aot.Chip, chips: int) -> dict:
  peak = report.peak_bytes
  seconds, source = report.step_seconds(chip)
  return {"fits": peak <= chip.hbm_bytes, "why": "" if peak <= chip.hbm_bytes else
          "the compiled program's peak exceeds the chip's HBM",
          "peak_gib": peak / aot.GiB, "hbm_gib": chip.hbm_bytes / aot.GiB,
          "argument_gib": report.argument_bytes / aot.GiB,
          "temp_gib": report.temp_bytes / aot.GiB,
          "output_gib": report.output_bytes / aot.GiB,
          "alias_gib": report.alias_bytes / aot.GiB,
          "code_mib": report.code_bytes / 2 ** 20,
          "tflops_per_chip": report.flops / 1e12,
          "tflops_step": report.flops * chips / 1e12,
          "gb_accessed_per_chip": report.bytes_accessed / 1e9,
          "xla_optimal_seconds": report.optimal_seconds,
          "step_seconds": seconds, "step_seconds_from": source,
          "mfu_bound": report.mfu_bound(chip),
          "compile_seconds": report.compile_seconds}


def search(step: str, variant: str, slice_name: str, args, cached: dict
           ) -> tuple[list[dict], bool]:
  """Every (layout, batch) tried for one step x variant x slice, in order,
  until one fits (the `config` row first: it is what the workflow runs).
  Rows in `cached` (same key) are taken from there instead of compiled
  again. Returns (the rows, whether the search ended: a fit or every case
  tried; not when a case needed the compiler and --nocompile)."""
  s = aot.SLICES[slice_name]
  devices = aot.topology_devices(slice_name)
  config = load_config(step, variant)
  vocab = gemma_variants.get(variant).vocab_size
  tried, too_big = [], set()
  candidates = layouts(step, config, variant, len(devices), args.rl_lora_rank)
  # the config's batch on every layout before a smaller one: a run keeps
  # its batch if any layout holds it
  for batch in batches(config_batch(step, config), args.min_batch):
    for layout in candidates:
      if layout.name in too_big or batch % layout.data:
        continue
      key = row_key(step, variant, slice_name, layout.name, batch, args)
      row = cached.get(key)
      if args.compile and row is not None and row.get(
          "why", "").startswith("compiler error") and "compiler_options" not in row:
        row = None  # failed before the workaround was tried: try again
      if row is None:
        found = try_one(step, config, vocab, devices, layout, batch, args, s.spec)
        if found is None:
          return tried, False  # not compiled (--nocompile)
        row = {"key": key, "step": step, "variant": variant, "slice": slice_name,
               **found}
        remember(args.cache, row)
      tried.append(row)
      print({k: v for k, v in row.items() if k not in ("largest", "key")},
            flush=True)
      if row["fits"]:
        return tried, True
      if row.get("state_gib", 0) > s.spec.hbm_bytes / aot.GiB:
        too_big.add(layout.name)  # a smaller batch leaves the state as large
  return tried, True


# RLPF's RL state as the workflow builds it: v2 holds frozen weights in bfloat16
RL_STATE = "v2"


def row_key(step, variant, slice_name, layout, batch, args) -> str:
  """What a row depends on (the cache's key)."""
  state = f"/{RL_STATE}" if step.startswith("rlpf") else ""
  return (f"{step}/{variant}/{slice_name}/{layout}/b{batch}/p{args.prompt_tokens}"
          f"/t{args.title_tokens}{state}")


def recall(path: str) -> dict:
  """{key: row} of the rows compiled before (`--cache`, JSON lines)."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {row["key"]: row for row in rows}


def remember(path: str, row: dict) -> None:
  if path:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
      f.write(json.dumps(row) + "\n")


def measure(run: harness.Run) -> dict:
  args = run.args
  cached = recall(args.cache)
  rows, skipped, pending = [], [], []
  began = time.monotonic()
  for slice_name in args.slices:
    try:
      aot.topology_devices(slice_name)
    except ValueError as e:
      skipped.append(str(e))
      continue
    for variant in args.variants:
      for step in args.steps:
        spent = (time.monotonic() - began) / 60
        if args.budget_minutes and spent > args.budget_minutes:
          pending.append(f"{step} {variant} {slice_name}")
          continue
        found, ended = search(step, variant, slice_name, args, cached)
        rows += found
        if not ended:
          pending.append(f"{step} {variant} {slice_name}")
  return {"meta": {"jax": jax.__version__, "libtpu": libtpu_version(),
                   "prompt_tokens": args.prompt_tokens,
                   "title_tokens": args.title_tokens, "min_batch": args.min_batch,
                   "compiled_here": args.compile, "cache": args.cache,
                   "chips": {k: dataclasses.asdict(v) for k, v in aot.CHIPS.items()},
                   "slices": {k: dataclasses.asdict(v) for k, v in aot.SLICES.items()}},
          "rows": rows, "skipped_slices": skipped, "not_compiled": pending}


def libtpu_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "absent"


# -- the table


def chosen_rows(rows: list[dict]) -> list[dict]:
  """Per step x variant x slice: the row that fits (or the last tried)."""
  last = {}
  for row in rows:
    case = (row["step"], row["variant"], row["slice"])
    if case not in last or not last[case]["fits"]:
      last[case] = row
  return list(last.values())


def spec_summary(row: dict) -> str:
  return "; ".join(f"{a['path'].removeprefix('params/')} {tuple(a['shape'])} "
                   f"{a['spec']}"
                   for a in row.get("largest", [])[:2])


def gib(value) -> str:
  return "-" if value is None else f"{value:.1f}"


def memory_cell(row: dict) -> str:
  """"peak / HBM" GiB, or what is known of a step that did not fit."""
  hbm = aot.SLICES[row["slice"]].spec.hbm_bytes / aot.GiB
  if row.get("peak_gib") is not None:
    return f"{row['peak_gib']:.1f} / {hbm:.0f}"
  if row.get("compiled"):
    return f"out of memory / {hbm:.0f}"
  if row.get("argument_gib") is not None:
    return f"inputs {row['argument_gib']:.1f} / {hbm:.0f}"
  return f"- / {hbm:.0f}"


def present(payload: dict):
  rows = payload["rows"]
  meta = payload["meta"]
  lines = [
      "Each TPU config's step compiled by libtpu "
      f"{meta['libtpu']} (jax {meta['jax']}) for a slice on a CPU host, from "
      "abstract Gemma shapes (no weights, no data). Per chip: the compiled "
      "program's peak memory (arguments + outputs + temporaries - donated + "
      "code) against the chip's HBM, this chip's share of XLA's FLOPs, the "
      "estimated step time and the MFU bound it implies (FLOPs / (time x peak "
      "bf16 FLOP/s)). The step time is XLA's `optimal_seconds` where libtpu "
      "gives a positive one, else (`roofline`) max(FLOPs / peak, bytes accessed "
      "/ HBM bandwidth) of XLA's own counts: an estimate, not a measurement, and "
      "a bound that ignores collectives and idle time. TFLOPs/step: the whole "
      "slice's. Layouts: docs in benchmarks/userllm/tpu_compile.py (`config` "
      "is what the workflows build).", ""]
  if not meta.get("compiled_here", True):
    lines += [f"Written with `--nocompile` from the rows earlier runs of this "
              f"command compiled into `{meta['cache']}` (each row's compile "
              "time in the last column; the other rows take seconds).", ""]
  pending = set(payload.get("not_compiled", []))
  cells = []
  for r in chosen_rows(rows):
    if f"{r['step']} {r['variant']} {r['slice']}" in pending:
      cells.append([r["step"], r["variant"], r["slice"], "-", "-", "-",
                    "not compiled"] + ["-"] * 6)
      continue
    cells.append([r["step"], r["variant"], r["slice"], r["layout"], r["mesh"],
                  r["batch"], "yes" if r["fits"] else "**no**",
                  memory_cell(r),
                  gib(r.get("tflops_step")),
                  "-" if r.get("step_seconds") is None else
                  f"{r['step_seconds'] * 1e3:,.0f} ({r['step_seconds_from']})",
                  "-" if r.get("mfu_bound") is None else f"{r['mfu_bound']:.0%}",
                  spec_summary(r),
                  "-" if r.get("compile_seconds") is None else
                  f"{r['compile_seconds']:.0f}"])
  lines += results.markdown_table(
      ["step", "variant", "slice", "layout", "mesh", "batch", "fits",
       "peak GiB / HBM", "TFLOPs/step", "step ms (source)", "MFU bound",
       "largest arrays: shape, sharding", "compile s"], cells)
  refused = [r for r in rows if not r["fits"]]
  if refused:
    lines += ["", "Tried and did not fit (in the order tried):", ""]
    lines += [f"- {r['step']} {r['variant']} {r['slice']} {r['layout']} "
              f"{r['mesh']} batch {r['batch']}: {r['why']}" for r in refused]
  if payload.get("not_compiled"):
    lines += ["", "Not compiled (the search stopped before a layout that fits "
              "or the last one; the rows tried are above): "
              + "; ".join(payload["not_compiled"]) + "."]
  if payload.get("skipped_slices"):
    lines += ["", "Slices libtpu did not describe: "
              + "; ".join(payload["skipped_slices"])]
  return lines, plot(chosen_rows(rows))


def plot(rows: list[dict]):
  fitted = [r for r in rows if r.get("peak_gib") is not None]
  fig, (ax,) = plots.panels(1, width=9.0, height=4.2)
  labels = [f"{r['step']}\n{r['variant']}\n{r['slice']}" for r in fitted]
  ax.bar(range(len(fitted)), [r["peak_gib"] for r in fitted],
         color=["C0" if r["fits"] else "C3" for r in fitted])
  ax.scatter(range(len(fitted)), [r["hbm_gib"] for r in fitted], marker="_",
             s=300, color="k", label="chip HBM")
  ax.set_xticks(range(len(fitted)), labels, fontsize=5, rotation=90)
  ax.set(ylabel="peak GiB per chip (compiled)")
  ax.legend(fontsize=8)
  return fig


EXPERIMENT = harness.Experiment(measure, present, flags=FLAGS)

if __name__ == "__main__":
  harness.main(EXPERIMENT)
