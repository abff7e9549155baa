"""Epoch batch plans: which rows share a global batch (pure numpy; no Ray, no torch).

A planner maps per-row metadata, `(seed, epoch)`, the global batch size and the world size to the
epoch's row order grouped into global batches: an int64 array `[num_batches, global_batch]` of row
indices. Rank r's local batch of global batch b is `plan[b, r·L:(r+1)·L]` with
`L = global_batch // world` (`worker_batch`), so every worker gets the same number of batches by
construction. The plan is a function of its arguments only: the same call on every rank, and after
a resume, gives the same order. `sde_ray.data.order.EpochOrder` turns the plan of `data.batching`
into the epoch's stream of (shard, row) positions, which the training workers read; `row_groups`
gives it the per-row ids from the shards' sample keys (the subset) or a mined sidecar (the teacher
cluster).

Planners (`PLANNERS`, `data.batching`; `GROUP_COLUMN`: the per-row id each one batches by):
- `random`: one permutation of all rows.
- `same_subset`: every global batch holds rows of one subset only (VLM2Vec-V2's same-task
  sub-batches: in-batch negatives from the same task are harder and never trivially of another
  modality/format). Each subset is shuffled and cut into batches; the batches of all subsets are
  then shuffled together, so subsets interleave over the epoch.
- `teacher_cluster`: rows whose targets a teacher finds mutually similar share a batch (B3's idea).
  Clusters (ids from `cluster_rows`, or a `sde-ray mine` sidecar's `cluster` column) are shuffled,
  rows within each are shuffled, and the concatenation is cut into batches: a cluster no larger
  than a batch stays within one batch, or spans two adjacent ones.

The remainder is explicit (`remainder`):
- `drop` (default): rows that fill no whole batch (per subset for `same_subset`, over the epoch
  otherwise) are left out of this epoch. Every row appears at most once; which rows are left out
  changes with the epoch's shuffle. `dropped_rows` says how many.
- `pad`: the last partial batch is filled with other rows of the same group (subset, or the whole
  epoch), drawn without repeating a row within that batch. Every row appears at least once; the
  padding rows appear twice. A subset smaller than one global batch cannot be padded without
  repeating a row inside a batch and is an error naming it.
With a row count that divides into whole batches (per subset for `same_subset`), both modes give
every row exactly once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import numpy as np

REMAINDERS = ("drop", "pad")
GROUP_COLUMN = {"same_subset": "subset", "teacher_cluster": "cluster"}


def _rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    # SeedSequence mixes the words: (seed, epoch) pairs never collide the way seed + epoch would.
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), salt]))


def _check(global_batch: int, world: int, remainder: str) -> None:
    if world < 1 or global_batch < 1:
        raise ValueError(f"global_batch and world must be >= 1, got {global_batch}, {world}")
    if global_batch % world:
        raise ValueError(f"global_batch ({global_batch}) must be divisible by world ({world})")
    if remainder not in REMAINDERS:
        raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")


def _column(rows_meta: Mapping[str, Sequence], key: str, mode: str) -> np.ndarray:
    if key not in rows_meta:
        raise KeyError(f"data.batching={mode} needs per-row '{key}' ids in rows_meta; got {sorted(rows_meta)}")
    return np.asarray(rows_meta[key])


def _num_rows(rows_meta: Mapping[str, Sequence]) -> int:
    lengths = {key: len(values) for key, values in rows_meta.items()}
    if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f"rows_meta needs columns of one length (one entry per row), got {lengths}")
    return next(iter(lengths.values()))


def _cut(order: np.ndarray, global_batch: int, remainder: str, rng: np.random.Generator,
         group: str = "the epoch") -> np.ndarray:
    """`order` cut into whole batches; the tail dropped or padded with other rows of `order`."""
    full = len(order) // global_batch
    batches = order[: full * global_batch].reshape(full, global_batch)
    tail = order[full * global_batch:]
    if remainder == "drop" or len(tail) == 0:
        return batches
    if len(order) < global_batch:
        raise ValueError(
            f"remainder=pad: {group} has {len(order)} rows, fewer than one global batch ({global_batch}); "
            "padding would repeat a row within a batch (use remainder=drop or a smaller batch)"
        )
    others = order[: full * global_batch]
    pad = rng.choice(others, size=global_batch - len(tail), replace=False)
    return np.concatenate([batches, np.concatenate([tail, pad])[None]])


def plan_random(rows_meta: Mapping[str, Sequence], seed: int, epoch: int, global_batch: int, world: int,
                remainder: str = "drop") -> np.ndarray:
    """One permutation of all rows, cut into global batches."""
    _check(global_batch, world, remainder)
    rng = _rng(seed, epoch, 0)
    return _cut(rng.permutation(_num_rows(rows_meta)), global_batch, remainder, rng)


def plan_same_subset(rows_meta: Mapping[str, Sequence], seed: int, epoch: int, global_batch: int, world: int,
                     remainder: str = "drop") -> np.ndarray:
    """Global batches of one subset each (`rows_meta["subset"]`), in a shuffled order of batches."""
    _check(global_batch, world, remainder)
    _num_rows(rows_meta)
    subsets = _column(rows_meta, "subset", "same_subset")
    rng = _rng(seed, epoch, 1)
    parts = []
    for subset in np.unique(subsets):  # sorted: the plan does not depend on row order of first sight
        rows = np.flatnonzero(subsets == subset)
        name = subset.item() if isinstance(subset, np.generic) else subset
        parts.append(_cut(rng.permutation(rows), global_batch, remainder, rng, f"subset {name!r}"))
    batches = np.concatenate(parts) if parts else np.zeros((0, global_batch), dtype=np.int64)
    return batches[rng.permutation(len(batches))].astype(np.int64)


def plan_teacher_cluster(rows_meta: Mapping[str, Sequence], seed: int, epoch: int, global_batch: int,
                         world: int, remainder: str = "drop") -> np.ndarray:
    """Shuffled clusters (`rows_meta["cluster"]`) laid end to end and cut into global batches."""
    _check(global_batch, world, remainder)
    n = _num_rows(rows_meta)
    clusters = _column(rows_meta, "cluster", "teacher_cluster")
    rng = _rng(seed, epoch, 2)
    labels, inverse = np.unique(clusters, return_inverse=True)
    # One sort instead of a pass per cluster (MMEB-sized corpora have tens of thousands): rows are
    # ordered by their cluster's place in a shuffled cluster order, then by a random key.
    place = rng.permutation(len(labels))[inverse.reshape(-1)]
    order = np.lexsort((rng.permutation(n), place)) if n else np.zeros(0, np.int64)
    return _cut(order.astype(np.int64), global_batch, remainder, rng)


PLANNERS: dict[str, Callable[..., np.ndarray]] = {
    "random": plan_random,
    "same_subset": plan_same_subset,
    "teacher_cluster": plan_teacher_cluster,
}


def plan_epoch(rows_meta: Mapping[str, Sequence], seed: int, epoch: int, global_batch: int, world: int,
               mode: str = "random", remainder: str = "drop") -> np.ndarray:
    """The epoch's `[num_batches, global_batch]` row indices under planner `mode` (`data.batching`)."""
    if mode not in PLANNERS:
        raise ValueError(f"unknown data.batching {mode!r}; valid: {', '.join(PLANNERS)}")
    return PLANNERS[mode](rows_meta, seed, epoch, global_batch, world, remainder)


