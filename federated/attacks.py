"""Attacks that measure what a protection protects (the survey's attack side:
membership inference, and reconstruction from what a client sends).

- `membership_auc`: the loss-threshold membership-inference attack (Yeom et
  al. 2018) on a trained model: users whose events were trained on (members)
  should have lower loss than users never trained on (non-members). AUC 0.5 is
  no leak; 1.0 separates them perfectly.
- `embedding_update_auc`: which items a client interacted with, read from the
  update it sends: an item embedding row moves most for the client's own items
  (they are its inputs and targets). AUC of the row-norm score separating the
  client's items from the rest.
- `activation_inversion_accuracy`: under split storage (federated/split.py)
  the server sees activations at the cut instead; a ridge-regression decoder
  fitted on auxiliary users' activations (the server can make those with its
  copy of the model) predicts the input item at each position. Top-1 accuracy
  against chance 1 / items, and (`decoder_auc`) the AUC of its scores: how
  far above the other candidates the true item ranks.

All scores are computed in numpy/JAX on the model as trained; an attack on a
non-finite model is an error, never a number.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data import sequences
from data import timelines as tl
from federated import algorithms, clients
from userllm.models import sequence_model as sm


def auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
  """P(score of a positive > score of a negative), ties counted half."""
  positive_scores = np.asarray(positive_scores, np.float64)
  negative_scores = np.asarray(negative_scores, np.float64)
  if not (np.isfinite(positive_scores).all() and np.isfinite(negative_scores).all()):
    raise ValueError("attack scores are not finite: the model is broken")
  from sklearn import metrics as sk_metrics  # here: importing it costs ~1 s
  labels = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
  return float(sk_metrics.roc_auc_score(
      labels, np.r_[positive_scores, negative_scores]))


def auc_standard_error(value: float, positives: int, negatives: int) -> float:
  """Hanley & McNeil's (1982) standard error of an AUC."""
  q1, q2 = value / (2 - value), 2 * value ** 2 / (1 + value)
  variance = (value * (1 - value) + (positives - 1) * (q1 - value ** 2)
              + (negatives - 1) * (q2 - value ** 2)) / (positives * negatives)
  return float(np.sqrt(max(variance, 0.0)))


def prefix_timelines(timelines: tl.UserTimelines, users: np.ndarray,
                     lengths: np.ndarray) -> tl.UserTimelines:
  """Timelines holding only the first lengths[i] events of each users[i]
  (every other user empty)."""
  keep_len = np.zeros(timelines.num_users, np.int64)
  keep_len[users] = lengths
  position = np.arange(timelines.num_events) - np.repeat(
      timelines.user_offsets[:-1], timelines.lengths)
  return timelines.select_events(position < np.repeat(keep_len, timelines.lengths))


def user_losses(model: sm.ItemSequenceTransformer, params, timelines:
                tl.UserTimelines, max_len: int, batch_size: int = 256
                ) -> dict[int, float]:
  """{user: mean next-item loss over its training windows} (no dropout)."""
  windows, owners = sequences.training_windows_by_user(timelines, max_len)
  loss_fn = jax.jit(lambda p, w: sm.next_item_example_losses(
      model, p, w, jax.random.PRNGKey(0), train=False))
  losses = []
  for start in range(0, len(windows), batch_size):
    chunk = windows[start:start + batch_size]
    padded = np.zeros((batch_size,) + chunk.shape[1:], chunk.dtype)
    padded[:len(chunk)] = chunk
    losses.append(np.asarray(loss_fn(params, jnp.asarray(padded)))[:len(chunk)])
  losses = np.concatenate(losses) if losses else np.zeros(0)
  out = {}
  for user in np.unique(owners):
    out[int(user)] = float(losses[owners == user].mean())
  return out


def membership_auc(model, params, timelines: tl.UserTimelines, split,
                   max_len: int) -> dict[str, float]:
  """Loss-threshold membership inference over users.

  Members: participating users, scored on the training events they were
  trained on. Non-members: non-participating users, scored on the same
  positions of their timelines (the events before their held-out tail),
  never trained on. `split` is a federated/clients.ParticipationSplit.

  Returns {"mia_auc", "mia_auc_se", "mia_members", "mia_nonmembers",
  "mia_loss_gap"}.
  """
  def first_heldout(held_out):
    users, first = np.unique(held_out.users, return_index=True)
    return users, held_out.history_lengths[first]

  members = user_losses(model, params, prefix_timelines(
      timelines, *first_heldout(split.out_of_sample)), max_len)
  nonmembers = user_losses(model, params, prefix_timelines(
      timelines, *first_heldout(split.non_participating)), max_len)
  m, n = np.array(list(members.values())), np.array(list(nonmembers.values()))
  value = auc(-m, -n)
  return {"mia_auc": value,
          "mia_auc_se": auc_standard_error(value, len(m), len(n)),
          "mia_members": float(len(m)),
          "mia_nonmembers": float(len(n)),
          "mia_loss_gap": float(n.mean() - m.mean())}


