"""Full-ranking metrics and the popularity baseline."""

import numpy as np
import pytest

from infra import ranking


def test_ranks_skip_excluded_items_but_never_the_target():
  scores = np.array([[9.0, 1.0, 5.0, 3.0, 4.0]])  # item 0 is padding
  seen = np.array([[True, False, True, False, False]])  # padding and item 2
  # Target 3 (score 3): above it only item 4 (item 2 is seen, 0 is padding).
  assert ranking.target_ranks(scores, np.array([3]), seen).tolist() == [1]
  # A seen target is still ranked.
  assert ranking.target_ranks(scores, np.array([2]), seen).tolist() == [0]


def test_metrics_from_ranks():
  m = ranking.metrics_from_ranks(np.array([0, 1, 9, 10]), ks=(1, 10))
  assert m["recall@1"] == 0.25 and m["recall@10"] == 0.75
  expected = (1 + 1 / np.log2(3) + 1 / np.log2(11)) / 4
  assert m["ndcg@10"] == pytest.approx(expected)
  hits = np.array([1.0, 1.0, 1.0, 0.0])  # recall@10 per event: its standard error
  assert m["recall@10_stderr"] == pytest.approx(hits.std(ddof=1) / 2)


def test_popularity_prefers_frequent_items():
  scores = ranking.popularity_scores(np.array([1, 1, 1, 2, 2, 3]), vocab=5)
  assert scores[1] > scores[2] > scores[3] > max(scores[0], scores[4])


def test_excluded_items_mark_padding_and_the_history():
  from data import sequences
  mask = sequences.excluded_items([np.array([2, 3]), np.array([1])], 3, vocab=5)
  assert mask.tolist() == [[True, False, True, True, False],
                           [True, True, False, False, False],
                           [True, False, False, False, False]]
