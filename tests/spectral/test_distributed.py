"""Distributed spectral stage on 2 gloo ranks equals one process on the concatenated batch.

Checks gather mode and Gram mode: the same σ and M as a single-process SVD, and the SDE loss (mean
over ranks) and rank-averaged parameter gradients equal to the single-process ones, for random and
adversarial strong perturbations and both subspace forms; and, on a rank-deficient batch with fewer
rows than dimensions, the SDE feature gradients for both routes, both partitions, with and without
explicit negatives, against one float64 process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import gloo_workers

from sde_ray.spectral import enhancement_matrix, svd_spectrum

NUM_ROWS, IN_DIM = 48, 24


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return gloo_workers.launch(
        gloo_workers.spectral_worker, tmp_path_factory.mktemp("spectral"), NUM_ROWS, IN_DIM
    )


def test_gather_and_gram_match_single_process_spectrum(ranks):
    inputs = gloo_workers.global_inputs(NUM_ROWS, IN_DIM, seed=0)
    reference = svd_spectrum(inputs["query"].double())
    scale = torch.linspace(-0.3, 0.3, min(NUM_ROWS, IN_DIM)).double()
    reference_matrix = enhancement_matrix(reference.basis, scale)
    for result in ranks:
        for mode in ("gather", "gram"):
            torch.testing.assert_close(
                result[f"{mode}_sigma"].double(), reference.sigma, rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                result[f"{mode}_matrix"].double(), reference_matrix, rtol=1e-4, atol=1e-4
            )
    # Both ranks hold the identical spectrum (the partition and ξ must agree across ranks).
    assert torch.equal(ranks[0]["gram_sigma"], ranks[1]["gram_sigma"])
    assert torch.equal(ranks[0]["gather_sigma"], ranks[1]["gather_sigma"])


@pytest.mark.parametrize("case", gloo_workers.sde_cases(), ids="-".join)
def test_sde_loss_and_gradients_match_single_process(ranks, case):
    inputs = gloo_workers.global_inputs(NUM_ROWS, IN_DIM, seed=0)
    single = gloo_workers.run_sde(inputs, gloo_workers.sde_config(*case), rank=0, world_size=1)
    per_rank = [result[case] for result in ranks]
    mean_loss = sum(r["loss"] for r in per_rank) / len(per_rank)
    torch.testing.assert_close(mean_loss, single["loss"], rtol=1e-5, atol=1e-6)
    mean_grad = sum(r["weight_grad"] for r in per_rank) / len(per_rank)
    torch.testing.assert_close(mean_grad, single["weight_grad"], rtol=1e-4, atol=1e-6)
    mean_scale_grad = sum(r["scale_grad"] for r in per_rank) / len(per_rank)
    torch.testing.assert_close(mean_scale_grad, single["scale_grad"], rtol=1e-4, atol=1e-6)
    # The structure seen by every rank is the single-process one.
    for name in ("num_strong_q", "num_weak_q", "num_noise_q", "num_strong_t", "spectral_mode_gram"):
        assert per_rank[0]["metrics"][name] == per_rank[1]["metrics"][name] == single["metrics"][name]
    assert single["metrics"]["num_strong_q"] + single["metrics"]["num_weak_q"] > 0


@pytest.mark.parametrize("case", gloo_workers.deficient_cases(), ids="-".join)
def test_sde_feature_gradients_on_a_rank_deficient_batch_match_one_float64_process(ranks, case):
    """N < d and repeated targets (synthetic MMEB's regime): the target spectrum has numerically-zero
    singular values, whose singular vectors are whatever the decomposition's rounding returned, and
    V does not span R^d. The loss and its gradient must not depend on either. The reference runs in
    float64 on the concatenated batch, so its decomposition rounds differently from the ranks' float32
    one in gather mode too (the gathered matrix is bitwise the concatenated one).

    Each rank's feature gradient is Σ over ranks of d loss_r / d its rows (the all-gather's backward);
    DeepSpeed averages parameter gradients over ranks, so gradient / world size is the single-process
    gradient of the mean loss for those rows."""
    inputs = gloo_workers.deficient_inputs(gloo_workers.DEFICIENT_ROWS, gloo_workers.DEFICIENT_DIM)
    single = gloo_workers.run_sde_on_features(inputs, case, rank=0, world_size=1, dtype=torch.float64)
    per_rank = [result[case] for result in ranks]
    world_size = len(per_rank)
    assert single["metrics"]["num_strong_t"] + single["metrics"]["num_weak_t"] > 0
    assert single["metrics"]["num_noise_t"] > single["metrics"]["num_strong_t"] + single["metrics"]["num_weak_t"]
    for name in ("num_strong_q", "num_weak_q", "num_strong_t", "num_weak_t", "spectral_mode_gram"):
        assert per_rank[0]["metrics"][name] == per_rank[1]["metrics"][name] == single["metrics"][name], name
    mean_loss = sum(r["loss"] for r in per_rank) / world_size
    torch.testing.assert_close(mean_loss.double(), single["loss"], rtol=1e-5, atol=1e-6)
    keys = ["query_grad", "target_grad"] + (["negative_grad"] if case[2] == "negatives" else [])
    for key in keys:
        got = torch.cat([r[key] for r in per_rank]).double() / world_size
        scale = float(single[key].abs().max())
        torch.testing.assert_close(got, single[key], rtol=0, atol=1e-4 * scale, msg=lambda m, k=key: f"{k}: {m}")
    mean_scale_grad = sum(r["scale_grad"] for r in per_rank) / world_size
    torch.testing.assert_close(mean_scale_grad.double(), single["scale_grad"].double(), rtol=1e-4, atol=1e-6)
