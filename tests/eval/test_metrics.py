"""P@1 maths against hand-built fixtures with known answers and an independent loop reference."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from sde_ray.eval.dataset import build_table
from sde_ray.eval.metrics import DatasetScore, candidate_scores, hits_at_1, summarize


def reference_hits(query_vectors, candidate_lists):
    """Plain-Python P@1: cosine per candidate, first maximum wins, hit when it is index 0."""
    hits = []
    for q, cands in zip(query_vectors, candidate_lists):
        qn = math.sqrt(sum(x * x for x in q))
        scores = [sum(a * b for a, b in zip(q, c)) / (qn * math.sqrt(sum(x * x for x in c))) for c in cands]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        hits.append(best == 0)
    return hits


def test_known_answers_on_hand_built_embeddings():
    queries = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    candidates = np.array([[2.0, 0.1], [0.1, 3.0], [1.0, -1.0], [0.9, 1.1]])
    # row 0: positive [2, .1] is closest -> hit; row 1: positive [2, .1] loses to [.1, 3] -> miss;
    # row 2: positive [.9, 1.1] beats [2, .1] and [1, -1] -> hit.
    query_index = np.array([0, 1, 2])
    candidate_index = np.array([[0, 1, 2], [0, 1, 2], [3, 0, 2]])
    scores = candidate_scores(queries, candidates, query_index, candidate_index)
    assert hits_at_1(scores).tolist() == [True, False, True]
    assert scores[0, 2] == pytest.approx(1 / math.sqrt(2), rel=1e-6)


def test_matches_independent_reference_on_random_data():
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(40, 16))
    candidates = rng.normal(size=(90, 16))
    candidate_index = rng.integers(0, 90, size=(150, 7))
    query_index = rng.integers(0, 40, size=150)
    hits = hits_at_1(candidate_scores(queries, candidates, query_index, candidate_index))
    expected = reference_hits(
        queries[query_index].tolist(), [candidates[row].tolist() for row in candidate_index]
    )
    assert hits.tolist() == expected
    assert 0 < hits.sum() < len(hits)


def test_tie_with_the_positive_is_a_hit_and_ties_among_negatives_are_not():
    queries = np.array([[1.0, 0.0]])
    candidates = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    tie_with_positive = candidate_scores(queries, candidates, np.array([0]), np.array([[0, 1]]))
    assert tie_with_positive[0, 0] == tie_with_positive[0, 1]
    assert hits_at_1(tie_with_positive).tolist() == [True]
    tie_above_positive = candidate_scores(queries, candidates, np.array([0]), np.array([[0, 2, 3]]))
    assert hits_at_1(tie_above_positive).tolist() == [False]


def test_padding_never_wins_and_unscorable_rows_are_misses():
    queries = np.array([[1.0, 0.0], [1.0, 0.0]])
    candidates = np.array([[-1.0, 0.0], [1.0, 0.0]])
    scores = candidate_scores(queries, candidates, np.array([0, -1]), np.array([[0, -1], [1, 0]]))
    assert scores[0, 1] == -np.inf and np.isneginf(scores[1]).all()
    # row 0's only real candidate is the positive, so it wins even at cosine -1; row 1 is malformed
    assert hits_at_1(scores).tolist() == [True, False]
    assert hits_at_1(scores, scorable=np.array([False, True])).tolist() == [False, False]


def test_nan_embeddings_are_misses():
    queries = np.array([[np.nan, 0.0], [1.0, 0.0]])
    candidates = np.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 1.0]])
    scores = candidate_scores(queries, candidates, np.array([0, 1]), np.array([[0, 1], [0, 2]]))
    assert hits_at_1(scores).tolist() == [False, False]


def _hash_vector(item, dim=12):
    seed = int.from_bytes(hashlib.sha1(repr(item).encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def test_deduplicated_candidates_give_identical_scores_to_naive():
    rng = np.random.default_rng(1)
    labels = [f"label {i}" for i in range(5)]
    rows = []
    for r in range(30):
        order = rng.permutation(5)
        rows.append(
            {
                "qry_text": f"query {r % 6}",
                "qry_img_path": f"img/{r % 6}.jpg",
                "tgt_text": [labels[i] for i in order],
                "tgt_img_path": [""] * 5,
            }
        )
    dedup, naive = build_table("x", rows, dedup=True), build_table("x", rows, dedup=False)
    assert len(dedup.candidates) == 5 and len(naive.candidates) == 150
    assert len(dedup.queries) < len(naive.queries) == 30

    def encode(items):
        return np.stack([_hash_vector(item) for item in items])

    scores_dedup = candidate_scores(
        encode(dedup.queries), encode(dedup.candidates), dedup.query_index, dedup.candidate_index
    )
    scores_naive = candidate_scores(
        encode(naive.queries), encode(naive.candidates), naive.query_index, naive.candidate_index
    )
    np.testing.assert_array_equal(scores_dedup, scores_naive)
    assert hits_at_1(scores_dedup).tolist() == hits_at_1(scores_naive).tolist()


def _score(name, task, split, p, n=100):
    return DatasetScore(name, task, split, num_queries=n, num_correct=round(p * n))


def test_meta_task_ind_ood_and_overall_means():
    scores = {
        "a": _score("a", "classification", "IND", 0.5),
        "b": _score("b", "classification", "OOD", 0.3),
        "c": _score("c", "vqa", "IND", 0.9),
        "d": _score("d", "retrieval", "OOD", 0.2),
        "e": _score("e", "retrieval", "OOD", 0.4),
        "f": _score("f", "retrieval", "IND", 0.6),
    }
    out = summarize(scores, ("classification", "vqa", "retrieval", "grounding"))
    assert list(out["meta_tasks"]) == ["classification", "vqa", "retrieval"]
    assert out["meta_tasks"]["classification"] == pytest.approx(0.4)
    assert out["meta_tasks"]["vqa"] == pytest.approx(0.9)
    assert out["meta_tasks"]["retrieval"] == pytest.approx(0.4)
    assert out["ind"] == pytest.approx((0.5 + 0.9 + 0.6) / 3)
    assert out["ood"] == pytest.approx((0.3 + 0.2 + 0.4) / 3)
    # overall is the plain mean over datasets, not the mean of the meta-task means (0.5667)
    assert out["overall"] == pytest.approx(2.9 / 6)
    assert out["datasets"]["c"]["p_at_1"] == pytest.approx(0.9)


def test_overall_reproduces_vlm2vec_phi_headline():
    """Paper Table 2, VLM2Vec Phi-3.5-V: meta-task scores 54.8/54.9/62.3/79.5 over 10/10/12/4 -> 60.1."""
    tasks = [
        ("classification", 0.548, 10),
        ("vqa", 0.549, 10),
        ("retrieval", 0.623, 12),
        ("grounding", 0.795, 4),
    ]
    scores = {}
    for task, p, count in tasks:
        for i in range(count):
            scores[f"{task}{i}"] = _score(f"{task}{i}", task, "IND", p, n=1000)
    out = summarize(scores)
    assert round(100 * out["overall"], 1) == 60.1
    assert round(100 * np.mean(list(out["meta_tasks"].values())), 1) == 62.9  # the other convention differs


def test_missing_and_malformed_stay_in_the_denominator():
    score = DatasetScore("x", "vqa", "IND", num_queries=10, num_correct=6, num_missing=2, num_malformed=1)
    assert score.p_at_1 == pytest.approx(0.6)
    assert score.to_dict()["num_missing"] == 2