def embedding_update_auc(embedding_update: np.ndarray, own_items: np.ndarray,
                         num_items: int) -> float:
  """AUC of |row of the update| separating the client's items from the others.

  embedding_update: [vocab_padded, embed] the item-embedding part of what the
  client sent; own_items: the item ids in its examples; rows 1..num_items are
  the real items (0 is padding, above num_items the table's padding).
  """
  update = np.asarray(embedding_update, np.float64)
  if not np.isfinite(update).all():
    raise ValueError("the update is not finite")
  scores = np.linalg.norm(update[1:num_items + 1], axis=1)
  own = np.zeros(num_items, bool)
  own[np.asarray(own_items)[(own_items > 0) & (own_items <= num_items)] - 1] = True
  if own.all() or not own.any():
    raise ValueError("the client's items must be some but not all items")
  return auc(scores[own], scores[~own])


def ridge_decoder_scores(fit_activations: np.ndarray, fit_items: np.ndarray,
                         test_activations: np.ndarray, vocab: int,
                         ridge: float = 1e-3) -> np.ndarray:
  """[n_test, vocab] scores of a ridge decoder from activations [n, embed] to
  the item [n] at that position, fitted on (fit_*) and read on the test
  activations.

  Features are standardised with the fit set's mean and std (the ridge then
  means the same at every activation scale). The one-hot targets are never
  built: H^T Y sums each item's activations."""
  fit = np.asarray(fit_activations, np.float64)
  test = np.asarray(test_activations, np.float64)
  if not (np.isfinite(fit).all() and np.isfinite(test).all()):
    raise ValueError("the activations are not finite")
  mean, std = fit.mean(0), np.maximum(fit.std(0), 1e-12)
  standardise = lambda x: np.c_[(x - mean) / std, np.ones(len(x))]  # noqa: E731
  h = standardise(fit)
  h_t_y = np.zeros((vocab, h.shape[1]))
  np.add.at(h_t_y, np.asarray(fit_items), h)
  weights = np.linalg.solve(h.T @ h + ridge * len(h) * np.eye(h.shape[1]), h_t_y.T)
  return standardise(test) @ weights


def activation_inversion_accuracy(fit_activations: np.ndarray, fit_items: np.ndarray,
                                  test_activations: np.ndarray,
                                  test_items: np.ndarray, vocab: int,
                                  ridge: float = 1e-3) -> float:
  """Top-1 accuracy of the ridge decoder (`ridge_decoder_scores`) on the test
  positions."""
  scores = ridge_decoder_scores(fit_activations, fit_items, test_activations,
                                vocab, ridge)
  return float(np.mean(scores.argmax(1) == test_items))


def decoder_auc(scores: np.ndarray, true_items: np.ndarray,
                candidates: np.ndarray) -> tuple[float, float]:
  """(AUC, its standard error over positions, which treats them as
  independent) of decoder scores [n, vocab]:
  at each position, the share of the other `candidates` (ids) the true
  item's score beats (ties count half), averaged over positions; 0.5 reads
  nothing, 1.0 ranks the true item first everywhere. The candidates must
  hold every true item."""
  candidates = np.asarray(candidates)
  if len(candidates) < 2 or len(scores) < 2:
    raise ValueError("decoder_auc needs at least 2 candidates and 2 positions")
  if not np.isin(true_items, candidates).all():
    raise ValueError("every true item must be a candidate")
  if not np.isfinite(scores[:, candidates]).all():
    raise ValueError("the decoder's scores are not finite")
  true = scores[np.arange(len(scores)), true_items][:, None]
  among = scores[:, candidates]
  beaten = (among < true).sum(1) + 0.5 * ((among == true).sum(1) - 1)
  per_position = beaten / (len(candidates) - 1)
  return (float(per_position.mean()),
          float(per_position.std(ddof=1) / np.sqrt(len(per_position))))


def cohort_updates(example_loss, client_spec, dataset, state, cohort_size: int,
                   seed: int):
  """What one cohort would send from `state`: (deltas {leaf: [clients, ...]},
  weights [clients] (1 for clients with examples), each client's item ids).
  The cohort is the sampler's for a round the run never reaches."""
  cohort = clients.CohortSampler(dataset, cohort_size, seed)(10**6)
  update = jax.jit(jax.vmap(algorithms.make_client_update(example_loss,
                                                          client_spec),
                            in_axes=(None, 0, 0, 0, 0)))
  deltas, _, metrics = update(
      state.params, algorithms.cohort_client_states(state, cohort),
      jnp.asarray(cohort["examples"]), jnp.asarray(cohort["num_examples"]),
      algorithms.client_rngs(state, jnp.asarray(cohort["client_ids"])))
  if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(deltas)):
    raise FloatingPointError("a client update of the trained model is not finite")
  items = [np.unique(cohort["examples"][c, :n]) for c, n in
           enumerate(cohort["num_examples"])]
  weights = (cohort["num_examples"] > 0).astype(np.float32)
  return deltas, jnp.asarray(weights), items
