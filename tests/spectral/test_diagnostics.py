"""Energy shares, effective rank, modality-gap metrics against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sde_ray.spectral import (
    Partition,
    centroid_gap,
    effective_rank,
    energy_shares,
    modality_gap,
    principal_angles,
    smallest_principal_angle,
    top_subspace,
)


def test_energy_shares_sum_to_one():
    sigma = torch.tensor([3.0, 2.0, 1.0, 1.0])
    index = torch.arange(4)
    part = Partition(index < 1, index == 1, index >= 2, 0.0, 0.0, 0.0)
    shares = energy_shares(sigma, part)
    assert shares == pytest.approx({"strong": 9 / 15, "weak": 4 / 15, "noise": 2 / 15})
    assert energy_shares(torch.zeros(4), part) == {"strong": 0.0, "weak": 0.0, "noise": 0.0}


def test_effective_rank():
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    p = np.array([3.0, 1.0]) / 4
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()))


def test_principal_angles_against_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((20, 4)), rng.standard_normal((20, 4))
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    ours = principal_angles(torch.from_numpy(qa), torch.from_numpy(qb)).numpy()
    np.testing.assert_allclose(np.sort(ours), np.sort(scipy.linalg.subspace_angles(a, b)), atol=1e-10)
    assert smallest_principal_angle(torch.from_numpy(qa), torch.from_numpy(qa)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_centroid_gap_and_modality_gap():
    query = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2 → mean (0.5, 0.5)
    target = torch.tensor([[-1.0, 0.0], [-4.0, 0.0]])  # normalised: −e1 twice → mean (−1, 0)
    assert centroid_gap(query, target) == pytest.approx(math.hypot(1.5, 0.5))
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(50, 3, generator=g) @ torch.randn(3, 16, generator=g)
    gap = modality_gap(shared + 0.01 * torch.randn(50, 16, generator=g), shared + 1.0, k=3)
    assert set(gap) == {"centroid_distance", "min_principal_angle", "mean_principal_angle"}
    assert gap["min_principal_angle"] < 0.2 and gap["centroid_distance"] > 0
    assert top_subspace(shared, 3).shape == (16, 3)
