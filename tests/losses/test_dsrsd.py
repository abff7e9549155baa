"""DSRSD-Net: streams, orthogonality, decorrelation and the assembled loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sde_ray.losses import StepContext
from sde_ray.losses.dsrsd import DSRSDObjective, dual_streams, off_diagonal_correlation, orthogonality_loss
from sde_ray.losses.infonce import info_nce


def _objective(**overrides) -> DSRSDObjective:
    settings = dict(
        embed_dim=8,
        shared_dim=3,
        w_decorrelation=0.05,
        w_orthogonality=0.05,
        w_regression=0.1,
        w_instance=1.0,
        temperature=0.05,
        learnable_temperature=False,
        duplicates="ignore",
    )
    settings.update(overrides)
    return DSRSDObjective(**settings)


def test_orthogonality_loss_is_zero_for_orthogonal_streams_and_cos_squared_otherwise():
    shared = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    private = torch.tensor([[0.0, 3.0, 1.0], [1.0, 0.0, -4.0]])
    assert float(orthogonality_loss(shared, private)) == 0.0
    tilted = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])  # cos² = 1/2 on the first row, 1 on the second
    assert float(orthogonality_loss(shared, tilted)) == pytest.approx(0.75)


def test_an_orthonormal_head_splits_features_into_orthogonal_streams():
    torch.manual_seed(0)
    head, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    features = torch.randn(20, 8, dtype=torch.float64)
    factors, shared, private = dual_streams(features, head.T)
    torch.testing.assert_close(shared + private, features)
    torch.testing.assert_close(factors, features @ head)
    assert float(orthogonality_loss(shared, private)) < 1e-20
    # a head that is not a projection (rows of norm √2) leaves them correlated: s = 2fP, p = f − 2fP
    _, shared, private = dual_streams(features, np.sqrt(2.0) * head.T)
    projected = features @ head @ head.T
    expected_cos2 = (-2.0 * projected.pow(2).sum(-1)).pow(2) / (
        (2.0 * projected).pow(2).sum(-1) * (features - 2.0 * projected).pow(2).sum(-1)
    )
    assert float(orthogonality_loss(shared, private)) == pytest.approx(float(expected_cos2.mean()), rel=1e-10)


def test_off_diagonal_correlation_matches_numpy():
    torch.manual_seed(0)
    factors = torch.randn(50, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
    correlation = np.corrcoef(factors.numpy(), rowvar=False)
    off_diagonal = correlation[~np.eye(4, dtype=bool)]
    assert float(off_diagonal_correlation(factors)) == pytest.approx(
        float(np.mean(off_diagonal**2)), rel=1e-5
    )


def test_off_diagonal_correlation_known_values():
    x = torch.tensor([1.0, -1.0, 1.0, -1.0])
    y = torch.tensor([1.0, 1.0, -1.0, -1.0])
    assert float(off_diagonal_correlation(torch.stack([x, y], 1))) == pytest.approx(0.0, abs=1e-10)
    # [x, x, y]: the pair (x, x) correlates fully: 2 of 6 off-diagonal entries are 1
    assert float(off_diagonal_correlation(torch.stack([x, x, y], 1))) == pytest.approx(1 / 3, rel=1e-5)


def test_with_only_the_contrastive_term_the_loss_is_infonce_on_shared_factors():
    torch.manual_seed(0)
    query, target = torch.randn(12, 8), torch.randn(12, 8)
    objective = _objective(w_decorrelation=0.0, w_orthogonality=0.0, w_regression=0.0, w_instance=0.0)
    loss, metrics = objective(query, target, StepContext())
    reference = info_nce(
        F.normalize(query @ objective.query_head.detach().T, dim=-1),
        F.normalize(target @ objective.target_head.detach().T, dim=-1),
        20.0,
    )
    torch.testing.assert_close(loss.detach(), reference)
    assert metrics["loss_orthogonality"] < 1e-10  # heads start orthonormal


def test_regression_vanishes_when_shared_factors_agree():
    torch.manual_seed(0)
    objective = _objective()
    with torch.no_grad():
        objective.target_head.copy_(objective.query_head)
    features = torch.randn(12, 8)
    _, metrics = objective(features, features.clone(), StepContext())
    assert metrics["loss_regression"] < 1e-12


def test_heads_are_trained_by_the_loss():
    objective = _objective()
    loss, _ = objective(torch.randn(12, 8), torch.randn(12, 8), StepContext())
    loss.backward()
    assert objective.query_head.grad.abs().sum() > 0 and objective.target_head.grad.abs().sum() > 0


def test_bad_shared_dim_is_rejected_by_name():
    with pytest.raises(ValueError, match="shared_dim must be in"):
        _objective(shared_dim=9)
