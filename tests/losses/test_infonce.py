"""InfoNCE over the global batch: 2 gloo ranks vs one process vs open_clip's ClipLoss; duplicate modes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "spectral"))
import gloo_workers

from sde_ray.losses.infonce import info_nce

NUM_ROWS, IN_DIM = 24, 8


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_workers.launch(
        gloo_workers.infonce_worker, tmp_path_factory.mktemp("infonce"), NUM_ROWS, IN_DIM
    )


def _single(name: str) -> dict:
    inputs = gloo_workers.global_inputs(NUM_ROWS, IN_DIM, seed=1)
    weight = inputs["weight"].clone().requires_grad_()
    query = F.normalize(inputs["query"] @ weight, dim=-1)
    target = F.normalize(inputs["target"] @ weight, dim=-1)
    if name == "open_clip":
        loss = gloo_workers.load_open_clip_loss().ClipLoss()(query, target, torch.tensor(20.0))
    elif name == "ours":
        loss = info_nce(query, target, 20.0)
    else:
        loss = info_nce(
            query, target, 20.0, target_ids=inputs["target_ids"], duplicates=name.removeprefix("ours_")
        )
    loss.backward()
    return {"loss": loss.detach(), "weight_grad": weight.grad}


def _rank_mean(ranks, name, key):
    return sum(r[name][key] for r in ranks) / len(ranks)


@pytest.mark.parametrize("name", ["ours", "ours_multi_positive", "ours_mask"])
def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks, name):
    single = _single(name)
    torch.testing.assert_close(_rank_mean(ranks, name, "loss"), single["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        _rank_mean(ranks, name, "weight_grad"), single["weight_grad"], rtol=1e-4, atol=1e-6
    )


def test_matches_open_clip_clip_loss_local_loss_gather_with_grad(ranks):
    for rank_result in ranks:
        torch.testing.assert_close(rank_result["ours"]["loss"], rank_result["open_clip"]["loss"])
        torch.testing.assert_close(
            rank_result["ours"]["weight_grad"], rank_result["open_clip"]["weight_grad"]
        )
    # open_clip single-process equals ours single-process too.
    torch.testing.assert_close(_single("ours")["loss"], _single("open_clip")["loss"])
    # The ranks really saw different rows (otherwise the comparison would be vacuous).
    assert not torch.allclose(ranks[0]["ours"]["loss"], ranks[1]["ours"]["loss"])


def test_duplicate_target_modes_on_a_hand_case():
    # Three pairs; targets 0 and 1 are the same content (same id). Logits chosen by hand.
    query = torch.eye(3)
    target = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ids = torch.tensor([5, 5, 9])
    scale = 1.0

    # Row i of q→t logits is q_i·t_j: row0 = [1, 1, 0], row1 = [0, 0, 0], row2 = [0, 0, 1].
    def ce(logits, label):
        return -logits[label] + math.log(sum(math.exp(v) for v in logits))

    q2t = [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    t2q = [[1, 0, 0], [1, 0, 0], [0, 0, 1]]  # t_i·q_j
    ignore = 0.5 * (sum(ce(q2t[i], i) for i in range(3)) + sum(ce(t2q[i], i) for i in range(3))) / 3
    # mask: the other copy of the same target is dropped from the denominator.
    masked = [[1, None, 0], [None, 0, 0], [0, 0, 1]]

    def ce_masked(row, label):
        return -row[label] + math.log(sum(math.exp(v) for v in row if v is not None))

    t2q_masked = [[1, None, 0], [None, 0, 0], [0, 0, 1]]
    mask = (
        0.5
        * (
            sum(ce_masked(masked[i], i) for i in range(3))
            + sum(ce_masked(t2q_masked[i], i) for i in range(3))
        )
        / 3
    )

    # multi_positive: −log of the total probability of every copy of the positive.
    def multi(row, positives):
        return -math.log(sum(math.exp(row[j]) for j in positives) / sum(math.exp(v) for v in row))

    positives = [[0, 1], [0, 1], [2]]
    multi_positive = (
        0.5
        * (
            sum(multi(q2t[i], positives[i]) for i in range(3))
            + sum(multi(t2q[i], positives[i]) for i in range(3))
        )
        / 3
    )
    for mode, expected in (("ignore", ignore), ("mask", mask), ("multi_positive", multi_positive)):
        got = info_nce(query, target, scale, target_ids=ids, duplicates=mode)
        assert math.isclose(float(got), expected, rel_tol=1e-6), mode
    assert multi_positive < mask < ignore


def test_unknown_duplicate_mode_is_rejected():
    with pytest.raises(ValueError, match="duplicates"):
        info_nce(torch.eye(2), torch.eye(2), 1.0, target_ids=torch.tensor([0, 0]), duplicates="bogus")


def test_normalize_is_cosine_logits_of_the_raw_rows():
    """`normalize=True` equals InfoNCE on rows L2-normalised by hand, explicit negatives included."""
    g = torch.Generator().manual_seed(3)
    query, target, negatives = (torch.randn(rows, 5, generator=g) * 4 for rows in (6, 6, 12))
    ids, negative_ids = torch.arange(6) % 4, torch.arange(12) % 4
    for duplicates in ("ignore", "mask", "multi_positive"):
        by_hand = info_nce(F.normalize(query, dim=-1), F.normalize(target, dim=-1), 10.0, 0, 1, ids, duplicates,
                           F.normalize(negatives, dim=-1), negative_ids)
        assert torch.equal(info_nce(query, target, 10.0, 0, 1, ids, duplicates, negatives, negative_ids,
                                    normalize=True), by_hand)
        manual_norm = query / query.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(info_nce(manual_norm, target / target.norm(dim=-1, keepdim=True), 10.0),
                                   info_nce(query, target, 10.0, normalize=True))
