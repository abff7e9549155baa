"""Modality-gap remedies applied at evaluation time, and their effect on P@1.

The remedies are the pure maths of `sde_ray.losses.gap` (Yi, Douady & Chen): an orthogonal
Procrustes rotation of the queries onto their positives, or a projection of both sides onto the
subspace the modalities share. Protocol (ours; docs/eval.md):

- Every dataset's rows are split by parity: even rows fit the remedy, odd rows measure it. The
  remedy is fitted once on the pooled (query, positive) pairs of the even rows of all evaluated
  datasets — one remedy per model, as it would be deployed — using only scorable rows.
- P@1 before and after is reported on the odd rows only, so the two numbers are like for like and
  no pair that fitted the remedy is scored by it.
- Both act on L2-normalised embeddings; cosine scoring re-normalises after the remedy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from sde_ray.losses.gap import REMEDIES, procrustes_rotation, shared_space_projection

Remedy = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def fit_remedy(name: str, query: np.ndarray, target: np.ndarray, k: int = 8) -> Remedy:
    """(map for query embeddings, map for candidate embeddings) fitted on paired rows."""
    if name not in REMEDIES:
        raise ValueError(f"unknown gap remedy {name!r}; valid: {', '.join(REMEDIES)} (or 'none')")
    if len(query) < 2:
        raise ValueError(f"gap remedy {name!r} needs at least 2 fitting pairs, got {len(query)}")
    q = torch.from_numpy(_unit(query)).double()
    t = torch.from_numpy(_unit(target)).double()
    if name == "procrustes":
        rotation = procrustes_rotation(q, t).numpy()
        return (lambda x: _unit(x) @ rotation), _unit
    rank = max(1, min(k, q.shape[0] - 1, q.shape[1]))
    projector = shared_space_projection(q, t, rank).numpy()
    return (lambda x: _unit(x) @ projector), (lambda x: _unit(x) @ projector)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_rows(num_rows: int) -> np.ndarray:
    """bool [R]: the rows that fit the remedy (even indices); the odd rows measure it."""
    return np.arange(num_rows) % 2 == 0
