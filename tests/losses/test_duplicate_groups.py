"""Rows that share a query share their positives: `duplicate_groups` and the InfoNCE it feeds, against
a false-negative mask built by hand from what each row shows (no ids involved).

The tiny batch mixes the two directions of a classification set, as the digits check does: image ->
label text rows (many rows per label) and label text -> image rows (the label text repeats as the
query). Target hashes alone find the duplicates of the first kind only.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sde_ray.losses.infonce import _components, duplicate_groups, info_nce

# (kind, digit, image index) per row: "i2t" = query image `index` of `digit`, target the label text;
# "t2i" = query the label text, target image `index`.
ROWS = [("i2t", 3, 0), ("i2t", 3, 1), ("i2t", 5, 2), ("t2i", 3, 3), ("t2i", 3, 4), ("t2i", 5, 5),
        ("i2t", 5, 6), ("t2i", 3, 7), ("t2i", 7, 8), ("i2t", 7, 9)]


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    """Content ids as the processor makes them: equal content, equal id (arbitrary large values)."""
    def cid(*parts) -> int:
        return hash(parts) & (2**62 - 1)
    query = [cid("img", i) if k == "i2t" else cid("label-query", d) for k, d, i in ROWS]
    target = [cid("label", d) if k == "i2t" else cid("img-target", i) for k, d, i in ROWS]
    return torch.tensor(query), torch.tensor(target)


def _false_negative(i: int, j: int) -> bool:
    """By hand: row j's target is also a right answer for row i's query (and row i's target for row
    j's query): the same kind of pair with the same digit, j != i."""
    return i != j and ROWS[i][0] == ROWS[j][0] and ROWS[i][1] == ROWS[j][1]


def _features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(len(ROWS), 6, generator=generator), dim=-1)
    t = F.normalize(torch.randn(len(ROWS), 6, generator=generator), dim=-1)
    return q, t


def test_groups_join_rows_that_share_a_query_or_a_target() -> None:
    query, target = _ids()
    groups, _ = duplicate_groups(query, target)
    same = (groups[:, None] == groups[None, :]).numpy()
    expected = np.array([[i == j or _false_negative(i, j) for j in range(len(ROWS))] for i in range(len(ROWS))])
    assert (same == expected).all()
    # Target ids alone miss the label text -> image duplicates (their target images all differ).
    by_target = (target[:, None] == target[None, :]).numpy()
    t2i = [r for r, row in enumerate(ROWS) if row[0] == "t2i"]
    assert not by_target[np.ix_(t2i, t2i)][~np.eye(len(t2i), dtype=bool)].any()
    assert expected[np.ix_(t2i, t2i)][~np.eye(len(t2i), dtype=bool)].any()


def test_components_are_transitive_and_named_by_their_smallest_target() -> None:
    # a-b share a query, b-c share a target, c-d share a query: one component; e alone.
    query = torch.tensor([1, 1, 2, 2, 9])
    target = torch.tensor([50, 40, 40, 30, 70])
    assert _components(query, target).tolist() == [30, 30, 30, 30, 70]


def _hand_loss(q: torch.Tensor, t: torch.Tensor, scale: float, mode: str) -> torch.Tensor:
    n = len(ROWS)
    logits = scale * q @ t.T
    total = 0.0
    for lg in (logits, logits.T):  # q -> t, then t -> q; the relation is symmetric
        rows = []
        for i in range(n):
            duplicates = [j for j in range(n) if _false_negative(i, j)]
            if mode == "mask":
                kept = [j for j in range(n) if j not in duplicates]
                rows.append(torch.logsumexp(lg[i, kept], 0) - lg[i, i])
            else:
                positives = [i] + duplicates
                rows.append(torch.logsumexp(lg[i], 0) - torch.logsumexp(lg[i, positives], 0))
        total = total + torch.stack(rows).mean()
    return total / 2


def test_mask_and_multi_positive_match_a_hand_built_mask() -> None:
    q, t = _features()
    query, target = _ids()
    groups, _ = duplicate_groups(query, target)
    for mode in ("mask", "multi_positive"):
        ours = info_nce(q, t, 5.0, target_ids=groups, duplicates=mode)
        assert math.isclose(float(ours), float(_hand_loss(q, t, 5.0, mode)), rel_tol=1e-6)
        # The target ids alone leave the label text -> image duplicates among the negatives.
        by_target = info_nce(q, t, 5.0, target_ids=target, duplicates=mode)
        assert abs(float(by_target) - float(ours)) > 1e-3


def test_negative_ids_map_into_the_groups() -> None:
    query, target = _ids()
    groups, mapped = duplicate_groups(query, target, negative_ids=torch.stack([target[1], torch.tensor(12345)])[None])
    assert mapped.shape == (1, 2)
    assert mapped[0, 0] == groups[1]  # a negative equal to row 1's target joins row 1's group
    assert mapped[0, 1] == 12345 and not (groups == 12345).any()  # an unrelated negative stays unrelated
