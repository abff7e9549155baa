"""Ranking metrics against hand-computed values, and the chunked corpus ranking against one argsort."""

import math

import numpy as np
import pytest

from sde_ray.eval.retrieval import (corpus_topk, hit_at_k, mrr_at_k, ndcg_at_k, precision_at_k,
                                    rank_candidates, ranking_scores, recall_at_k)

RANKED = ["d1", "d2", "d3", "d4", "d5", "d6"]
# Graded qrels: d2 grade 2 at rank 2, d5 grade 1 at rank 5, d9 grade 3 never retrieved, d3 grade 0.
QRELS = {"d2": 2, "d5": 1, "d9": 3, "d3": 0}


def test_ndcg_graded_by_hand():
    # linear: DCG = 2/log2(3) + 1/log2(6); IDCG = 3/log2(2) + 2/log2(3) + 1/log2(4)
    dcg = 2 / 1.584962500721156 + 1 / 2.584962500721156
    idcg = 3 + 2 / 1.584962500721156 + 0.5
    assert ndcg_at_k(RANKED, QRELS, 5) == pytest.approx(dcg / idcg, abs=1e-12)
    assert ndcg_at_k(RANKED, QRELS, 5) == pytest.approx(0.346233, abs=1e-6)
    # exponential gains 2^g - 1: DCG = 3/log2(3) + 1/log2(6); IDCG = 7 + 3/log2(3) + 1/2
    assert ndcg_at_k(RANKED, QRELS, 5, "exponential") == pytest.approx(0.242701, abs=1e-6)
    # @1: d1 is not relevant
    assert ndcg_at_k(RANKED, QRELS, 1) == 0.0


def test_fewer_relevant_than_k():
    # One relevant item: IDCG is its gain at rank 1 only, so finding it first scores 1.0 at any k.
    assert ndcg_at_k(["a", "b", "c"], {"a": 1}, 5) == 1.0
    assert ndcg_at_k(["a", "b", "c"], {"b": 1}, 5) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["a", "b", "c"], {"b": 3}, 5) == pytest.approx(1 / math.log2(3))  # grade cancels
    assert precision_at_k(["a", "b", "c"], {"b": 1}, 5) == pytest.approx(1 / 5)
    assert recall_at_k(["a", "b", "c"], {"b": 1, "z": 2}, 5) == pytest.approx(1 / 2)


def test_hit_mrr_precision_by_hand():
    assert hit_at_k(RANKED, QRELS, 1) == 0.0
    assert hit_at_k(RANKED, QRELS, 5) == 1.0
    assert mrr_at_k(RANKED, QRELS, 5) == 0.5
    assert mrr_at_k(RANKED, QRELS, 1) == 0.0
    assert precision_at_k(RANKED, QRELS, 5) == pytest.approx(2 / 5)
    assert recall_at_k(RANKED, QRELS, 5) == pytest.approx(2 / 3)  # d3's grade 0 is not relevant


def test_query_without_relevant_items():
    nothing = {"x": 0}
    for fn in (hit_at_k, precision_at_k, mrr_at_k, ndcg_at_k):
        assert fn(RANKED, nothing, 5) == 0.0
    assert recall_at_k(RANKED, {}, 5) == 1.0  # the harness's convention
    # It stays in the mean: one perfect query + one empty one = 0.5.
    scores = ranking_scores([["a"], ["a"]], [{"a": 1}, {}], k_list=(1,))
    assert scores["hit@1"] == 0.5 and scores["ndcg_linear@1"] == 0.5
    assert scores["num_pred"] == 2 and set(scores) >= {"mrr@1", "precision@1", "recall@1"}


def test_ties_rank_the_earlier_candidate_first():
    # Scores against the query [1, 0]: 0, 1, 1, 1/sqrt(2); items 1 and 2 tie exactly.
    corpus = np.array([[0, 1], [1, 0], [2, 0], [1, 1]], dtype=np.float32)
    top = corpus_topk(np.array([[1, 0]], dtype=np.float32), corpus, k=4)
    assert top.index.tolist() == [[1, 2, 3, 0]]
    assert top.score[0].tolist() == pytest.approx([1, 1, 2 ** -0.5, 0])
    # The tie straddles a chunk boundary: the earlier chunk's item still wins.
    assert corpus_topk(np.array([[1, 0]], dtype=np.float32), corpus, k=2, corpus_chunk=2).index.tolist() == [[1, 2]]
    assert rank_candidates(np.array([1, 0], dtype=np.float32), corpus[::-1]).tolist() == [1, 2, 0, 3]
    # A tie with a relevant item decides hit@1 by corpus order.
    assert hit_at_k(["c1", "c2"], {"c2": 1}, 1) == 0.0


def test_chunked_equals_unchunked():
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(997, 16)).astype(np.float32)
    corpus[500:520] = corpus[10]  # exact duplicates: ties across chunks
    queries = rng.normal(size=(203, 16)).astype(np.float32)
    queries[:5] = corpus[10]
    k = 10
    chunked = corpus_topk(queries, corpus, k, query_block=37, corpus_chunk=61)
    # Reference: one score matrix, one stable argsort.
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    cn = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    full = (qn.astype(np.float64) @ cn.astype(np.float64).T).astype(np.float32)
    ref = np.argsort(-full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(chunked.index, ref)
    np.testing.assert_allclose(chunked.score, np.take_along_axis(full, ref, 1), atol=1e-6)
    assert chunked.index[0, :3].tolist() == [10, 500, 501]
    # k larger than the corpus returns the whole corpus ranked.
    assert corpus_topk(queries[:2], corpus[:3], 10).index.shape == (2, 3)
