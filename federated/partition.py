"""Client synthesis: assigning examples to clients when the data has no natural ones.

Every partition returns `assignment`, an int32 array with one client id per
example, so each example lands in exactly one client by construction.

- `dirichlet_partition`: label skew (Hsu et al. 2019). For every label, client
  shares are drawn from Dirichlet(alpha); small alpha gives each client few labels.
- `semantic_partition`: the semantic synthesis of "What Do We Mean by
  Generalization in Federated Learning?" (Yuan et al. 2022, section 4.1). Stage 1
  fits a Gaussian mixture per label to the examples' embeddings (intra-client
  intra-label similarity); stage 2 packs one cluster of every label into each
  client by bipartite matching on the KL divergence between the Gaussians of
  successive labels (intra-client inter-label similarity).
- `client_of_user`: the client of every user under `config.federated.partition`
  (natural: one client per user; modulo: user i in client i mod num_clients,
  which on synthetic data generated with `communities = num_clients` makes
  each client one community, data/synthetic.py).
- `item_embeddings` / `user_embeddings`: the embedding model for timelines: an
  SVD of the items' positive PMI co-occurrence matrix (item2vec as matrix
  factorisation, Levy & Goldberg 2014), users as the mean of their items.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from data import timelines as tl
from infra.errors import ConfigError

_REG_COVAR = 1e-4  # added to GMM variances, as in the paper's implementation
PARTITIONS = ("natural", "dirichlet", "semantic", "modulo")


def client_of_user(fed, timelines: tl.UserTimelines, seed: int) -> np.ndarray:
  """[num_users] client id of every user under `fed.partition` (reads
  `partition, num_clients, dirichlet_alpha, embedding_dim`)."""
  if fed.partition not in PARTITIONS:
    raise ConfigError(f"config.federated.partition={fed.partition!r} is not one of "
                      f"{PARTITIONS}")
  if fed.dirichlet_alpha <= 0 or fed.embedding_dim < 1:
    raise ConfigError("config.federated.dirichlet_alpha must be > 0 and "
                      "config.federated.embedding_dim >= 1, got "
                      f"{fed.dirichlet_alpha} and {fed.embedding_dim}")
  if fed.partition == "natural":
    return np.arange(timelines.num_users, dtype=np.int32)
  if not 1 <= fed.num_clients <= timelines.num_users:
    raise ConfigError(f"config.federated.num_clients={fed.num_clients} must be "
                      f"between 1 and the {timelines.num_users} users when "
                      f"partition={fed.partition!r}")
  if fed.partition == "modulo":
    return (np.arange(timelines.num_users) % fed.num_clients).astype(np.int32)
  labels = favourite_genres(timelines)
  if fed.partition == "dirichlet":
    assignment = dirichlet_partition(labels, fed.num_clients, fed.dirichlet_alpha,
                                     seed)
  else:
    items = item_embeddings(timelines, fed.embedding_dim)
    assignment = semantic_partition(user_embeddings(timelines, items), labels,
                                    fed.num_clients, seed)
  # Clients that drew no user are dropped and the ids made dense again.
  return np.unique(assignment, return_inverse=True)[1].astype(np.int32)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float,
                        seed: int) -> np.ndarray:
  """[n] client id per example; label k's examples are shared out in proportions
  drawn from Dirichlet(alpha * ones(num_clients))."""
  if alpha <= 0 or num_clients < 1:
    raise ConfigError(f"dirichlet partition needs alpha > 0 and num_clients >= 1, "
                      f"got alpha={alpha}, num_clients={num_clients}")
  rng = np.random.default_rng(seed)
  assignment = np.full(len(labels), -1, np.int32)
  for label in np.unique(labels):
    members = rng.permutation(np.nonzero(labels == label)[0])
    shares = rng.dirichlet(np.full(num_clients, alpha))
    cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
    for client, part in enumerate(np.split(members, cuts)):
      assignment[part] = client
  return assignment


def _diag_gaussian_kl(means_p, vars_p, means_q, vars_q) -> np.ndarray:
  """[len(p), len(q)] KL(N_p || N_q) between diagonal Gaussians."""
  mp, vp = means_p[:, None], vars_p[:, None]
  mq, vq = means_q[None], vars_q[None]
  return 0.5 * np.sum(np.log(vq / vp) + (vp + (mp - mq) ** 2) / vq - 1.0, axis=-1)


def _gaussian_clusters(x: np.ndarray, k: int, seed: int):
  """Diagonal GMM with k components on x [n, d] -> (cluster [n], means [k, d],
  variances [k, d]). A single example is its own cluster (a GMM needs two)."""
  if len(x) == 1:
    return np.zeros(1, np.int64), x.astype(np.float64), np.full(x.shape, _REG_COVAR)
  # imported here: sklearn costs a second at start-up to every run that
  # never clusters
  from sklearn.mixture import GaussianMixture
  gmm = GaussianMixture(k, covariance_type="diag", reg_covar=_REG_COVAR,
                        random_state=seed).fit(x)
  return gmm.predict(x), gmm.means_, gmm.covariances_


def semantic_partition(embeddings: np.ndarray, labels: np.ndarray,
                       num_clients: int, seed: int) -> np.ndarray:
  """[n] client id per example by per-label GMM clustering + KL matching.

  Label l gets k_l = min(num_clients, count_l) diagonal-covariance clusters.
  Labels are matched in a random order (drawn from `seed`) that starts with the
  largest label, whose clusters seed the clients; each later label's clusters
  go to distinct clients by a minimum-cost bipartite matching, the cost of
  (client, cluster) being the KL divergence from the Gaussian the client took
  most recently to the cluster's Gaussian.
  """
  unique, counts = np.unique(labels, return_counts=True)
  if counts.max() < num_clients:
    raise ConfigError(f"semantic partition into {num_clients} clients needs a label "
                      f"with at least that many examples; the largest has "
                      f"{counts.max()}")
  rng = np.random.default_rng(seed)
  order = [unique[np.argmax(counts)]]
  rest = [label for label in unique if label != order[0]]
  order += [rest[i] for i in rng.permutation(len(rest))]

  assignment = np.full(len(labels), -1, np.int32)
  client_means = client_vars = None
  for label in order:
    members = np.nonzero(labels == label)[0]
    cluster, means, variances = _gaussian_clusters(
        embeddings[members], min(num_clients, len(members)), seed)
    if client_means is None:
      client_of_cluster = np.arange(len(means))
      client_means, client_vars = means.copy(), variances.copy()
    else:
      cost = _diag_gaussian_kl(client_means, client_vars, means, variances)
      clients, clusters = linear_sum_assignment(cost)  # cost: [clients, k]
      client_of_cluster = np.empty(len(means), np.int64)
      client_of_cluster[clusters] = clients
      client_means[clients] = means[clusters]
      client_vars[clients] = variances[clusters]
    assignment[members] = client_of_cluster[cluster]
  return assignment


def item_embeddings(timelines: tl.UserTimelines, dim: int) -> np.ndarray:
  """[num_items + 1, dim] item vectors: truncated SVD of the positive PMI of
  items co-occurring in a user's timeline (row 0, the padding item, is zero)."""
  vocab = timelines.num_items + 1
  user_item = np.zeros((timelines.num_users, vocab), np.float64)
  np.add.at(user_item, (timelines.event_users, timelines.item_ids), 1.0)
  user_item = np.minimum(user_item, 1.0)
  cooc = user_item.T @ user_item
  np.fill_diagonal(cooc, 0.0)
  total = max(cooc.sum(), 1.0)
  marginal = cooc.sum(axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    pmi = np.log(cooc * total / (marginal * marginal.T))
  ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
  u, s, _ = np.linalg.svd(ppmi, hermitian=True)
  vectors = u[:, :dim] * np.sqrt(s[:dim])
  vectors[0] = 0.0
  return vectors


def user_embeddings(timelines: tl.UserTimelines, items: np.ndarray) -> np.ndarray:
  """[num_users, dim] mean item vector of each user's events (zeros if none)."""
  sums = np.zeros((timelines.num_users, items.shape[1]))
  np.add.at(sums, timelines.event_users, items[timelines.item_ids])
  return sums / np.maximum(timelines.lengths, 1)[:, None]


def favourite_genres(timelines: tl.UserTimelines) -> np.ndarray:
  """[num_users] index of each user's most frequent genre (ties: lower index)."""
  counts = np.zeros((timelines.num_users, timelines.items.genres.shape[1]))
  np.add.at(counts, timelines.event_users,
            timelines.items.genres[timelines.item_ids].astype(np.float64))
  return counts.argmax(axis=1).astype(np.int32)


DATACENTER_SPLITS = ("none", "genre")


def datacenter_users(how: str, timelines: tl.UserTimelines) -> np.ndarray | None:
  """[num_users] bool, True for the users whose data the server holds (mixed
  FL's datacenter data; `config.federated.datacenter.users`), or None.

  "genre": genres ranked by how many users they are the favourite of; users
  whose favourite has an odd rank go to the server, the rest stay clients:
  two groups of about equal size whose tastes differ.
  """
  if how == "none":
    return None
  if how != "genre":
    raise ConfigError(f"config.federated.datacenter.users={how!r} is not one of "
                      f"{DATACENTER_SPLITS}")
  favourite = favourite_genres(timelines)
  counts = np.bincount(favourite, minlength=timelines.items.genres.shape[1])
  rank = np.empty_like(counts)
  rank[np.argsort(-counts, kind="stable")] = np.arange(len(counts))
  return rank[favourite] % 2 == 1
