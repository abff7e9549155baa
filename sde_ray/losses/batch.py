"""The contrastive batch of one step: this rank's queries, positives and explicit negatives with
their ids, and where the rank stands, split once from an objective's inputs.

An objective receives `(query, target, context)` with `target` in the per-query layout of
`sde_ray.losses.infonce` (row `i·(1+K)` is query i's positive, the next K its negatives) and
`context.target_ids` in the same layout. `ContrastiveBatch.of` undoes the layout once
(`ContrastiveObjective.forward` does it for every objective), and `info_nce` runs the symmetric loss
on the batch's features, so objectives that transform the features (noise, enhancement, projection
heads) swap them in with `replace` and keep the ids, rank and world size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sde_ray.losses.infonce import duplicate_groups, ids_with_negatives, info_nce, split_negatives


@dataclass(frozen=True)
class ContrastiveBatch:
    query: torch.Tensor  # (B × d) this rank's queries, on the features' device
    positives: torch.Tensor  # (B × d) their positive targets
    negatives: torch.Tensor | None = None  # (B·K × d) explicit negatives, query by query; None: K = 0
    ids: torch.Tensor | None = None  # (B,) int64 ids of the positives (duplicate handling), on their device
    negative_ids: torch.Tensor | None = None  # (B·K,) ids of the negatives
    rank: int = 0
    world_size: int = 1

    @classmethod
    def of(cls, query: torch.Tensor, target: torch.Tensor, context=None) -> ContrastiveBatch:
        """The batch of an objective's inputs (`context`: a `StepContext`, or None for rank 0 of 1
        without ids)."""
        positives, negatives, ids, negative_ids = split_negatives(
            query, target, None if context is None else context.target_ids)
        where = {} if context is None else {"rank": context.rank, "world_size": context.world_size}
        return cls(query, positives, negatives, ids, negative_ids, **where)

    def replace(self, **features: torch.Tensor | None) -> ContrastiveBatch:
        """The same rows with other features (`query=`, `positives=`, `negatives=`)."""
        return dataclasses.replace(self, **features)

    def info_nce(self, logit_scale: torch.Tensor | float, duplicates: str = "ignore",
                 normalize: bool = False) -> torch.Tensor:
        """Symmetric InfoNCE of this rank's rows against the global batch (`infonce.info_nce`)."""
        return info_nce(self.query, self.positives, logit_scale, rank=self.rank, world_size=self.world_size,
                        target_ids=self.ids, duplicates=duplicates, negatives=self.negatives,
                        negative_ids=self.negative_ids, normalize=normalize)


def step_target_ids(target_ids: torch.Tensor | None, negative_ids: torch.Tensor | None = None,
                    query_ids: torch.Tensor | None = None, rank: int = 0, world_size: int = 1) -> torch.Tensor | None:
    """`StepContext.target_ids` of a local batch: one id per target row in the per-query layout.
    With `query_ids` (`loss.duplicate_key=pair`), rows that share a query or a target share their
    positives (`infonce.duplicate_groups`: one all-gather of the ids, every rank calls it)."""
    if target_ids is not None and query_ids is not None:
        target_ids, negative_ids = duplicate_groups(query_ids, target_ids, rank, world_size, negative_ids)
    return ids_with_negatives(target_ids, negative_ids)


class ContrastiveObjective(torch.nn.Module):
    """An objective over a `ContrastiveBatch`: `forward(query, target, context)` (the objectives'
    common call, see `sde_ray.losses`) splits the batch once and returns `contrastive(batch, context)`,
    `(loss, metrics)`."""

    def forward(self, query: torch.Tensor, target: torch.Tensor, context):
        return self.contrastive(ContrastiveBatch.of(query, target, context), context)

    def contrastive(self, batch: ContrastiveBatch, context) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