def worker_batch(plan: np.ndarray, batch: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s rows of global batch `batch`: a contiguous 1/world slice."""
    local = plan.shape[1] // world
    return plan[batch, rank * local:(rank + 1) * local]


def dropped_rows(plan: np.ndarray, num_rows: int) -> int:
    """Rows of `num_rows` that a plan leaves out of its epoch (0 with remainder=pad)."""
    return num_rows - len(np.unique(plan))


def split_groups(labels: np.ndarray, size: int) -> np.ndarray:
    """`labels` refined so that no group has more than `size` rows: each group's rows, in a fixed
    pseudo-random order, cut into pieces of `size` (the last one shorter); groups of at most `size`
    rows stay whole. Ids are int64, ordered by (group, piece).

    Why: k-means of teacher *target* embeddings puts every row of a subset whose targets are a few
    labels into one cluster (hundreds of rows with the same target). Laid end to end, such a
    cluster filled whole batches in which every other candidate was a copy of the row's own target
    (issue 18: 10 points below random batches, and masking the copies did not help). Pieces of the
    mined cluster size keep the hard neighbours together and let a batch hold G / size of them.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(labels)
    if n == 0 or size <= 0:
        return labels
    order = np.lexsort((np.random.default_rng(0).permutation(n), labels))  # by group, then a fixed shuffle
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))  # position within its group
    pieces = np.empty(n, dtype=np.int64)
    pieces[order] = np.unique(np.stack([sorted_labels, rank // size]), axis=1, return_inverse=True)[1].reshape(-1)
    return pieces


def row_groups(mode: str, keys: Sequence[str], clusters: Mapping[str, int] | None = None,
               cluster_size: int = 0) -> np.ndarray | None:
    """The per-row ids planner `mode` batches by, for the rows whose sample keys are `keys` (None
    for `random`), as int64 (a planner sees only which rows share an id, and the ids' order).

    `same_subset`: the subset named by the key (`sde_ray.data.convert.key_subset`: our converter
    writes `<subset>-<row>`); the ids are the subsets' ranks by name, so the plan is the one the
    names would give. `teacher_cluster`: `clusters[key]` (a `sde-ray mine` sidecar's `cluster`
    column), clusters larger than `cluster_size` (> 0) split into pieces of that size
    (`split_groups`). Raises ValueError naming what is missing.
    """
    if mode == "random":
        return None
    if mode == "same_subset":
        from sde_ray.data.convert import key_subset

        names = np.asarray([key_subset(key) for key in keys])
        return np.unique(names, return_inverse=True)[1].reshape(-1).astype(np.int64)
    if mode == "teacher_cluster":
        if clusters is None:
            raise ValueError("data.batching=teacher_cluster needs teacher clusters (a `sde-ray mine` sidecar)")
        missing = [key for key in keys if key not in clusters]
        if missing:
            raise ValueError(f"{len(missing)} sample keys have no teacher cluster (e.g. {missing[:3]}); "
                             "mine again on these shards (`sde-ray mine`)")
        labels = np.asarray([clusters[key] for key in keys], dtype=np.int64)
        if len(labels) and (labels < 0).all():
            raise ValueError("the sidecar has no teacher clusters (mined with mine.cluster_size=0): "
                             "mine again with mine.cluster_size > 0")
        return split_groups(labels, cluster_size)  # cluster_size 0: the clusters as they are
    raise ValueError(f"unknown data.batching {mode!r}; valid: {', '.join(PLANNERS)}")


def cluster_rows(embeddings: np.ndarray, num_clusters: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """Spherical k-means cluster ids of (teacher) target embeddings, for `plan_teacher_cluster`.

    Cosine similarity, farthest-point seeding from a row drawn with `seed`; deterministic. A stand-in for B3's
    graph partitioning that keeps the property the planner needs: mutually similar targets share
    an id.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or not 1 <= num_clusters <= len(x):
        raise ValueError(f"need (N × d) embeddings and 1 <= num_clusters <= N, got {x.shape}, {num_clusters}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    # Farthest-point seeding: each new centre is the row least similar to the centres so far
    # (sampled k-means++ seeding put two centres in one planted cluster too often).
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, num_clusters):
        centres.append(x[int(np.argmin(np.max(x @ np.stack(centres).T, axis=1)))])
    centres = np.stack(centres)
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmax(x @ centres.T, axis=1)
        for k in range(num_clusters):
            members = x[labels == k]
            if len(members):
                centre = members.sum(0)
                centres[k] = centre / max(np.linalg.norm(centre), 1e-12)
    return labels
