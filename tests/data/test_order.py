"""The epoch order (`sde_ray.data.order`): a pure function of (seed, epoch), the same global
batches for every world size, a resume plan that is the tail of the full plan, a real shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from sde_ray.data.order import EpochOrder, WorkerPlan, batch_pair_overlap, epoch_seed

COUNTS = (16, 16, 9, 16, 16, 3, 16, 16)  # 108 rows, uneven shards


def global_batches(order: EpochOrder, world: int, start_step: int = 0) -> list[set[tuple[int, int]]]:
    """(shard, row) sets of each global step, assembled from every rank's plan."""
    steps: dict[int, set] = {}
    for rank in range(world):
        plan = WorkerPlan(order, rank, world, start_step)
        index = start_step
        for window in plan.windows():
            where = {int(p): (t.shard, int(r)) for t in window.tasks for p, r in zip(t.positions, t.rows)}
            for batch in window.batches:
                assert len(batch) == order.global_batch // world
                steps.setdefault(index, set()).update(where[int(p)] for p in batch)
                index += 1
    return [steps[s] for s in sorted(steps)]


def test_every_row_at_most_once_and_the_same_steps_for_every_world_size() -> None:
    order = EpochOrder(COUNTS, seed=3, epoch=2, global_batch=8, window_rows=32)
    reference = global_batches(order, 1)
    assert len(reference) == order.steps == 108 // 8
    rows = [row for step in reference for row in step]
    assert len(rows) == len(set(rows)) == 13 * 8
    assert set(rows) <= {(s, r) for s, n in enumerate(COUNTS) for r in range(n)}
    for world in (2, 4, 8):
        assert global_batches(order, world) == reference, world


def test_a_resume_plan_is_the_tail_of_the_uninterrupted_plan() -> None:
    order = EpochOrder(COUNTS, seed=0, epoch=1, global_batch=8, window_rows=24)
    full = global_batches(order, 2)
    for start in (1, 3, 4, 7, 13):
        assert global_batches(order, 2, start) == full[start:], start
        # Consumed windows are not read at all, and the window the resume falls in reads only the
        # rows of its remaining steps.
        for rank in range(2):
            read = sum(len(t.rows) for w in WorkerPlan(order, rank, 2, start).windows() for t in w.tasks)
            assert read == (order.steps - start) * 4


def test_the_order_is_a_function_of_seed_and_epoch_only() -> None:
    def steps(seed, epoch):
        return global_batches(EpochOrder(COUNTS, seed, epoch, 8, 32), 2)

    assert steps(0, 0) == steps(0, 0)
    assert steps(0, 0) != steps(0, 1) and steps(0, 0) != steps(1, 0)
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


def test_the_window_shuffle_permutes_whole_windows_of_the_shard_ordered_stream() -> None:
    order = EpochOrder(COUNTS, seed=5, epoch=0, global_batch=4, window_rows=40)
    shard, row = order.stream()
    # Reference: the unshuffled stream, shard after shard in the epoch's shard order.
    plain = [(int(s), r) for s in order.shard_order() for r in range(COUNTS[s])]
    assert order.window_rows == 40
    for start in range(0, len(plain), 40):
        window = list(zip(shard[start:start + 40].tolist(), row[start:start + 40].tolist()))
        assert sorted(window) == sorted(plain[start:start + 40])
        assert window != plain[start:start + 40]
    assert len({s for s, _ in list(zip(shard.tolist(), row.tolist()))[:4]}) > 1  # a batch mixes shards


def test_window_rounds_to_whole_global_batches() -> None:
    assert EpochOrder(COUNTS, 0, 0, global_batch=8, window_rows=30).window_rows == 24
    assert EpochOrder(COUNTS, 0, 0, global_batch=8, window_rows=3).window_rows == 8
    with pytest.raises(ValueError, match="divisible"):
        WorkerPlan(EpochOrder(COUNTS, 0, 0, 8, 8), 0, 3)


def test_pair_overlap_counts_pairs_exactly() -> None:
    a = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    assert batch_pair_overlap(a, a, 6) == 1.0
    # Reference by hand: of A's 6 pairs, B keeps (0, 1) and (3, 4) together.
    b = [np.array([0, 1, 3]), np.array([2, 4, 5])]
    assert batch_pair_overlap(a, b, 6) == pytest.approx(2 / 6)
