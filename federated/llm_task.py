"""The federated LLM recommender (FELLRec's own setting, arXiv 2402.09959): a
decoder LLM (userllm/models/llm.py) whose base weights are frozen and held
once, with LoRA / MoLoRA / MoDE adapters (`config.adapter`) as the only
parameters the clients train (federated/frozen_base.py holds the round's
state).

Text. Every catalogue title is one vocabulary piece (`config.data.title_pieces`;
small LMs trained here name titles at the popularity floor when titles are
split into pieces, docs/rlpf.md). A user's latest `history_len` titles make
the prompt

    "Watched: <t1> <t2> ... <tH>. Next title:" -> "<t>"

The titles follow one another with no separator: each is a piece that starts
at a word boundary, so the text reads the same and H titles take H tokens
(the prompt is H + 6 tokens when "Watched:" and "Next title:" are 2 and 3
pieces, as in MovieLens-100K's vocabulary). Rows are left-padded, so every
row's answer is its last token.

Training examples (`client_examples`): each user's training timeline cut into
windows of history_len + 1 events (consecutive windows share one event, as
the item transformer's: data/sequences.py), the window's last event the
answer. A client's loss on a row is the answer's cross-entropy plus
`history_lm_weight` x the mean cross-entropy of the history's titles, each
predicted from the titles before it (the history-LM loss that made the
MovieLens RLPF predictor read histories). The base LLM's warm-up
(`base_rows`, federated/llm_workflow.py) learns the same windows as plain
history text, "Watched: <t0> ... <tH>.", every title a target.

Ranking (`NextTitleScorer`): the logits at the prompt's last position, read at
every catalogue item's title piece: one softmax over the title tokens ranks
the items (the softmax is monotone in the logit, so the logits rank alike;
the non-title pieces take no part). Items already in the user's history are
excluded, as for the item transformer; two items with the same title share
a piece and a score (23 of MovieLens-100K's 1,682), and a tie never ranks
above the target (infra/ranking.py). Recall@10 and NDCG@10 per held-out event,
popularity scored on the same events.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from data import sequences, splits
from data import timelines as tl
from data.vocab import Tokenizer
from federated.tasks import NextItemTask
from infra import mesh as mesh_lib, ranking
from infra.errors import ConfigError
from userllm.models import adapters as adapters_lib, llm

HEAD, TAIL, QUESTION = "Watched:", ".", "Next title:"


class TitleText:
  """Token ids of the prompt's parts and of every item's title piece.

  Attributes:
    head: ids of "Watched:"; dot: id of "." (after a title, one piece);
    question: ids of "Next title:"; pad: the padding id.
    piece_of_item: [num_items + 1] int32, item -> its title's piece (0 for
      the padding item).
    is_title: [vocab] bool, True at title pieces.
  """

  def __init__(self, items: tl.ItemTable, tokenizer: Tokenizer):
    titles = [str(t) for t in items.titles[1:]]
    ids = tokenizer.encode(titles)
    split = [t for t, i in zip(titles, ids) if len(i) != 1]
    if split:
      raise ConfigError(
          f"config.data.title_pieces: {len(split)} titles are not one vocabulary "
          f"piece (e.g. {split[0]!r}); the next-title task ranks one piece per "
          "title (set config.data.title_pieces=True, with no config.llm.tokenizer)")
    self.pad = tokenizer.pad_id
    self.head = tokenizer.encode([HEAD])[0]
    self.question = tokenizer.encode([QUESTION])[0]
    self.dot = tokenizer.processor.piece_to_id(TAIL)
    self.piece_of_item = np.asarray([self.pad] + [i[0] for i in ids], np.int32)
    self.is_title = np.zeros(tokenizer.vocab_size, bool)
    self.is_title[self.piece_of_item[1:]] = True

  def rows(self, histories: np.ndarray, lengths: np.ndarray, tail: list[int],
           answers: np.ndarray | None = None) -> np.ndarray:
    """Left-padded rows "Watched: <titles> <tail> [answer]".

    histories: [n, H] item ids, the first `lengths[i]` real; tail: ids after
    the titles; answers: [n] item ids or None. Returns [n, len(head) + H +
    len(tail) (+ 1)] int32, padded with the pad id (0 in the vocabularies
    trained here, which the LM's masks read as padding).
    """
    n, width = histories.shape
    body = len(self.head) + width + len(tail) + (answers is not None)
    out = np.full((n, body), self.pad, np.int32)
    for row, (items, length) in enumerate(zip(histories, lengths)):
      ids = (list(self.head) + self.piece_of_item[items[:length]].tolist()
             + list(tail)
             + ([] if answers is None else [int(self.piece_of_item[answers[row]])]))
      out[row, body - len(ids):] = ids
    return out

  def width(self, history_len: int, question: bool = True,
            answer: bool = False) -> int:
    """Tokens of a row: "Watched:", H titles, [". Next title:"], [answer]."""
    return (len(self.head) + history_len
            + (1 + len(self.question) if question else 0) + answer)

  def prompts(self, histories: np.ndarray, lengths: np.ndarray,
              question: bool = True) -> np.ndarray:
    """"Watched: <titles>. Next title:" rows (question), or the bare history
    "Watched: <titles>", whose next token is the base LM's own guess of the
    next title: [n, width(H, question)]."""
    tail = [self.dot] + list(self.question) if question else []
    return self.rows(histories, lengths, tail)


def split_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Windows [n, H + 1] of right-padded item ids -> (histories [n, H], their
  lengths [n], answers [n]): each window's last real item is its answer."""
  lengths = (windows != tl.PAD_ITEM).sum(1) - 1
  answers = windows[np.arange(len(windows)), lengths]
  histories = np.where(np.arange(windows.shape[1] - 1)[None] < lengths[:, None],
                       windows[:, :-1], tl.PAD_ITEM)
  return histories, lengths, answers


def next_token_nll(model: llm.DecoderLM, params, tokens: jax.Array) -> jax.Array:
  """[b, t] left-padded ids -> [b, t - 1] the cross-entropy of every next
  token (column j: of token j + 1 given tokens up to j)."""
  logits, _ = model.apply({"params": params}, tokens, tokens != 0)
  return nll_of_logits(logits, tokens)


def nll_of_logits(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """logits [b, t, vocab] of tokens [b, t] -> [b, t - 1] next-token
  cross-entropies."""
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def title_targets(is_title: jax.Array, tokens: jax.Array) -> jax.Array:
  """[b, t - 1] float: 1 where the next token is a title piece."""
  return is_title[tokens[:, 1:]].astype(jnp.float32)


def history_lm_losses(model: llm.DecoderLM, params, tokens: jax.Array,
                      is_title: jax.Array) -> jax.Array:
  """[b] mean cross-entropy of the titles of history rows "Watched: <t0>
  ... <tH>." (every title a target): the base LLM's warm-up loss."""
  targets = title_targets(is_title, tokens)
  nll = next_token_nll(model, params, tokens)
  return (nll * targets).sum(1) / jnp.maximum(targets.sum(1), 1.0)


def next_title_losses(model: llm.DecoderLM, history_lm_weight: float,
                      is_title: jax.Array, adapters, examples: jax.Array,
                      rng: jax.Array, frozen) -> jax.Array:
  """The clients' `example_loss(adapters, examples [b, width], rng, frozen)
  -> [b]` (rows `client_examples`): the answer's cross-entropy + history_lm_weight x the mean
  cross-entropy of the history's titles (the answer excluded)."""
  del rng  # no dropout
  logits, _ = model.apply({"params": adapters_lib.merge_adapters(adapters, frozen)},
                          examples, examples != 0)
  return row_losses(history_lm_weight, is_title, logits, examples)


def row_losses(history_lm_weight: float, is_title: jax.Array,
               logits: jax.Array, examples: jax.Array) -> jax.Array:
  """`next_title_losses` [b] from the LLM's logits [b, t, vocab] of the rows
  examples [b, t] (what a split forward's last side computes,
  federated/llm_split.py)."""
  nll = nll_of_logits(logits, examples)
  answer = nll[:, -1]
  if not history_lm_weight:
    return answer
  targets = title_targets(is_title, examples)[:, :-1]
  history = (nll[:, :-1] * targets).sum(1) / jnp.maximum(targets.sum(1), 1.0)
  return answer + history_lm_weight * history


def make_rank_fn(model: llm.DecoderLM, piece_of_item: np.ndarray):
  """jitted (params, prompts [b, p], targets [b] items, excluded [b, items +
  1]) -> [b] rank of each target among the items' title-piece logits at the
  prompt's last position; `params` the LLM's whole tree."""
  pieces = jnp.asarray(piece_of_item)

  @jax.jit
  def rank_fn(params, prompts, targets, excluded):
    logits, _ = model.apply({"params": params}, prompts, prompts != 0)
    scores = logits[:, -1][:, pieces]  # [b, items + 1]
    return ranking.target_ranks(scores, targets, excluded)

  return rank_fn


class NextTitleScorer:
  """Ranks every catalogue title for held-out next events (seen items
  excluded); the row scorer federated/evaluation.py reads (`ranks`,
  `fixed_score_ranks`). `prompts_of(histories [n, H], lengths [n])` makes
  the rows `rank_fn` reads from each event's latest H items;
  `params_of(params)` turns what the evaluator passes (the trained part)
  into the model's whole tree (over the held base)."""

  def __init__(self, timelines: tl.UserTimelines, held_out: splits.HeldOut,
               history_len: int, prompts_of, batch_size: int, mesh,
               rank_fn, params_of):
    items, lengths = sequences.history_inputs(timelines, held_out, history_len)
    self.prompts = prompts_of(items, lengths)
    self.histories = sequences.seen_items(timelines, held_out)
    self.targets = held_out.targets
    self.vocab = timelines.num_items + 1
    self.batch_size, self.mesh = batch_size, mesh
    self.rank_fn, self.params_of = rank_fn, params_of

  def _batches(self, subset: np.ndarray | None = None):
    subset = np.arange(len(self.targets)) if subset is None else subset
    for start in range(0, len(subset), self.batch_size):
      rows = subset[start:start + self.batch_size]
      real = len(rows)
      rows = np.concatenate([rows, np.full(self.batch_size - real, rows[-1])])
      excluded = sequences.excluded_items(
          [self.histories[r] for r in rows[:real]], len(rows), self.vocab)
      yield self.prompts[rows], self.targets[rows], excluded, real

  def ranks(self, params, subset: np.ndarray | None = None) -> np.ndarray:
    """[n] the LLM's rank of every held-out target (or of the rows `subset`)."""
    whole = self.params_of(params)
    out = []
    for prompts, targets, excluded, real in self._batches(subset):
      batch = mesh_lib.put_batch((prompts, targets, excluded), self.mesh)
      out.append(mesh_lib.to_host(self.rank_fn(whole, *batch))[:real])
    return np.concatenate(out)

  def fixed_score_ranks(self, scores: np.ndarray) -> np.ndarray:
    """[n] ranks under fixed item scores [items + 1] that ignore the user."""
    out = []
    for _, targets, excluded, real in self._batches():
      tiled = np.broadcast_to(scores, excluded.shape)
      out.append(np.asarray(ranking.target_ranks(tiled, targets, excluded))[:real])
    return np.concatenate(out)


class NextTitleLLMTask(NextItemTask):
  """The federated_llm workflow's task (`config.federated.task="next_title"`):
  the interface federated/evaluation.py and federated/cost.py read, over
  adapters of a base LLM the task holds (`hold_base`, after the warm-up)."""

  name = "next_title"

  def __init__(self, config, timelines: tl.UserTimelines, tokenizer: Tokenizer,
               model_config: llm.LLMConfig):
    self.history_len = config.data.history_len
    self.text = TitleText(timelines.items, tokenizer)
    self.model = llm.DecoderLM(model_config)
    # the warm-up's LLM: this one without adapters
    self.base_config = dataclasses.replace(model_config,
                                           adapter=adapters_lib.AdapterConfig())
    self.is_title = jnp.asarray(self.text.is_title)
    self.example_loss = functools.partial(
        next_title_losses, self.model, float(config.task.history_lm_weight),
        self.is_title)
    self.rank_fn = make_rank_fn(self.model, self.text.piece_of_item)
    self.frozen = None

  def hold_base(self, frozen) -> None:
    """The base weights (on the mesh) every scorer reads under the adapters."""
    self.frozen = frozen

  def split_params(self, params) -> tuple[dict, dict]:
    """The model's whole (boxed or plain) tree -> (what the clients train:
    the adapters, the frozen rest)."""
    return adapters_lib.split_adapters(params)

  def frozen_of_base(self, base) -> dict:
    """The round's frozen weights from the warm-up's LLM tree."""
    return base

  def base_of_frozen(self, frozen) -> dict:
    """The warm-up's LLM tree from the round's frozen weights."""
    return frozen

  def init_params(self, rng):
    """rng -> the LLM's whole boxed parameter tree (base and adapters)."""
    tokens = jnp.ones((1, self.text.width(self.history_len, answer=True)),
                      jnp.int32)
    return self.model.init(rng, tokens, tokens > 0)["params"]

  def windows(self, train: tl.UserTimelines) -> tuple[np.ndarray, np.ndarray]:
    """(windows [n, H + 1] of each user's training events, owners [n])."""
    return sequences.training_windows_by_user(train, self.history_len)

  def client_examples(self, train: tl.UserTimelines):
    """(rows [n, text.width(H, answer=True)] "Watched: <t0> ... <tH-1>.
    Next title: <tH>", owners [n])."""
    windows, users = self.windows(train)
    histories, lengths, answers = split_windows(windows)
    tail = [self.text.dot] + list(self.text.question)
    return self.text.rows(histories, lengths, tail, answers), users

  def base_rows(self, train: tl.UserTimelines) -> np.ndarray:
    """The warm-up's rows "Watched: <t0> ... <tH>." [n, len("Watched:") + H
    + 2] of the same windows (every title a target)."""
    windows, _ = self.windows(train)
    lengths = (windows != tl.PAD_ITEM).sum(1)
    return self.text.rows(windows, lengths, [self.text.dot])

  def rank_metrics(self, ranks: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: [rows]} of ranks [rows] (Recall@10, NDCG@10 per event)."""
    return self._from_ranks(ranks)

  def whole_params(self, trained):
    """The model's tree: the trained part over the held base."""
    return adapters_lib.merge_trees(trained, self.frozen)

  def row_scorer(self, timelines: tl.UserTimelines, held_out: splits.HeldOut,
                 batch_size: int, mesh) -> NextTitleScorer:
    return NextTitleScorer(timelines, held_out, self.history_len,
                           self.text.prompts, batch_size, mesh, self.rank_fn,
                           self.whole_params)
