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

Identical queries are the same problem seen from the other side: a label text → image subset (the
T→I direction of a classification set) repeats each label text as the query of many rows, whose
target images are then all positives of it, while their target hashes all differ. `duplicate_groups`
turns (query id, target id) pairs into positive groups — rows joined when they share their query or
their target, transitively (the connected rows of the global batch) — and returns one group id per
row, to be passed as `target_ids` (`loss.duplicate_key=pair`, the default; `target` keeps the ids).

Explicit negatives (MMEB-train's `neg_*` columns or mined ones, `loss.negatives_per_query`) travel
as more target rows: an objective's `target` is then `(B·(1+K)) × d`, laid out per query (row
`i·(1+K)` is query i's positive, the next K rows its negatives), so cutting a batch into chunks of
queries keeps each query's negatives with it (GradCache needs no special case). `split_negatives`
undoes the layout. Every rank's negatives are gathered with gradients and *shared*: query i's q→t
logits are `[all N global positives ; all N·K global negatives]` (Tevatron/VLM2Vec's convention),
so one more negative per query adds N candidates to every row. The t→q direction is unchanged:
negatives are targets, not queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sde_ray.distributed import gather_no_grad, gather_with_grad


def split_negatives(
    query: torch.Tensor, target: torch.Tensor, target_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`(positives (B×d), negatives (B·K×d) or None, positive ids (B,), negative ids (B·K,))` from an
    objective's `target` in the per-query layout above (K = 0 when `target` has B rows).

    `target_ids`, when given, has one id per target row in the same layout.
    """
    rows, total = query.shape[0], target.shape[0]
    if query.dim() != 2 or target.dim() != 2 or rows == 0 or total % rows or query.shape[1] != target.shape[1]:
        raise ValueError(
            f"target must have the same shape as query (B × d), or B·(1+K) rows with K explicit negatives "
            f"per query, got "
            f"query {tuple(query.shape)} and target {tuple(target.shape)}"
        )
    if target_ids is not None and target_ids.shape[0] not in (rows, total):
        raise ValueError(f"target_ids has {target_ids.shape[0]} entries; expected {rows} or {total}")
    group = total // rows
    if group == 1:
        return target, None, target_ids, None
    grouped = target.view(rows, group, -1)
    positives, negatives = grouped[:, 0], grouped[:, 1:].reshape(rows * (group - 1), -1)
    if target_ids is None or target_ids.shape[0] == rows:
        return positives, negatives, target_ids, None
    ids = target_ids.view(rows, group)
    return positives, negatives, ids[:, 0], ids[:, 1:].reshape(-1)


def with_negatives(positives: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
    """The inverse of `split_negatives` for the features: back to the per-query layout."""
    if negatives is None:
        return positives
    rows = positives.shape[0]
    grouped = negatives.view(rows, -1, positives.shape[1])
    return torch.cat([positives[:, None], grouped], dim=1).reshape(-1, positives.shape[1])


def ids_with_negatives(target_ids: torch.Tensor | None, negative_ids: torch.Tensor | None) -> torch.Tensor | None:
    """(B,) positive ids and (B, K) negative ids -> (B·(1+K),) ids in the per-query layout."""
    if target_ids is None or negative_ids is None:
        return target_ids
    return torch.cat([target_ids[:, None], negative_ids.view(target_ids.shape[0], -1)], dim=1).reshape(-1)


_NO_LABEL = torch.iinfo(torch.int64).max


def _components(query_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """For each row, the smallest target id of its connected component, where rows are joined when
    they share a query id or a target id (label propagation, one pass per side until stable)."""
    label = target_ids.clone()
    inverses = [torch.unique(ids, return_inverse=True)[1] for ids in (query_ids, target_ids)]
    while True:
        previous = label
        for inverse in inverses:
            smallest = torch.full((int(inverse.max()) + 1,), _NO_LABEL, dtype=label.dtype, device=label.device)
            label = smallest.scatter_reduce(0, inverse, label, reduce="amin")[inverse]
        if torch.equal(label, previous):
            return label


def duplicate_groups(
    query_ids: torch.Tensor, target_ids: torch.Tensor, rank: int = 0, world_size: int = 1,
    negative_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(group id of each local row (B,), the negatives' ids mapped into the same id space).

    Two rows of the global batch are in one group when they share their query or their target, or
    are joined through a chain of such rows; then each row's target is a positive of every query in
    its group (query a = query b, whose positive is target b = target c, ...). A group's id is the
    smallest target id in it. An explicit negative whose id is some global row's target id gets that
    row's group id (so it still counts as a duplicate of a positive); any other negative keeps its id,
    which then matches no group (group ids are target ids of the batch). Every rank computes the same
    groups from the gathered ids.
    """
    all_queries = gather_no_grad(query_ids, world_size)
    all_targets = gather_no_grad(target_ids, world_size)
    groups = _components(all_queries, all_targets)
    local = target_ids.shape[0]
    mine = groups[rank * local:(rank + 1) * local]
    if negative_ids is None:
        return mine, None
    keys, order = torch.sort(all_targets)
    values = groups[order]
    flat = negative_ids.reshape(-1)
    where = torch.searchsorted(keys, flat).clamp(max=keys.numel() - 1)
    mapped = torch.where(keys[where] == flat, values[where], flat)
    return mine, mapped.reshape(negative_ids.shape)


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
    negatives: torch.Tensor | None = None,
    negative_ids: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the global batch.

    `query`, `target`: local (B × d) features; `normalize=True` L2-normalises them (and the
    negatives) first, for cosine logits of raw encoder features (what the objectives do).
    `logit_scale`: 1/τ. `target_ids`: optional (B,) int64 content hashes of the targets, used by
    the `mask` and `multi_positive` duplicate modes. `negatives`: optional (B·K × d) explicit
    negatives of this rank's queries (every rank the same K), appended to the q→t candidates of
    every query after gathering; `negative_ids` their content hashes (a negative identical to a
    query's positive is then masked or counted positive like any duplicate). Returns this rank's
    loss; its mean over ranks is the global loss.
    """
    if normalize:
        query, target = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    all_query = gather_with_grad(query, world_size)
    all_target = gather_with_grad(target, world_size)
    local = query.shape[0]
    labels = torch.arange(local, device=query.device) + local * rank
    candidates = all_target if negatives is None else torch.cat([all_target, gather_with_grad(negatives, world_size)])
    logits_q2t = logit_scale * query @ candidates.T
    logits_t2q = logit_scale * target @ all_query.T
    same_q2t = same_t2q = None
    if target_ids is not None and duplicates != "ignore":
        all_ids = gather_no_grad(target_ids, world_size)
        same_t2q = same_q2t = target_ids[:, None] == all_ids[None, :]
        if negatives is not None:
            if negative_ids is None:
                raise ValueError("duplicates mode with explicit negatives needs negative_ids")
            all_negative_ids = gather_no_grad(negative_ids, world_size)
            same_q2t = torch.cat([same_t2q, target_ids[:, None] == all_negative_ids[None, :]], dim=1)
    return 0.5 * (
        _directional_loss(logits_q2t, labels, same_q2t, duplicates)
        + _directional_loss(logits_t2q, labels, same_t2q, duplicates)
    )

