"""Corpus retrieval and ranking metrics the way MMEB-V2's harness scores them (pure numpy; no Ray).

Conventions (TIGER-AI-Lab/VLM2Vec `eval.py` + `src/utils/eval_utils/metrics.py::RankingMetrics`,
docs/eval.md "MMEB-V2"):

- A query is ranked against the whole corpus (`eval_type: global`: visual documents, most video
  sets) or against its own candidate list (`eval_type: local`); the score is the cosine of the
  L2-normalised embeddings. Every corpus item is encoded once, whatever the number of queries.
- Ties: the harness sorts with `np.argsort(-scores)`; we sort stably, so of two candidates with
  the same score the one earlier in the corpus (or the candidate list) ranks first. That makes a
  ranking reproducible and the chunked ranking identical to the unchunked one.
- Relevance is graded: `qrels` maps a candidate id to its grade; a grade <= 0 is not relevant
  (the harness drops those qrels when it reads them, `load_qrels_mapping`).
- `hit@k` = 1 if a relevant candidate is in the top k; `precision@k` = relevant in top k / k;
  `recall@k` = relevant in top k / all relevant; `mrr@k` = 1 / rank of the first relevant within k.
- `ndcg_linear@k` = DCG / IDCG with gain = grade and discount log2(rank + 1); IDCG is the DCG of
  the grades sorted descending, cut at k (so fewer than k relevant items can still score 1.0);
  `ndcg_exponential@k` uses gain 2^grade - 1. The harness zips its de-duplicated (set-ordered)
  labels with the grades in their original order, which can pair a grade with the wrong
  document when grades differ; we keep each grade with its own document (the definition the
  harness means, and pytrec_eval's).
- A query without any relevant candidate stays in the mean and scores 0 on every metric except
  recall, which the harness defines as 1.0 there ("all 0 relevant items were recalled"); we keep
  its convention so the means agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Mapping, Sequence

import numpy as np

from sde_ray.eval.metrics import l2_normalize

# The cut-offs the harness reports every metric at.
K_LIST = (1, 5, 10)
METRICS = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "mrr")
# Query and corpus rows per block of the chunked ranking: bounds the score matrix in memory at
# QUERY_BLOCK × CORPUS_CHUNK float32 (64 MiB), whatever the corpus size.
QUERY_BLOCK = 1024
CORPUS_CHUNK = 16384


def _relevant(qrels: Mapping[Hashable, float]) -> dict:
    return {doc: float(grade) for doc, grade in qrels.items() if grade > 0}


def _dcg(gains: Sequence[float]) -> float:
    return float(sum(g / math.log2(rank + 2) for rank, g in enumerate(gains)))


def ndcg_at_k(ranked: Sequence[Hashable], qrels: Mapping[Hashable, float], k: int,
              form: str = "linear") -> float:
    """NDCG@k of one ranking against graded qrels (0.0 when nothing is relevant)."""
    relevant = _relevant(qrels)
    if not relevant or k <= 0:
        return 0.0
    gain = (lambda g: g) if form == "linear" else (lambda g: 2.0 ** g - 1.0)
    dcg = _dcg([gain(relevant.get(doc, 0.0)) for doc in ranked[:k]])
    ideal = _dcg([gain(g) for g in sorted(relevant.values(), reverse=True)[:k]])
    return dcg / ideal if ideal > 0 else 0.0


def hit_at_k(ranked: Sequence[Hashable], qrels: Mapping[Hashable, float], k: int) -> float:
    relevant = _relevant(qrels)
    return 1.0 if any(doc in relevant for doc in ranked[:k]) else 0.0


def precision_at_k(ranked: Sequence[Hashable], qrels: Mapping[Hashable, float], k: int) -> float:
    relevant = _relevant(qrels)
    if not relevant or k <= 0:
        return 0.0
    return sum(doc in relevant for doc in ranked[:k]) / k


def recall_at_k(ranked: Sequence[Hashable], qrels: Mapping[Hashable, float], k: int) -> float:
    relevant = _relevant(qrels)
    if not relevant:
        return 1.0  # the harness's convention (RankingMetrics.recall_at_k)
    return sum(doc in relevant for doc in ranked[:k]) / len(relevant)


def mrr_at_k(ranked: Sequence[Hashable], qrels: Mapping[Hashable, float], k: int) -> float:
    relevant = _relevant(qrels)
    for rank, doc in enumerate(ranked[:k]):
        if doc in relevant:
            return 1.0 / (rank + 1)
    return 0.0


_METRIC_FUNCTIONS = {
    "hit": hit_at_k,
    "ndcg_linear": lambda r, q, k: ndcg_at_k(r, q, k, "linear"),
    "ndcg_exponential": lambda r, q, k: ndcg_at_k(r, q, k, "exponential"),
    "precision": precision_at_k,
    "recall": recall_at_k,
    "mrr": mrr_at_k,
}


def ranking_scores(rankings: Sequence[Sequence[Hashable]], qrels: Sequence[Mapping[Hashable, float]],
                   k_list: Sequence[int] = K_LIST, metrics: Sequence[str] = METRICS) -> dict[str, float]:
    """Mean of every metric at every k over the queries, keyed like the harness (`hit@1`,
    `ndcg_linear@5`, ...), plus `num_pred` / `num_data`. `rankings[i]` lists query i's candidate
    ids best first (at least max(k_list) of them, or all); `qrels[i]` its graded relevance."""
    if len(rankings) != len(qrels):
        raise ValueError(f"{len(rankings)} rankings but {len(qrels)} qrels")
    unknown = [m for m in metrics if m not in _METRIC_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {sorted(_METRIC_FUNCTIONS)}")
    scores: dict[str, float] = {}
    for metric in metrics:
        fn = _METRIC_FUNCTIONS[metric]
        for k in sorted(k_list):
            values = [fn(ranked, rel, k) for ranked, rel in zip(rankings, qrels)]
            scores[f"{metric}@{k}"] = float(np.mean(values)) if values else 0.0
    scores["num_pred"] = len(rankings)
    scores["num_data"] = len(qrels)
    return scores


@dataclass(frozen=True)
class TopK:
    """The k best candidates per query: `index` int64 [Q, k] into the corpus, `score` float32
    [Q, k], best first (k = min(k, corpus size)); host (CPU) numpy arrays."""

    index: np.ndarray
    score: np.ndarray


def _stable_top(scores: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    # Stable sort on -score keeps the given column order among ties; callers put earlier corpus
    # positions first, so ties go to the lower corpus index.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(index, order, 1)


def _cosines(queries: np.ndarray, corpus: np.ndarray) -> np.ndarray:
    # BLAS sums a dot product in an order that depends on the matrix shapes, so the same pair can
    # differ in the last float32 bit between a chunk and the full matrix and flip a tie. Summing
    # in float64 and rounding to float32 makes each score independent of the blocking.
    return (queries.astype(np.float64) @ corpus.astype(np.float64).T).astype(np.float32)


def corpus_topk(queries: np.ndarray, corpus: np.ndarray, k: int,
                query_block: int = QUERY_BLOCK, corpus_chunk: int = CORPUS_CHUNK) -> TopK:
    """Top-k of every query over the whole corpus by cosine similarity, in bounded memory.

    `queries` [Q, D] and `corpus` [N, D] are raw embeddings on the host (normalised here). The
    corpus is scanned in chunks of `corpus_chunk` rows and the queries in blocks of `query_block`,
    so memory holds one block × chunk score matrix and a running [block, k] top-k; the result is
    the same as one argsort over the full score matrix (tested).
    """
    queries = l2_normalize(queries)
    corpus = l2_normalize(corpus)
    k = min(k, len(corpus))
    index = np.zeros((len(queries), k), dtype=np.int64)
    score = np.zeros((len(queries), k), dtype=np.float32)
    for q0 in range(0, len(queries), query_block):
        block = queries[q0:q0 + query_block]
        best_s = np.zeros((len(block), 0), dtype=np.float32)
        best_i = np.zeros((len(block), 0), dtype=np.int64)
        for c0 in range(0, len(corpus), corpus_chunk):
            chunk_scores = _cosines(block, corpus[c0:c0 + corpus_chunk])
            chunk_index = np.broadcast_to(np.arange(c0, c0 + chunk_scores.shape[1]), chunk_scores.shape)
            # The running best come from earlier chunks, so they go first: ties keep the lower index.
            best_s, best_i = _stable_top(np.concatenate([best_s, chunk_scores], 1),
                                         np.concatenate([best_i, chunk_index], 1), k)
        index[q0:q0 + len(block)] = best_i
        score[q0:q0 + len(block)] = best_s
    return TopK(index=index, score=score)


def rank_candidates(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Positions of a query's own candidate list, best first (`eval_type: local`); ties keep
    list order. `query` [D], `candidates` [K, D], host numpy."""
    scores = _cosines(l2_normalize(query[None]), l2_normalize(candidates))[0]
    return np.argsort(-scores, kind="stable")
