"""DisNCL: soft targets, pair confidence, the invariant/exclusive decorrelation and the full loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sde_ray.losses import StepContext
from sde_ray.losses.disncl import DisNCLObjective, cross_correlation_penalty, pair_confidence, soft_targets
from sde_ray.losses.infonce import info_nce


def _objective(**overrides) -> DisNCLObjective:
    settings = dict(
        embed_dim=8,
        invariant_fraction=0.5,
        smoothing=0.1,
        soft_temperature=0.1,
        mismatch_temperature=0.1,
        mismatch_warmup=0.1,
        w_exclusive=0.1,
        temperature=0.05,
        learnable_temperature=False,
    )
    settings.update(overrides)
    return DisNCLObjective(**settings)


def test_soft_targets_are_distributions_and_one_hot_without_smoothing():
    torch.manual_seed(0)
    features = F.normalize(torch.randn(6, 4), dim=-1)
    similarity = features @ features.T
    labels = torch.arange(6)
    for smoothing in (0.0, 0.3, 1.0):
        targets = soft_targets(similarity, labels, smoothing, 0.1)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        assert (targets >= 0).all()
    torch.testing.assert_close(soft_targets(similarity, labels, 0.0, 0.1), torch.eye(6))


def test_soft_targets_share_mass_between_duplicates():
    base = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    similarity = base @ base.T
    similarity[0, 2] = similarity[2, 0] = 1.0  # sample 2 is a duplicate of sample 0
    targets = soft_targets(similarity, torch.arange(3), 0.5, 0.01)
    # row 0: 0.5 on itself plus 0.5 split evenly between the two identical samples
    torch.testing.assert_close(targets[0], torch.tensor([0.75, 0.0, 0.25]), atol=1e-6, rtol=0)


def test_pair_confidence_singles_out_a_swapped_pair():
    torch.manual_seed(0)
    query = F.normalize(torch.randn(8, 6), dim=-1)
    target = F.normalize(query + 0.05 * torch.randn(8, 6), dim=-1)
    target[[3, 5]] = target[[5, 3]]  # two mismatched correspondences
    labels = torch.arange(8)
    weights = pair_confidence(query @ target.T, target @ query.T, labels, 0.1)
    clean = [i for i in range(8) if i not in (3, 5)]
    assert weights[[3, 5]].max() < 0.05 < 0.8 < weights[clean].min()
    similarity = (query @ target.T).tolist()
    for i in range(8):
        hardest = max(max(similarity[i][j], similarity[j][i]) for j in range(8) if j != i)
        reference = 1.0 / (1.0 + torch.exp(torch.tensor(-(similarity[i][i] - hardest) / 0.1)))
        assert float(weights[i]) == pytest.approx(float(reference), rel=1e-5)


def test_cross_correlation_penalty_known_values():
    invariant = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    uncorrelated = torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])  # the product column: orthogonal to both
    assert float(cross_correlation_penalty(invariant, uncorrelated, 1)) == pytest.approx(0.0, abs=1e-10)
    # exclusive = a copy of the invariant part: correlation matrix I (2 × 2), mean of squares 1/2
    assert float(cross_correlation_penalty(invariant, invariant.clone(), 1)) == pytest.approx(0.5, rel=1e-5)
    assert float(cross_correlation_penalty(invariant, invariant[:, :0], 1)) == 0.0


def test_without_smoothing_or_weighting_alignment_is_infonce_on_the_invariant_part():
    torch.manual_seed(0)
    query, target = torch.randn(10, 8), torch.randn(10, 8)
    objective = _objective(smoothing=0.0, w_exclusive=0.0)
    loss, metrics = objective(query, target, StepContext(progress=0.0))  # inside the mismatch warm-up
    reference = info_nce(F.normalize(query[:, :4], dim=-1), F.normalize(target[:, :4], dim=-1), 20.0)
    torch.testing.assert_close(loss, reference)
    assert metrics["pair_weight_min"] == 1.0


def test_exclusive_dimensions_only_enter_through_the_decorrelation():
    torch.manual_seed(0)
    query, target = torch.randn(10, 8), torch.randn(10, 8)
    objective = _objective(w_exclusive=0.0)
    context = StepContext(progress=0.5)
    loss, _ = objective(query, target, context)
    changed_query = query.clone()
    changed_query[:, 4:] = torch.randn(10, 4)
    torch.testing.assert_close(objective(changed_query, target, context)[0], loss)


def test_down_weighting_reduces_the_loss_of_a_noisy_batch():
    torch.manual_seed(0)
    query = torch.randn(16, 8)
    target = query + 0.05 * torch.randn(16, 8)
    target[[2, 9]] = target[[9, 2]]
    loss_weighted, metrics = _objective()(query, target, StepContext(progress=0.5))
    loss_plain, _ = _objective()(query, target, StepContext(progress=0.05))
    assert metrics["pair_weight_min"] < 0.05
    assert float(loss_weighted) < float(loss_plain)


def test_invalid_settings_are_rejected_by_name():
    with pytest.raises(ValueError, match="invariant_fraction"):
        _objective(invariant_fraction=0.0)
    with pytest.raises(ValueError, match="smoothing must be in"):
        soft_targets(torch.zeros(2, 2), torch.arange(2), 1.5, 0.1)
