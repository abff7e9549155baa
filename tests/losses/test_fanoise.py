"""FANoise: the injected noise has the σ^p shape, follows its schedule in energy, and is training-only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sde_ray.config import Config, ScheduleConfig
from sde_ray.losses import StepContext, build_objective
from sde_ray.losses.fanoise import FANoiseObjective, direction_stds, spectral_noise
from sde_ray.losses.infonce import info_nce
from sde_ray.spectral.decompose import svd_spectrum

SIGMAS = torch.tensor([20.0, 10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)


def _planted_features(
    rows: int = 64, sigmas: torch.Tensor = SIGMAS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """F = U diag(σ) Vᵀ with known σ and V (d = len(σ))."""
    generator = torch.Generator().manual_seed(seed)
    dims = sigmas.shape[0]
    left, _ = torch.linalg.qr(torch.randn(rows, dims, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=torch.float64))
    return left @ torch.diag(sigmas) @ right.T, right


def test_direction_stds_follow_the_closed_form():
    features, _ = _planted_features()
    stds = direction_stds(svd_spectrum(features), level=0.2, power=0.5)
    # s_i² = γ·σ_i^{2p}·Σσ² / (N·Σσ^{2p}) with p = 1/2: σ_i^{2p} = σ_i.
    expected = (0.2 * SIGMAS * SIGMAS.pow(2).sum() / (64 * SIGMAS.sum())).sqrt()
    torch.testing.assert_close(stds, expected, atol=1e-10, rtol=1e-8)
    assert float((64 * stds.pow(2)).sum()) == pytest.approx(0.2 * float(SIGMAS.pow(2).sum()))


def test_noise_variance_per_direction_grows_like_sigma_to_the_power():
    features, right = _planted_features()
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([spectral_noise(features, 0.3, 0.5, 0, 1, generator) for _ in range(300)])
    per_direction_variance = (draws @ right).pow(2).mean(dim=(0, 1))
    ratios = per_direction_variance / per_direction_variance[0]
    torch.testing.assert_close(ratios, SIGMAS / SIGMAS[0], atol=0.0, rtol=0.08)


def _cosine_decay(t: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * t))


@pytest.mark.parametrize("progress", [0.0, 0.25, 0.5, 0.8])
def test_injected_energy_follows_the_schedule(progress):
    features, _ = _planted_features()
    config = Config()
    config.loss.name = "fanoise"
    config.loss.fanoise.strength = 0.4
    objective = build_objective(config, features.shape[1])
    expected = 0.4 * _cosine_decay(progress)
    assert objective.noise_level(StepContext(progress=progress)) == pytest.approx(expected)
    generator = torch.Generator().manual_seed(2)
    energies = [
        float(spectral_noise(features, expected, 0.5, 0, 1, generator).pow(2).sum() / features.pow(2).sum())
        for _ in range(200)
    ]
    assert sum(energies) / len(energies) == pytest.approx(expected, rel=0.03)


def test_no_noise_at_the_end_of_the_schedule_or_outside_training():
    torch.manual_seed(0)
    query, target = torch.randn(16, 8), torch.randn(16, 8)
    objective = FANoiseObjective(
        0.5, 0.5, ScheduleConfig(kind="linear", start=1.0, end=0.0), "both", 0.05, False, "ignore"
    )
    clean = info_nce(F.normalize(query, dim=-1), F.normalize(target, dim=-1), 20.0)
    for context in (StepContext(progress=1.0), StepContext(progress=0.3, training=False)):
        loss, metrics = objective(query, target, context)
        torch.testing.assert_close(loss, clean)
        assert metrics["fanoise_energy_query"] == 0.0
    loss, metrics = objective(query, target, StepContext(progress=0.3))
    assert metrics["fanoise_level"] == pytest.approx(0.35)
    assert metrics["fanoise_energy_query"] > 0 and metrics["fanoise_energy_target"] > 0
    assert not torch.allclose(loss, clean)


def test_inject_side_is_respected():
    torch.manual_seed(0)
    query, target = torch.randn(16, 8), torch.randn(16, 8)
    objective = FANoiseObjective(
        0.5, 0.5, ScheduleConfig(kind="constant", start=1.0, end=1.0), "target", 0.05, False, "ignore"
    )
    _, metrics = objective(query, target, StepContext(progress=0.5))
    assert metrics["fanoise_energy_query"] == 0.0 and metrics["fanoise_energy_target"] > 0


def test_gather_and_gram_routes_inject_the_same_noise():
    features, _ = _planted_features()
    features = features.float()
    noises = [
        spectral_noise(features, 0.2, 0.5, 0, 1, torch.Generator().manual_seed(3), spectral_mode=mode)
        for mode in ("gather", "gram")
    ]
    torch.testing.assert_close(noises[0], noises[1], atol=1e-4, rtol=1e-3)


def test_bad_settings_are_rejected_by_name():
    with pytest.raises(ValueError, match="inject side 'keys'"):
        FANoiseObjective(0.5, 0.1, ScheduleConfig(), "keys", 0.05, False, "ignore")
    with pytest.raises(ValueError, match="power must be > 0"):
        FANoiseObjective(0.0, 0.1, ScheduleConfig(), "both", 0.05, False, "ignore")


def test_non_finite_features_give_a_non_finite_loss_not_an_exception():
    """The NaN policy acts on a non-finite loss; FANoise used to raise from the spectrum instead."""
    objective = FANoiseObjective(0.5, 0.5, ScheduleConfig(kind="constant"), "both", 0.05, False, "ignore")
    query, _ = _planted_features(seed=1)
    target, _ = _planted_features(seed=2)
    query = query.float().clone()
    query[3, 1] = float("nan")
    context = StepContext(progress=0.5, rank=0, world_size=1, training=True,
                          generator=torch.Generator().manual_seed(0))
    loss, _ = objective(query, target.float(), context)
    assert not torch.isfinite(loss)
    # The same features with the entry made finite again give a finite loss.
    query[3, 1] = 0.0
    clean, _ = objective(query, target.float(), StepContext(progress=0.5, rank=0, world_size=1, training=True,
                                                           generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(clean)
