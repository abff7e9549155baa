"""Precision@1 on MMEB and its aggregates (pure numpy; no model, no Ray).

Conventions (VLM2Vec v1 `eval.py` + `evaluation/eval_utils.py::get_pred`, docs/eval.md):

- A row is one query with its candidate list; the positive is candidate 0.
- The score of a candidate is the cosine similarity of the L2-normalised embeddings.
- The prediction is the first index of the maximum score (`np.argmax` semantics, as in VLM2Vec),
  so a candidate that ties the positive exactly loses to it: **a tie with the positive is a hit**.
- A row that cannot be scored (malformed, or any of its query/candidate images missing) is a miss
  and stays in the denominator: P@1 = hits / all rows.
- Meta-task, IND and OOD scores are plain means of the per-dataset P@1; `overall` is the plain mean
  over datasets (not the mean of the meta-task means), VLM2Vec's reporting convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

# Rows per chunk when gathering candidate embeddings: bounds memory at chunk × K × D floats.
_SCORE_CHUNK_ROWS = 64


def l2_normalize(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is 0)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, eps)


def candidate_scores(
    query_embeddings: np.ndarray,
    candidate_embeddings: np.ndarray,
    query_index: np.ndarray,
    candidate_index: np.ndarray,
) -> np.ndarray:
    """Cosine score of every (row, candidate slot): float32 [R, K], -inf where the slot is padding.

    `query_index[r]` picks row r's query from `query_embeddings` [Q, D]; `candidate_index[r, k]`
    picks its k-th candidate from `candidate_embeddings` [C, D] (-1 = no candidate in that slot).
    Rows with `query_index == -1` get -inf everywhere. The arithmetic per row is the same whether
    the tables hold distinct items or one entry per occurrence, so de-duplicated and naive
    encodings of equal vectors give bit-identical scores.
    """
    query_index = np.asarray(query_index, dtype=np.int64)
    candidate_index = np.asarray(candidate_index, dtype=np.int64)
    if candidate_index.ndim != 2 or query_index.shape != candidate_index.shape[:1]:
        raise ValueError(
            f"query_index {query_index.shape} and candidate_index {candidate_index.shape} "
            "must be [R] and [R, K]"
        )
    rows, slots = candidate_index.shape
    scores = np.full((rows, slots), -np.inf, dtype=np.float32)
    if rows == 0 or slots == 0 or len(query_embeddings) == 0 or len(candidate_embeddings) == 0:
        return scores
    queries = l2_normalize(query_embeddings)
    candidates = l2_normalize(candidate_embeddings)
    for start in range(0, rows, _SCORE_CHUNK_ROWS):
        stop = min(start + _SCORE_CHUNK_ROWS, rows)
        q_idx = query_index[start:stop]
        c_idx = candidate_index[start:stop]
        gathered = candidates[np.maximum(c_idx, 0)]  # [r, K, D]
        chunk = np.matmul(gathered, queries[np.maximum(q_idx, 0)][:, :, None])[..., 0]
        chunk[c_idx < 0] = -np.inf
        chunk[q_idx < 0] = -np.inf
        scores[start:stop] = chunk
    return scores


def top1(scores: np.ndarray) -> np.ndarray:
    """Predicted slot per row: the first index of the maximum (ties go to the lowest index)."""
    return np.argmax(scores, axis=1)


def hits_at_1(scores: np.ndarray, scorable: np.ndarray | None = None) -> np.ndarray:
    """bool [R]: candidate 0 wins; rows marked not scorable are misses."""
    if scores.shape[1] == 0:
        return np.zeros(scores.shape[0], dtype=bool)
    hits = (top1(scores) == 0) & np.isfinite(scores[:, 0])
    if scorable is not None:
        hits &= np.asarray(scorable, dtype=bool)
    return hits


@dataclass
class DatasetScore:
    """P@1 of one dataset with the bookkeeping that makes it auditable."""

    name: str
    meta_task: str
    split: str
    num_queries: int
    num_correct: int
    num_missing: int = 0
    num_malformed: int = 0
    missing_images: list[str] = field(default_factory=list)

    @property
    def p_at_1(self) -> float:
        return self.num_correct / self.num_queries if self.num_queries else 0.0

    def to_dict(self) -> dict:
        return {
            "p_at_1": self.p_at_1,
            "meta_task": self.meta_task,
            "split": self.split,
            "num_queries": self.num_queries,
            "num_correct": self.num_correct,
            "num_missing": self.num_missing,
            "num_malformed": self.num_malformed,
            "missing_images": list(self.missing_images),
        }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def summarize(scores: Mapping[str, DatasetScore], meta_task_order: Iterable[str] = (),
              outside: str = "outside_catalog") -> dict:
    """The results dict: `datasets`, `meta_tasks`, `ind`, `ood`, `overall` (None where no dataset).

    Meta-tasks are listed in `meta_task_order` first (those with datasets), then any others.
    Datasets whose meta-task is `outside` (no catalog describes them) are listed and get their own
    mean, `outside_catalog`, but count in no meta-task and in none of IND / OOD / overall, so the
    MMEB aggregates stay comparable with published ones.
    """
    by_task: dict[str, list[float]] = {}
    extra = [s.p_at_1 for s in scores.values() if s.meta_task == outside]
    scores_in = {name: s for name, s in scores.items() if s.meta_task != outside}
    for score in scores_in.values():
        by_task.setdefault(score.meta_task, []).append(score.p_at_1)
    ordered = [t for t in meta_task_order if t in by_task] + sorted(
        t for t in by_task if t not in meta_task_order
    )
    return {
        "datasets": {name: score.to_dict() for name, score in scores.items()},
        "meta_tasks": {task: _mean(by_task[task]) for task in ordered},
        "ind": _mean(s.p_at_1 for s in scores_in.values() if s.split == "IND"),
        "ood": _mean(s.p_at_1 for s in scores_in.values() if s.split == "OOD"),
        "overall": _mean(s.p_at_1 for s in scores_in.values()),
        "outside_catalog": _mean(extra),
        "num_queries": int(sum(s.num_queries for s in scores.values())),
        "num_missing": int(sum(s.num_missing for s in scores.values())),
        "num_malformed": int(sum(s.num_malformed for s in scores.values())),
    }
