"""Modality-gap remedies and the `gap` objective; plus the checks every seed objective must pass
(training without NaN, and rank-mean loss / gradients on 2 gloo ranks equal to one process)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "spectral"))
import gloo_workers  # noqa: E402  (the shared 2-rank launcher)

from sde_ray.config import Config  # noqa: E402
from sde_ray.losses import StepContext, build_objective
from sde_ray.losses.gap import procrustes_rotation, shared_space_projection

SEED_OBJECTIVES = ("fanoise", "disncl", "dsrsd", "gap")


# ---------------------------------------------------------------------------------------------
# Procrustes


def test_procrustes_recovers_a_planted_rotation():
    torch.manual_seed(0)
    source = torch.randn(50, 8, dtype=torch.float64)
    planted = torch.from_numpy(scipy.stats.special_ortho_group.rvs(8, random_state=1))
    rotation = procrustes_rotation(source, source @ planted)
    torch.testing.assert_close(rotation, planted, atol=1e-10, rtol=0)


def test_procrustes_matches_scipy_on_noisy_pairs():
    torch.manual_seed(1)
    source, target = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    reference, _ = scipy.linalg.orthogonal_procrustes(source.numpy(), target.numpy())
    rotation = procrustes_rotation(source, target)
    np.testing.assert_allclose(rotation.numpy(), reference, atol=1e-10)
    torch.testing.assert_close(rotation.T @ rotation, torch.eye(6, dtype=torch.float64), atol=1e-12, rtol=0)


def test_procrustes_rejects_unpaired_input():
    with pytest.raises(ValueError, match="paired rows of equal shape"):
        procrustes_rotation(torch.randn(5, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        procrustes_rotation(torch.full((5, 3), float("nan")), torch.randn(5, 3))


# ---------------------------------------------------------------------------------------------
# Shared-space projection


def _two_modalities_with_a_gap(rows: int = 200, dims: int = 10, shared: int = 3, seed: int = 0):
    """Both modalities vary in the same 3 coordinates and sit at different offsets in two others."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.zeros(rows, dims, dtype=torch.float64)
    signal[:, :shared] = torch.randn(rows, shared, generator=generator, dtype=torch.float64)
    query, target = (
        signal.clone(),
        signal + 0.01 * torch.randn(rows, dims, generator=generator, dtype=torch.float64),
    )
    query[:, shared] += 2.0
    target[:, shared + 1] += 2.0
    return query, target


def test_shared_space_projection_finds_the_shared_coordinates_and_closes_the_gap():
    query, target = _two_modalities_with_a_gap()
    projector = shared_space_projection(query, target, 3)
    expected = torch.zeros(10, 10, dtype=torch.float64)
    expected[:3, :3] = torch.eye(3, dtype=torch.float64)
    torch.testing.assert_close(projector, expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(projector @ projector, projector, atol=1e-10, rtol=0)
    torch.testing.assert_close(projector, projector.T, atol=1e-12, rtol=0)
    gap_before = (query.mean(0) - target.mean(0)).norm()
    gap_after = (query.mean(0) @ projector - target.mean(0) @ projector).norm()
    assert gap_before == pytest.approx(2 * math.sqrt(2), rel=1e-2)
    assert gap_after < 1e-2


def test_shared_space_projection_rejects_an_impossible_rank():
    with pytest.raises(ValueError, match="shared-space rank k=6"):
        shared_space_projection(torch.randn(6, 8), torch.randn(6, 8), 6)


# ---------------------------------------------------------------------------------------------
# The gap objective


def _config(name: str, **sections) -> Config:
    config = Config()
    config.loss.name = name
    for key, value in sections.items():
        section, field = key.split("__")
        setattr(getattr(config.loss, section), field, value)
    return config


def test_gap_regulariser_vanishes_when_modalities_already_coincide():
    torch.manual_seed(0)
    features = torch.randn(16, 8)
    for remedy in ("procrustes", "shared_projection"):
        objective = build_objective(_config("gap", gap__remedy=remedy, gap__k=8), 8)
        _, metrics = objective(features, features.clone(), StepContext())
        assert metrics["loss_gap_remedy"] < 1e-10
        assert metrics["loss_gap_centroid"] < 1e-12
        assert metrics["gap_centroid"] < 1e-6


def test_gap_regulariser_measures_a_planted_rotation():
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(32, 6, dtype=torch.float64), dim=-1)
    planted = torch.from_numpy(scipy.stats.special_ortho_group.rvs(6, random_state=3))
    objective = build_objective(_config("gap", gap__remedy="procrustes"), 6).double()
    _, metrics = objective(query, query @ planted, StepContext())
    identity = torch.eye(6, dtype=torch.float64)
    # ½·mean‖q − qR‖² + ½·mean‖t − tRᵀ‖² with t = qR is mean‖q(I − R)‖².
    expected = (query @ (identity - planted)).pow(2).sum(-1).mean()
    assert metrics["loss_gap_remedy"] == pytest.approx(float(expected), rel=1e-9)


