"""Workflow `rlpf`: user summaries trained by prediction feedback (RLPF, arXiv
2409.04421), scored with UserSumBench's metrics (arXiv 2408.16966) beside the
baselines, as named stages (each a `train_loop.fit` run in its own
sub-directory of the workdir, resumable on its own):

1. `policy`: the initial policy. A from-scratch LM has no zero-shot summaries,
   so it is warmed up on programmatic summaries (summarize/texts.py) of the
   training users' histories, in random styles, and on merging chunk
   summaries (for the time-hierarchical summarizer). With
   `config.llm.policy_checkpoint` (a Gemma checkpoint) the warm-up starts there.
   Its valid metrics: how faithfully its summaries copy titles.
2. `predictor`: the frozen predictor, trained here to answer the questions
   (next title, favourite genre, rating) from programmatic summaries, from
   parts of the history as text, or from nothing, as it is asked at test: the
   true answer among options, chosen by likelihood (`rlpf.predictor_loss`). It never sees a policy's
   summary, and never trains again after this stage.
3. `rlpf`: RL of the policy against the predictor (summarize/rlpf.py), the
   reward's length target L measured from the initial policy first.
4. the table on held-out test users (summarize/table.py): one row per
   context, every probe scored by the same frozen predictor, written as
   results (`test/<row>/<task>/<metric>`) and `<workdir>/table.md`.

Modes on a finished workdir (main.py --mode, docs/using.md): `evaluate`
(every stage restored, none trained, the table again), `summarize` (the RL
policy's summary of given users' histories beside the initial policy's) and
`export` (the RL policy in the released Gemma layout).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from data import sources
from data import timelines as tl
from data.sequences import EpochBatcher
from data.vocab import Tokenizer
from infra import optim, stages, train_loop
from infra.errors import ConfigError
from summarize import evaluation, examples as ex, rlpf, table, texts
from summarize.corpus import Corpus
from summarize.summarizer import Summarizer
from userllm import language_model, use
from userllm import export as export_lib
from userllm.models import adapters, llm

# Each stage's schedule (config section) and the config values it depends on
# (stored with its checkpoints); RL depends on everything.
STAGES = {
    "policy": stages.Stage("policy_train", ("seed", "data", "llm", "summary",
                                            "policy_style", "policy_train")),
    "predictor": stages.Stage("predictor_train", (
        "seed", "data", "llm", "summary", "predictor.contexts",
        "predictor.choice_weight", "predictor.history_lm_weight",
        "predictor_train", "rl.num_options", "rl.distractors")),
    "rlpf": stages.Stage("rl_train")}


def check(config) -> None:
  """One-line errors for values that would fail hours in."""
  for field in ("policy_train", "predictor_train", "rl_train"):
    train_loop.check_schedule(config[field], f"config.{field}")
  try:
    rl_config(config, 0.0)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if config.rl.distractors not in ex.DISTRACTORS:
    raise ConfigError(f"config.rl.distractors={config.rl.distractors!r} is not one "
                      f"of {ex.DISTRACTORS}")
  if config.rl.lora_rank < 0:
    raise ConfigError(f"config.rl.lora_rank={config.rl.lora_rank} must be >= 0 "
                      "(0: the whole policy trains)")
  if config.rl.lora_alpha <= 0:
    raise ConfigError(f"config.rl.lora_alpha={config.rl.lora_alpha} must be > 0 "
                      "(the adapters' scale alpha / rank)")
  if config.rl.num_options < 2:
    raise ConfigError(f"config.rl.num_options={config.rl.num_options} must be >= 2")
  unknown = set(config.predictor.contexts) - set(ex.CONTEXTS)
  if unknown:
    raise ConfigError(f"config.predictor.contexts: {sorted(unknown)} not in "
                      f"{ex.CONTEXTS}")


def rl_config(config, length_target: float) -> rlpf.RLConfig:
  r = config.rl
  return rlpf.RLConfig(
      summary_len=config.summary.max_len, group_size=r.group_size,
      temperature=r.temperature, baseline=r.baseline, kl_coef=r.kl_coef,
      value_coef=r.value_coef, length_weight=r.length_weight,
      length_cap=r.length_cap, length_beta=r.length_beta,
      length_target=length_target, truncated=r.truncated,
      reward=r.reward).validate()


def tokenizer_for(config, workdir: str, timelines) -> Tokenizer:
  """`config.llm.tokenizer` (Gemma's), or one trained on the catalogue's text
  (language_model.tokenizer; the RLPF configs train BPE: whole words make
  shorter histories), every catalogue title one piece when
  `config.data.title_pieces`."""
  return language_model.tokenizer(
      config, workdir, lambda: texts.vocabulary_corpus(timelines.items),
      titles=[str(t) for t in timelines.items.titles[1:]])


def epoch_batches(make_batch, cuts: ex.Cuts, batch_size: int, seed: int):
  """step -> make_batch(rows, rng) of that step (a pure function of the step)."""
  rows = EpochBatcher(np.arange(len(cuts)), batch_size, seed)
  return lambda step: make_batch(rows(step), np.random.default_rng([seed, step]))


def warm_up(name: str, config, checkpoint: str, model_cfg, batches, loss_fn,
            mesh, workdir: str, valid_fn=None):
  """Stage `name` (STAGES: the policy or the predictor): `loss_fn(model,
  params, batch, rng)` training of a DecoderLM on `batches`, from scratch or
  from a Gemma `checkpoint`, with `valid_fn(model, params) -> {key: value}`
  every eval_every steps when given. Returns (model, host parameters)."""
  stage = STAGES[name]
  use.require_finished(f"{workdir}/{name}", config[stage.field], name,
                       f"config.{stage.field}")
  pretrained = None
  if checkpoint:  # logits over the tokenizer's pieces only
    base, pretrained = language_model.pretrained(config, checkpoint, mesh,
                                                 model_cfg.vocab_size)
    model_cfg = dataclasses.replace(base, dtype=model_cfg.dtype,
                                    remat=model_cfg.remat)
  model = llm.DecoderLM(model_cfg)
  tx = optim.make_optimizer(config[stage.field])
  sample = batches(0)
  tokens = sample["tokens" if "tokens" in sample else "prompt"][:1]
  init = lambda rng: model.init(rng, tokens, tokens > 0)["params"]  # noqa: E731
  state, shardings = train_loop.create_state(init, tx, jax.random.PRNGKey(config.seed),
                                             mesh)
  if pretrained is not None:
    state = language_model.load_into(state, shardings, pretrained)
  state = stages.fit(
      stage, name, config, state=state, shardings=shardings,
      train_step=train_loop.make_train_step(functools.partial(loss_fn, model), tx),
      batches=batches, mesh=mesh, workdir=workdir,
      eval_fn=valid_fn and (lambda s: valid_fn(model, s.params)))
  return model, jax.device_get(state.params)


def policy_valid_fn(config, corpus: Corpus, cuts: ex.Cuts):
  """(model, params) -> how faithfully the valid users' summaries copy titles
  from their histories, greedy and sampled at the RL temperature
  (evaluation.title_fidelity): RL learns from the sampled ones, so a policy
  whose sampled titles are wrong leaves RL no facts to choose between."""
  def valid(model, params):
    writer = Summarizer(model, params, corpus, config.eval.batch_size)
    prompts_ = [corpus.policy_prompt(int(u), int(c))
                for u, c in zip(cuts.users, cuts.cuts)]
    out = {}
    for name, temperature in (("greedy", 0.0), ("sampled", config.rl.temperature)):
      written = corpus.decode_summaries(writer.write(prompts_, temperature,
                                                     seed=config.seed + 9))
      out.update({f"{name}_{k}": v for k, v in
                  evaluation.title_fidelity(corpus, cuts, written).items()})
    return out
  return valid


def predictor_valid_fn(config, corpus: Corpus, cuts: ex.Cuts, probes):
  """(model, params) -> the valid users' next-title accuracy read from no
  context, from the whole history and from a programmatic summary ("likes" two
  genres + "recent" two titles): whether the predictor has learnt to read a
  context yet, over its warm-up (the most any summary can buy through it)."""
  histories = [corpus.history(int(u), int(c)) for u, c in zip(cuts.users, cuts.cuts)]
  style, rng = texts.Style(genres=2, rating=False, recent=2, saw=0), np.random.default_rng(0)
  summaries = [texts.programmatic_summary(corpus.items, texts.facts(corpus.items, *h),
                                          style, rng) for h in histories]
  contexts = {"none": [[] for _ in histories],
              "full_history": [corpus.history_ids(*h) for h in histories],
              "summary": [corpus.summary_context(corpus.summary_ids(t)[:-1])
                          for t in summaries]}

  def valid(model, params):
    scorer = evaluation.Predictor(model, params, corpus, config.eval.batch_size,
                                  config.predictor.calibrate)
    return {f"next_title_from_{name}": evaluation.score_contexts(
        scorer, probes, context, config.rl.num_options,
        next_title_only=True)["next_title"] for name, context in contexts.items()}
  return valid


def length_target(summarizer: Summarizer, corpus: Corpus,
                  cuts: ex.Cuts, count: int, temperature: float, seed: int) -> float:
  """L: the initial policy's mean summary tokens (eos excluded), sampled at the
  RL temperature on `count` training cuts."""
  rows = np.random.default_rng(seed).choice(len(cuts), min(count, len(cuts)),
                                            replace=False)
  prompts_ = [corpus.policy_prompt(int(cuts.users[r]), int(cuts.cuts[r]))
              for r in rows]
  ids = summarizer.write(prompts_, temperature=temperature, seed=seed)
  _, body, _ = rlpf.summary_masks(ids, corpus.eos)
  return float(np.asarray(body).sum(1).mean())


def rl_prompt_ids(config, corpus: Corpus) -> dict:
  """The token ids of rlpf.make_rollout's predictor prompts (and eos)."""
  question = corpus.question("next_title")
  return dict(head_ids=corpus.bos + corpus.summary_head, question_ids=question,
              eos_id=corpus.eos, bare_question_ids=(corpus.bos + question
                                                    if config.predictor.calibrate
                                                    else None))


def reinforce(config, policy, policy_params, predictor, predictor_params,
              corpus: Corpus, cuts: ex.Cuts, target: float, valid_fn, mesh,
              workdir: str):
  """Stage 3: the policy after RL (host parameters)."""
  train = config.rl_train
  use.require_finished(f"{workdir}/rlpf", train, "rlpf", "config.rl_train")
  cfg = rl_config(config, target)
  sample = corpus.pad_prompts([corpus.policy_prompt(int(cuts.users[0]),
                                                    int(cuts.cuts[0]))],
                              corpus.prompt_len)

  def fresh(model, key, part=lambda p: p):
    # `part` of fresh parameters, in one jitted init: the parts not kept (a
    # LoRA policy's base) are never materialised; config.rl.seed redraws them
    rng = jax.random.fold_in(jax.random.PRNGKey(key), config.rl.seed)
    return jax.jit(lambda: part(model.init(rng, *sample)["params"]))()

  def axes(model, key=0, part=lambda p: p):  # logical axes, from an abstract init
    return jax.eval_shape(lambda: part(model.init(jax.random.PRNGKey(key), *sample)[
        "params"]))
  rl_policy, value_model = rl_models(config, policy, cfg)
  params = rl_state_params(rl_policy, value_model, policy_params, predictor_params,
                           fresh, frozen_dtype(config))
  boxed = rl_state_params(rl_policy, value_model, axes(policy), axes(predictor),
                          axes)
  tx = rlpf.rl_optimizer(optim.make_optimizer(train), params)
  # config.rl.seed repeats RL alone on the same warm-ups (0: the run's own)
  rl_seed = config.seed + 3 + 7919 * config.rl.seed
  # with LoRA the adapters folded into the base (jitted: the base stays on
  # the mesh); the whole policy is returned as it is, without a copy
  fold = jax.jit(functools.partial(rlpf.trained_policy,
                                   rl_policy_config=rl_policy.config))
  trained = fold if config.rl.lora_rank else (lambda p: p["policy"])
  # every model sharded by its logical axes (not replicated on every chip)
  state, shardings = train_loop.place_state(params, boxed, tx,
                                            jax.random.PRNGKey(rl_seed), mesh)
  step = rlpf.make_rl_step(rl_policy, value_model, predictor, tx, cfg,
                           **rl_prompt_ids(config, corpus))
  r = config.rl
  batches = epoch_batches(functools.partial(
      ex.rl_batch, corpus, cuts, num_options=r.num_options,
      distractors=r.distractors), cuts, train.batch_size, rl_seed)
  state = stages.fit(STAGES["rlpf"], "rlpf", config, state=state,
                     shardings=shardings, train_step=step, batches=batches,
                     mesh=mesh, workdir=workdir,
                     eval_fn=lambda s: valid_fn(trained(s.params)))
  return jax.device_get(trained(state.params))


def rl_models(config, policy: llm.DecoderLM, cfg: rlpf.RLConfig
              ) -> tuple[llm.DecoderLM, rlpf.ValueModel | None]:
  """(the policy RL trains, the value model or None): `policy` itself, or
  with config.rl.lora_rank > 0 the same LM with LoRA adapters of that rank on
  every projection (adapters.TARGETS), the warm-up's weights frozen beneath;
  the value model on the same LM."""
  r = config.rl
  if r.lora_rank:
    lora = adapters.AdapterConfig(kind="lora", rank=r.lora_rank,
                                  alpha=r.lora_alpha, targets=adapters.TARGETS)
    policy = llm.DecoderLM(dataclasses.replace(policy.config, adapter=lora))
  value_model = rlpf.ValueModel(policy.config) if cfg.baseline == "value" else None
  return policy, value_model


def frozen_dtype(config):
  """The dtype RL holds frozen weights in: bfloat16 with bfloat16 activations
  (the released checkpoints' own precision; half the memory), else as trained."""
  return jnp.bfloat16 if config.llm.dtype == "bfloat16" else None


def rl_state_params(rl_policy: llm.DecoderLM, value_model, policy_params,
                    predictor_params, init, dtype=None) -> dict:
  """rlpf.rl_params for these models: `init(model, key, part)` gives `part`
  of a model's fresh parameters (concrete, or abstract / boxed for the
  logical axes): the value head and, with LoRA, the fresh adapters."""
  lora = rl_policy.config.adapter.enabled
  adapters_of = lambda p: adapters.split_adapters(p)[0]  # noqa: E731
  value = None
  if value_model is not None:
    value = init(value_model, 0, lambda p: {
        "head": p["head"], "trunk": adapters_of(p["trunk"]) if lora else None})
  return rlpf.rl_params(
      policy_params, predictor_params,
      value_head=value["head"] if value is not None else None,
      policy_adapters=init(rl_policy, 2, adapters_of) if lora else None,
      value_adapters=value["trunk"] if value is not None else None,
      frozen_dtype=dtype)


def setup(config, workdir: str, quiet: bool = False
          ) -> tuple[tl.UserTimelines, ex.UserSplit, Corpus]:
  """The run's timelines, users and corpus (popularity from training users)."""
  d = config.data
  timelines = sources.load_timelines(config.data, quiet=quiet)
  sources.require_item_text(timelines, config.workflow)  # titles for prompts
  try:
    users = ex.split_users(timelines, d.valid_users, d.test_users, d.min_history,
                           d.future_len, config.seed)
  except ValueError as e:
    raise ConfigError(f"config.data: {e}") from None
  tokenizer = tokenizer_for(config, workdir, timelines)
  train_events = np.isin(timelines.event_users, users.train)
  popularity = np.bincount(timelines.item_ids[train_events],
                           minlength=timelines.num_items + 1)
  return timelines, users, Corpus(timelines, tokenizer, d.history_len,
                                     config.summary.max_len,
                                     config.summary.prompt_len, popularity)


def held_out(config, timelines: tl.UserTimelines, users: np.ndarray,
             corpus: Corpus, split: str) -> tuple[ex.Cuts, evaluation.Probes]:
  """The held-out cuts of `users` and their probes, fixed by the seed: the
  valid split asks the next title only (the validation curves), the test split
  every probe over future_len events (the table)."""
  cuts = ex.held_out_cuts(timelines, users, config.data.future_len)
  future_len, seed = ((1, config.seed + 5) if split == "valid"
                      else (config.data.future_len, config.seed + 6))
  return cuts, evaluation.make_probes(corpus, cuts, future_len, config.rl.num_options,
                                      config.rl.distractors, seed)


@dataclasses.dataclass
class Trained:
  """The stages 1-3 of a run (host parameters), and what the table needs."""
  timelines: tl.UserTimelines
  users: ex.UserSplit
  corpus: Corpus
  cuts: ex.Cuts  # the training cuts (warm-ups and RL prompts)
  policy: llm.DecoderLM
  initial_params: dict  # the initial policy (after its warm-up)
  predictor: llm.DecoderLM
  predictor_params: dict
  scorer: evaluation.Predictor
  length_target: float  # L
  rl_params: dict  # the policy after RL
  rl_seconds: float


def train(config, workdir: str, mesh) -> Trained:
  """Stages 1-3, each resumed from (or returned by) its checkpoints in
  `workdir`: on a finished run this only restores."""
  check(config)
  d, s = config.data, config.summary
  timelines, users, corpus = setup(config, workdir)
  cuts = ex.training_cuts(timelines, users.train, d.cuts_per_user, d.min_history,
                          config.seed)
  print(f"[rlpf] vocabulary {corpus.tokenizer.vocab_size} pieces; {len(users.train)} "
        f"training users ({len(cuts)} cuts), {len(users.valid)} valid and "
        f"{len(users.test)} test users", flush=True)
  style_of = functools.partial(texts.sample_style, probabilities=dict(s.style))
  policy_style_of = functools.partial(texts.sample_style,
                                      probabilities=dict(config.policy_style))
  model_cfg = language_model.llm_config(config, corpus.tokenizer.vocab_size)

  # 1-2. the initial policy and the frozen predictor
  valid_cuts, valid_probes = held_out(config, timelines, users.valid, corpus, "valid")
  policy, policy_params = warm_up(
      "policy", config, config.llm.policy_checkpoint, model_cfg,
      epoch_batches(functools.partial(
          ex.policy_batch, corpus, cuts, style_of=policy_style_of,
          merge_fraction=s.merge_fraction, chunk_len=s.chunk_len),
          cuts, config.policy_train.batch_size, config.seed), rlpf.lm_loss,
      mesh, workdir, policy_valid_fn(config, corpus, valid_cuts))
  predictor, predictor_params = warm_up(
      "predictor", config, config.llm.predictor_checkpoint,
      model_cfg, epoch_batches(functools.partial(
          ex.predictor_batch, corpus, cuts, style_of=style_of,
          context_weights=dict(config.predictor.contexts),
          num_options=config.rl.num_options, distractors=config.rl.distractors),
          cuts, config.predictor_train.batch_size, config.seed + 1),
      functools.partial(rlpf.predictor_loss,
                        choice_weight=config.predictor.choice_weight,
                        history_weight=config.predictor.history_lm_weight),
      mesh, workdir,
      predictor_valid_fn(config, corpus, valid_cuts, valid_probes))
  e = config.eval
  scorer = evaluation.Predictor(predictor, predictor_params, corpus, e.batch_size,
                                config.predictor.calibrate)

  def valid_fn(policy_params):
    """Next-title accuracy of the greedy summaries of the valid users."""
    writer = Summarizer(policy, policy_params, corpus, e.batch_size)
    contexts = [corpus.summary_context(corpus.summary_ids(t)[:-1])
                for t in writer.summaries(valid_cuts)]
    scores = evaluation.score_contexts(scorer, valid_probes, contexts,
                                       config.rl.num_options, next_title_only=True)
    return {"next_title": scores["next_title"],
            "summary_tokens": scores["context_tokens"] - len(corpus.summary_head)}

  # 3. RL
  initial = Summarizer(policy, policy_params, corpus, e.batch_size)
  target = length_target(initial, corpus, cuts, config.rl.length_target_prompts,
                         config.rl.temperature, config.seed + 4)
  print(f"[rlpf] length target L = {target:.2f} tokens (initial policy, sampled)",
        flush=True)
  rl_began = time.time()
  rl_params = reinforce(config, policy, policy_params, predictor, predictor_params,
                        corpus, cuts, target, valid_fn, mesh, workdir)
  return Trained(timelines, users, corpus, cuts, policy, policy_params, predictor,
                 predictor_params, scorer, target, rl_params, time.time() - rl_began)


def run(config, workdir: str, mesh) -> dict[str, float]:
  began = time.time()
  t = train(config, workdir, mesh)
  results = {"rl_seconds": t.rl_seconds, "length_target": t.length_target}
  # 4. the table, on the test users
  test_cuts, probes = held_out(config, t.timelines, t.users.test, t.corpus, "test")
  summaries = table.summaries(config, t.corpus, t.policy, t.initial_params,
                              t.rl_params, test_cuts)
  scores = table.score(config, t.corpus, t.scorer, probes, test_cuts, summaries)
  table.write_markdown(workdir, scores, len(test_cuts))
  results.update(table.result_keys("test", scores))
  results.update({"test_users": float(len(test_cuts)),
                  "wall_seconds": time.time() - began})
  return results


# --- a finished workdir (main.py --mode; docs/using.md) --------------------------

def evaluate(config, workdir: str, mesh) -> dict[str, float]:
  """--mode=eval: `run` with every stage restored from its checkpoints and
  none trained (one not finished is a WorkdirError naming it): the table
  again."""
  with use.restoring():
    return run(config, workdir, mesh)


def trained(config, workdir: str, mesh) -> Trained:
  """Stages 1-3 of a finished run, restored (never trained)."""
  with use.restoring():
    return train(config, workdir, mesh)


def summarize(config, workdir: str, mesh, users: list[str]) -> dict:
  """--mode=summarize: for each of `users` (ids of the data files), the RL
  policy's greedy summary of the user's latest `config.data.history_len`
  events, and the initial policy's (after its warm-up, before RL) beside it.
  Writes `<workdir>/use/summaries.json`; returns the same payload."""
  t = trained(config, workdir, mesh)
  asked = use.user_indices(t.timelines, users)
  cuts = t.timelines.lengths[asked]
  prompts_ = [t.corpus.policy_prompt(int(u), int(c)) for u, c in zip(asked, cuts)]
  written = {name: t.corpus.decode_summaries(
      Summarizer(t.policy, params, t.corpus, config.eval.batch_size).write(prompts_))
      for name, params in (("rlpf", t.rl_params), ("initial", t.initial_params))}
  split_of = {int(u): name for name in ("train", "valid", "test")
              for u in getattr(t.users, name)}
  rows = [{**use.user_entry(t.timelines, user), "split": split_of[int(user)],
           "history": texts.history_text(t.corpus.items, *t.corpus.history(
               int(user), int(cut))),
           "rlpf_summary": written["rlpf"][row],
           "initial_summary": written["initial"][row]}
          for row, (user, cut) in enumerate(zip(asked, cuts))]
  payload = {"workflow": "rlpf", "workdir": workdir,
             "written_by": "greedy decoding (temperature 0) of the policy "
                           "after RL (rlpf_summary) and of the initial policy "
                           "(initial_summary), each from the user's latest "
                           f"{config.data.history_len} events",
             "users": rows}
  use.save(workdir, "summaries", payload)
  return payload


def export(config, workdir: str, mesh, out: str) -> dict:
  """--mode=export: the policy after RL in the released Gemma layout under
  `out`, with its tokenizer (userllm/export.py). Returns the manifest."""
  export_lib.check_out(out)
  t = trained(config, workdir, mesh)
  return export_lib.write(
      out, t.rl_params, t.policy.config, t.corpus.tokenizer.path,
      variant=config.llm.variant,
      about={"workflow": "rlpf", "workdir": workdir, "stage": "rlpf",
             "model": "the summary policy after RL"})
