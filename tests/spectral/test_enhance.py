"""Δ per set, the Frobenius bound, adversarial signs against finite differences, L_snr."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sde_ray.losses.infonce import info_nce
from sde_ray.spectral import (
    Partition,
    adversarial_signs,
    enhancement_deltas,
    random_signs,
    snr_loss,
    svd_spectrum,
)


def _partition(strong: int, weak: int, noise: int) -> Partition:
    index = torch.arange(strong + weak + noise)
    return Partition(
        index < strong, (index >= strong) & (index < strong + weak), index >= strong + weak, 0.0, 0.0, 0.0
    )


def test_deltas_follow_the_formula_per_set():
    sigma = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    xi = torch.tensor([0.5, -1.0, 0.3, 0.3, 0.3, 0.3], dtype=torch.float64)
    alpha, es, ew, en = 0.4, 0.2, 0.3, 0.5
    result = enhancement_deltas(
        sigma, _partition(2, 2, 2), alpha, xi, eps_strong=es, eps_weak=ew, eps_noise=en, rho=10.0
    )
    expected = torch.tensor(
        [
            es * alpha * 1.0 * 10.0 * 0.5,
            es * alpha * 0.5 * 5.0 * -1.0,
            -ew * alpha * 3.0,
            -ew * alpha * 2.0,
            -en * (1 - alpha) * 1.0,
            -en * (1 - alpha) * 0.5,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(result.delta, expected)
    torch.testing.assert_close(result.scale, expected / sigma)
    assert result.bound_factor == 1.0


def test_frobenius_bound_rescales_delta():
    sigma = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    result = enhancement_deltas(
        sigma,
        _partition(0, 0, 4),
        0.0,
        torch.zeros(4, dtype=torch.float64),
        eps_strong=0.0,
        eps_weak=0.0,
        eps_noise=1.0,
        rho=0.1,
    )
    assert math.isclose(float(result.delta.norm()), 0.1 * float(sigma.norm()), rel_tol=1e-12)
    torch.testing.assert_close(result.delta / result.delta.norm(), -sigma / sigma.norm())
    assert result.bound_factor == pytest.approx(0.1)


def _with_eps_01(sigma: torch.Tensor, partition: Partition, alpha: float, rho: float):
    """enhancement_deltas with ξ = 1 and ε = 0.1 for every set."""
    return enhancement_deltas(sigma, partition, alpha, torch.ones(len(sigma), dtype=torch.float64),
                              eps_strong=0.1, eps_weak=0.1, eps_noise=0.1, rho=rho)


def test_zero_singular_values_get_zero_delta_and_their_sets_ratio():
    result = _with_eps_01(torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64), _partition(1, 0, 2), 1.0, rho=1.0)
    assert torch.isfinite(result.scale).all() and result.scale[1:].eq(0).all()
    all_zero = _with_eps_01(torch.zeros(3, dtype=torch.float64), _partition(0, 0, 3), 0.5, rho=0.1)
    assert all_zero.delta.eq(0).all()
    # M acts on an exactly-zero direction as on a tiny one (no jump in the gradient G·Mᵀ when
    # rounding puts an eigenvalue at 0 rather than 1e-300).
    tiny = _with_eps_01(torch.full((3,), 1e-300, dtype=torch.float64), _partition(0, 0, 3), 0.5, rho=0.1)
    torch.testing.assert_close(all_zero.scale, tiny.scale, rtol=0, atol=0)
    assert all_zero.scale.eq(-0.1 * 0.5).all()


def test_random_signs_are_reproducible_and_in_range():
    a = random_signs(1000, torch.Generator().manual_seed(3))
    b = random_signs(1000, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.9


def test_adversarial_signs_match_finite_differences_of_the_instance_loss():
    g = torch.Generator().manual_seed(0)
    query = torch.randn(12, 6, generator=g, dtype=torch.float64)
    target = query + 0.8 * torch.randn(12, 6, generator=g, dtype=torch.float64)

    def loss_of(q):
        return info_nce(F.normalize(q, dim=-1), F.normalize(target, dim=-1), 5.0)

    leaf = query.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_of(leaf), leaf)
    spectrum = svd_spectrum(query)
    signs = adversarial_signs(query, spectrum.basis, gradient, world_size=1)
    u, sigma, vh = torch.linalg.svd(query, full_matrices=False)
    h = 1e-6
    for i in range(sigma.shape[0]):
        bump = torch.zeros_like(sigma)
        bump[i] = h
        derivative = (loss_of((u * (sigma + bump)) @ vh) - loss_of((u * (sigma - bump)) @ vh)) / (2 * h)
        assert signs[i] == torch.sign(derivative), i
    assert (signs != 0).all()


def test_snr_loss_value_and_alpha():
    energies = torch.tensor([9.0, 4.0, 1.0, 1.0])
    noise = torch.tensor([False, False, True, True])
    assert float(snr_loss(energies, noise, 0.0)) == pytest.approx(2 / 15)
    assert float(snr_loss(energies, noise, 0.75)) == pytest.approx(0.25 * 2 / 15)
    assert float(snr_loss(torch.zeros(4), noise, 0.0)) == 0.0
