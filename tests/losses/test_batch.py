"""The contrastive batch split from an objective's inputs, checked against hand-laid rows and ids."""

from __future__ import annotations

import torch

from sde_ray.losses import StepContext
from sde_ray.losses.batch import ContrastiveBatch, step_target_ids
from sde_ray.losses.infonce import with_negatives


def test_the_batch_undoes_the_per_query_layout_of_features_and_ids():
    query = torch.arange(6.0).view(2, 3)
    target = torch.arange(18.0).view(6, 3)  # query 0: rows 0 (positive), 1, 2; query 1: rows 3, 4, 5
    context = StepContext(rank=1, world_size=3, target_ids=torch.tensor([10, 11, 12, 20, 21, 22]))
    batch = ContrastiveBatch.of(query, target, context)
    assert torch.equal(batch.positives, target[[0, 3]]) and torch.equal(batch.negatives, target[[1, 2, 4, 5]])
    assert batch.ids.tolist() == [10, 20] and batch.negative_ids.tolist() == [11, 12, 21, 22]
    assert (batch.rank, batch.world_size) == (1, 3)
    assert torch.equal(with_negatives(batch.positives, batch.negatives), target)
    swapped = batch.replace(query=-query)
    assert torch.equal(swapped.query, -query) and swapped.ids is batch.ids and swapped.negatives is batch.negatives

    plain = ContrastiveBatch.of(query, target[[0, 3]])
    assert plain.negatives is None and plain.ids is None and (plain.rank, plain.world_size) == (0, 1)


def test_step_target_ids_lay_out_negatives_and_join_rows_sharing_a_query():
    targets, negatives = torch.tensor([10, 20, 30]), torch.tensor([[11], [21], [10]])
    assert step_target_ids(targets, negatives).tolist() == [10, 11, 20, 21, 30, 10]
    # Rows 0 and 1 share query 5: one group, named by its smallest target id (20 -> 10); the
    # negative 10 of row 2 is row 0's target, so it maps to that group too.
    grouped = step_target_ids(targets, negatives, query_ids=torch.tensor([5, 5, 7]))
    assert grouped.tolist() == [10, 11, 10, 21, 30, 10]
    assert step_target_ids(None, negatives) is None and step_target_ids(targets).tolist() == [10, 20, 30]
