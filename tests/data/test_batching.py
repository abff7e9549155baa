"""Epoch batch planners: one subset per batch, clusters kept together, every row once per epoch."""

from __future__ import annotations

import numpy as np
import pytest

from sde_ray.data.batching import (
    PLANNERS,
    cluster_rows,
    dropped_rows,
    plan_epoch,
    row_groups,
    split_groups,
    worker_batch,
)

GLOBAL, WORLD = 8, 2


def _subsets(sizes: dict[str, int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([[name] * size for name, size in sizes.items()])
    return np.random.default_rng(seed).permutation(labels)  # rows of a subset are scattered


def test_same_subset_batches_hold_one_subset_and_every_row_once():
    subsets = _subsets({"A": 24, "B": 16, "C": 40})
    plan = plan_epoch({"subset": subsets}, seed=3, epoch=0, global_batch=GLOBAL, world=WORLD, mode="same_subset")
    assert plan.shape == (80 // GLOBAL, GLOBAL)
    for batch in plan:
        assert len(set(subsets[batch])) == 1
    np.testing.assert_array_equal(np.sort(plan.ravel()), np.arange(len(subsets)))
    # Batches of different subsets interleave (not all of A, then all of B, ...).
    firsts = [subsets[b[0]] for b in plan]
    assert sum(a != b for a, b in zip(firsts, firsts[1:])) > 2


def test_drop_leaves_out_only_each_subsets_tail():
    sizes = {"A": 21, "B": 13, "C": 8}
    subsets = _subsets(sizes)
    plan = plan_epoch({"subset": subsets}, 0, 1, GLOBAL, WORLD, mode="same_subset")
    flat = plan.ravel()
    assert len(np.unique(flat)) == len(flat)  # no row twice
    assert dropped_rows(plan, len(subsets)) == sum(n % GLOBAL for n in sizes.values())
    for name, size in sizes.items():
        kept = np.sum(subsets[flat] == name)
        assert kept == size - size % GLOBAL


def test_pad_keeps_batches_pure_and_every_row_at_least_once():
    subsets = _subsets({"A": 21, "B": 13, "C": 8})
    plan = plan_epoch({"subset": subsets}, 0, 0, GLOBAL, WORLD, mode="same_subset", remainder="pad")
    assert dropped_rows(plan, len(subsets)) == 0
    for batch in plan:
        assert len(set(subsets[batch])) == 1
        assert len(np.unique(batch)) == len(batch)
    with pytest.raises(ValueError, match="subset 'D'"):
        plan_epoch({"subset": _subsets({"A": 16, "D": 3})}, 0, 0, GLOBAL, WORLD, "same_subset", "pad")


@pytest.mark.parametrize("mode", sorted(PLANNERS))
def test_plans_are_functions_of_seed_and_epoch(mode):
    meta = {"subset": _subsets({"A": 32, "B": 32}), "cluster": np.arange(64) // 4}
    same = [plan_epoch(meta, 5, 2, GLOBAL, WORLD, mode) for _ in range(2)]
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.array_equal(same[0], plan_epoch(meta, 5, 3, GLOBAL, WORLD, mode))
    assert not np.array_equal(same[0], plan_epoch(meta, 6, 2, GLOBAL, WORLD, mode))
    np.testing.assert_array_equal(np.sort(same[0].ravel()), np.arange(64))
    # Every worker: the same number of batches, and the ranks' slices make up each global batch.
    for b in range(len(same[0])):
        parts = [worker_batch(same[0], b, r, WORLD) for r in range(WORLD)]
        assert {len(p) for p in parts} == {GLOBAL // WORLD}
        np.testing.assert_array_equal(np.concatenate(parts), same[0][b])


def test_teacher_clusters_share_batches():
    clusters = np.random.default_rng(1).permutation(np.arange(64) // 4)  # 16 clusters of 4
    plan = plan_epoch({"cluster": clusters}, 0, 0, GLOBAL, WORLD, mode="teacher_cluster")
    np.testing.assert_array_equal(np.sort(plan.ravel()), np.arange(64))
    batch_of = np.empty(64, dtype=int)
    for b, batch in enumerate(plan):
        batch_of[batch] = b
    for label in range(16):  # cluster size divides the batch: each cluster sits in one batch
        assert len(set(batch_of[clusters == label])) == 1


def test_clusters_larger_than_the_mined_size_are_split_into_pieces_of_it():
    rng = np.random.default_rng(3)
    sizes = {0: 37, 1: 4, 2: 1, 3: 16, 4: 9}  # one cluster of a few-label subset, and ordinary ones
    clusters = rng.permutation(np.concatenate([[c] * n for c, n in sizes.items()]))
    pieces = split_groups(clusters, 4)
    for cluster, n in sizes.items():
        rows = np.flatnonzero(clusters == cluster)
        counts = np.unique(pieces[rows], return_counts=True)[1]
        assert sorted(counts) == sorted([4] * (n // 4) + ([n % 4] if n % 4 else []))  # ceil(n / 4) pieces
        assert not set(pieces[rows]) & set(pieces[clusters != cluster])  # each piece inside its cluster
    keys = [f"k{i}" for i in range(len(clusters))]
    groups = row_groups("teacher_cluster", keys, dict(zip(keys, clusters.tolist())), cluster_size=4)
    assert np.array_equal(groups, pieces)
    # Through the planner: whole clusters fill batches with the big cluster's rows alone; its pieces
    # share batches with other clusters' pieces.
    def pure_batches(labels) -> int:
        return sum(int(np.all(clusters[batch] == 0)) for seed in range(10)
                   for batch in plan_epoch({"cluster": labels}, seed, 0, GLOBAL, WORLD, "teacher_cluster"))
    assert pure_batches(clusters) >= 10 * 3  # 37 rows: at least 3 of the 8 batches per epoch
    assert pure_batches(groups) < pure_batches(clusters) / 2


def test_cluster_rows_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32)) * 5
    truth = np.repeat(np.arange(6), 20)
    embeddings = centres[truth] + rng.standard_normal((120, 32))
    labels = cluster_rows(embeddings, 6, seed=0)
    for k in range(6):  # every planted cluster is one found cluster, and vice versa
        assert len(set(labels[truth == k])) == 1
    assert len(set(labels)) == 6


def test_bad_arguments_are_named():
    with pytest.raises(KeyError, match="'subset'"):
        plan_epoch({"cluster": np.zeros(8)}, 0, 0, GLOBAL, WORLD, mode="same_subset")
    with pytest.raises(ValueError, match="divisible by world"):
        plan_epoch({"subset": np.zeros(8)}, 0, 0, 7, WORLD)
    with pytest.raises(ValueError, match="unknown data.batching"):
        plan_epoch({"subset": np.zeros(8)}, 0, 0, GLOBAL, WORLD, mode="nope")