def test_gap_objective_rejects_an_unknown_remedy():
    from sde_ray.losses.gap import GapObjective

    with pytest.raises(ValueError, match="unknown gap remedy 'rotate'"):
        GapObjective("rotate", 0.1, 0.1, 4, 0.05, False, "ignore")


# ---------------------------------------------------------------------------------------------
# Every seed objective: trains without NaN, and equals the single-process loss on 2 gloo ranks


def _paired_data(rows: int, dims: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 4, generator=generator)
    mix_q, mix_t = torch.randn(4, dims, generator=generator), torch.randn(4, dims, generator=generator)
    query = latent @ mix_q + 0.3 * torch.randn(rows, dims, generator=generator)
    target = latent @ mix_t + 0.3 * torch.randn(rows, dims, generator=generator)
    return query, target


@pytest.mark.parametrize("name", SEED_OBJECTIVES)
def test_objective_trains_without_nan(name):
    torch.manual_seed(0)
    query_data, target_data = _paired_data(256, 12, seed=0)
    config = _config(name)
    config.loss.dsrsd.shared_dim = 8
    encoders = torch.nn.ModuleList([torch.nn.Linear(12, 16), torch.nn.Linear(12, 16)])
    objective = build_objective(config, 16)
    optimizer = torch.optim.Adam(list(encoders.parameters()) + list(objective.parameters()), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    steps = 30
    for step in range(steps):
        rows = torch.randint(0, 256, (32,), generator=generator)
        context = StepContext(progress=step / steps, generator=generator)
        loss, metrics = objective(encoders[0](query_data[rows]), encoders[1](target_data[rows]), context)
        assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values()), metrics
        assert "gap_centroid" in metrics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _losses_and_grads(name: str, query: torch.Tensor, target: torch.Tensor, rank: int, world_size: int):
    """Loss, feature gradients and objective-parameter gradients of `name` on these rows."""
    torch.manual_seed(0)  # identical objective parameters (DSRSD heads) everywhere
    config = _config(name)
    config.loss.dsrsd.shared_dim = 6
    config.loss.gap.k = 4
    objective = build_objective(config, query.shape[1])
    query, target = query.clone().requires_grad_(), target.clone().requires_grad_()
    context = StepContext(
        progress=0.5, rank=rank, world_size=world_size, generator=torch.Generator().manual_seed(7)
    )
    loss, _ = objective(query, target, context)
    loss.backward()
    parameter_grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return loss.detach(), query.grad, target.grad, parameter_grads


def _rank_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    gloo_workers.start(rank, world_size, rendezvous)
    query, target = _paired_data(16, 12, seed=5)
    local = slice(rank * 8, (rank + 1) * 8)
    results = {
        name: _losses_and_grads(name, query[local], target[local], rank, world_size) for name in SEED_OBJECTIVES
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    gloo_workers.finish()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return gloo_workers.launch(_rank_worker, tmp_path_factory.mktemp("two_ranks"))


@pytest.mark.parametrize("name", SEED_OBJECTIVES)
def test_two_rank_loss_and_gradients_equal_single_process(name, two_rank_results):
    query, target = _paired_data(16, 12, seed=5)
    loss, query_grad, target_grad, parameter_grads = _losses_and_grads(name, query, target, 0, 1)
    per_rank = [results[name] for results in two_rank_results]
    torch.testing.assert_close(torch.stack([r[0] for r in per_rank]).mean(), loss, atol=1e-5, rtol=1e-5)
    # The all-gather backward hands each rank the sum of both ranks' gradients for its rows, i.e.
    # world_size × the gradient of the rank-mean loss; averaging parameter gradients (DDP) undoes it.
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]) / 2, query_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r[2] for r in per_rank]) / 2, target_grad, atol=1e-5, rtol=1e-4)
    for parameter, grad in parameter_grads.items():
        averaged = (per_rank[0][3][parameter] + per_rank[1][3][parameter]) / 2
        torch.testing.assert_close(averaged, grad, atol=1e-5, rtol=1e-4)
