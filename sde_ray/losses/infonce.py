"""Symmetric InfoNCE over the global batch, with all-gather-with-gradient semantics.

Each rank holds `B` local rows. The features of every rank are gathered in rank order with a
gradient-carrying all-gather, and each rank computes the loss of its own rows against the whole
global batch (open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`). The mean of the per-
rank losses equals the single-process loss on the concatenated batch, and gradients averaged across
ranks (what DDP and DeepSpeed do) equal the single-process gradients.

Identical targets (same content hash) are a problem in MMEB's classification and VQA subsets: a
large batch holds many "negatives" equal to the positive. `duplicates` chooses what to do with them:
`ignore` (plain one-hot InfoNCE), `mask` (drop them from the negatives), `multi_positive` (the loss is
−log of the total probability of all identical targets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sde_ray.distributed import gather_no_grad, gather_with_grad


def _directional_loss(
    logits: torch.Tensor, labels: torch.Tensor, same_target: torch.Tensor | None, duplicates: str
) -> torch.Tensor:
    if same_target is None or duplicates == "ignore":
        return F.cross_entropy(logits, labels)
    is_label = F.one_hot(labels, logits.shape[1]).bool()
    if duplicates == "mask":
        return F.cross_entropy(logits.masked_fill(same_target & ~is_label, float("-inf")), labels)
    if duplicates == "multi_positive":
        positives = same_target | is_label
        log_all = torch.logsumexp(logits, dim=1)
        log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
        return (log_all - log_pos).mean()
    raise ValueError(f"unknown duplicates mode {duplicates!r}; valid: ignore, mask, multi_positive")


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor | float,
    rank: int = 0,
    world_size: int = 1,
    target_ids: torch.Tensor | None = None,
    duplicates: str = "ignore",
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the global batch.

    `query`, `target`: local (B × d) features, already normalised if cosine logits are wanted.
    `logit_scale`: 1/τ. `target_ids`: optional (B,) int64 content hashes of the targets, used by
    the `mask` and `multi_positive` duplicate modes. Returns this rank's loss; its mean over ranks is
    the global loss.
    """
    all_query = gather_with_grad(query, world_size)
    all_target = gather_with_grad(target, world_size)
    local = query.shape[0]
    labels = torch.arange(local, device=query.device) + local * rank
    logits_q2t = logit_scale * query @ all_target.T
    logits_t2q = logit_scale * target @ all_query.T
    same_target = None
    if target_ids is not None and duplicates != "ignore":
        all_ids = gather_no_grad(target_ids, world_size)
        same_target = target_ids[:, None] == all_ids[None, :]
    return 0.5 * (
        _directional_loss(logits_q2t, labels, same_target, duplicates)
        + _directional_loss(logits_t2q, labels, same_target, duplicates)
    )
