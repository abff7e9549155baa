"""Spectral-domain terms: values against independent formulas, the no-SVD-backward gradient,
gradcheck in float64, and no NaN/Inf on degenerate spectra (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_ray.losses.dual_domain import (
    dual_domain_total,
    frozen_basis,
    hellinger_distance,
    hellinger_loss,
    projected_energies,
    projector_distance,
    singular_values_from_energies,
    spectral_distribution,
    squared_hellinger,
    subspace_surrogate,
)
from sde_ray.spectral import partition_spectrum, snr_loss, svd_spectrum


def _well_conditioned(rows, cols, seed, top=6.0):
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    return (u * torch.linspace(top, 1.0, r, dtype=torch.float64)) @ v.T


def test_hellinger_against_the_textbook_formula():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.6, 0.3])
    expected = np.sqrt(0.5 * ((np.sqrt(p) - np.sqrt(q)) ** 2).sum())
    assert hellinger_distance(torch.tensor(p), torch.tensor(q)) == pytest.approx(expected, abs=1e-6)
    assert float(squared_hellinger(torch.tensor(p), torch.tensor(p))) == 0.0
    disjoint = float(squared_hellinger(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])))
    assert disjoint == pytest.approx(1.0, abs=1e-3)


def test_spectral_distribution_modes():
    energies = torch.tensor([9.0, 4.0, 1.0])
    torch.testing.assert_close(spectral_distribution(energies, "singular"), torch.tensor([3.0, 2.0, 1.0]) / 6)
    torch.testing.assert_close(spectral_distribution(energies, "energy"), energies / 14)
    with pytest.raises(ValueError, match="hellinger_on"):
        spectral_distribution(energies, "log")


def test_projected_energies_give_sigma_and_the_true_gradient():
    features = _well_conditioned(10, 7, seed=0).requires_grad_()
    spectrum = svd_spectrum(features)
    sigma = singular_values_from_energies(projected_energies(features, spectrum.basis))
    torch.testing.assert_close(sigma, spectrum.sigma)
    u, _, vh = torch.linalg.svd(features.detach(), full_matrices=False)
    for i in (0, 3):
        (gradient,) = torch.autograd.grad(sigma[i], features, retain_graph=True)
        torch.testing.assert_close(gradient, torch.outer(u[:, i], vh[i]))  # ∂σ_i/∂F = u_i v_iᵀ


def test_gradcheck_sigma_terms_with_the_basis_recomputed_inside():
    """Hellinger and SNR are exact derivatives even though V is recomputed (and detached) per call."""
    query, target = _well_conditioned(9, 6, seed=1), _well_conditioned(9, 6, seed=2, top=4.0)
    noise = torch.tensor([False, False, False, True, True, True])

    def terms(q, t):
        energies = [projected_energies(x, svd_spectrum(x).basis) for x in (q, t)]
        return (
            hellinger_loss(*energies, "singular")
            + hellinger_loss(*energies, "energy")
            + snr_loss(energies[0], noise, 0.3)
        )

    assert torch.autograd.gradcheck(terms, (query.requires_grad_(), target.requires_grad_()))


def test_gradcheck_subspace_forms_with_fixed_bases():
    query, target = _well_conditioned(9, 6, seed=3), _well_conditioned(9, 6, seed=4)
    vq, vt = svd_spectrum(query).basis[:, :2], svd_spectrum(target).basis[:, :2]
    sq, st_ = svd_spectrum(query).sigma[:2], svd_spectrum(target).sigma[:2]
    assert torch.autograd.gradcheck(
        lambda q, t: subspace_surrogate(q, t, vq, vt),
        (query.clone().requires_grad_(), target.clone().requires_grad_()),
    )
    # frozen_basis detaches F V inside, so its analytic gradient is the one of Fᵀ C with C constant.
    cq, ct = (query @ vq) / sq.square(), (target @ vt) / st_.square()
    assert torch.autograd.gradcheck(
        lambda q, t: projector_distance(q.T @ cq, t.T @ ct),
        (query.clone().requires_grad_(), target.clone().requires_grad_()),
    )
    torch.testing.assert_close(frozen_basis(query, vq, sq), vq)


def test_projector_distance_matches_numpy_and_surrogate_limits():
    rng = np.random.default_rng(0)
    a, b = np.linalg.qr(rng.standard_normal((12, 3)))[0], np.linalg.qr(rng.standard_normal((12, 3)))[0]
    expected = np.linalg.norm(a @ a.T - b @ b.T) ** 2 / 6
    assert float(projector_distance(torch.from_numpy(a), torch.from_numpy(b))) == pytest.approx(expected)
    assert float(projector_distance(torch.from_numpy(a), torch.from_numpy(a))) == pytest.approx(
        0.0, abs=1e-12
    )
    features = _well_conditioned(10, 8, seed=5)
    basis = svd_spectrum(features).basis
    assert float(subspace_surrogate(features, features, basis, basis)) == pytest.approx(0.0, abs=1e-12)
    orthogonal = float(
        subspace_surrogate(
            features @ basis[:, :2] @ basis[:, :2].T,
            features @ basis[:, 2:4] @ basis[:, 2:4].T,
            basis[:, :2],
            basis[:, 2:4],
        )
    )
    assert orthogonal == pytest.approx(1.0)


def test_dual_domain_total():
    one = torch.tensor(1.0)
    assert float(dual_domain_total(one, 2 * one, 3 * one, 4 * one, 0.25, 1.0, 0.5, 0.1)) == pytest.approx(
        0.25 + 0.75 * (2 + 1.5) + 0.4
    )
    with pytest.raises(ValueError, match="lambda"):
        dual_domain_total(one, one, one, one, 1.5, 1, 1, 1)


@st.composite
def degenerate_features(draw):
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(
        st.sampled_from(["zero", "repeated_rows", "tiny", "rank_one", "random", "huge", "duplicate_sigma"])
    )
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    x = torch.randn(rows, cols, generator=g)
    if kind == "zero":
        x = torch.zeros(rows, cols)
    elif kind == "repeated_rows":
        x = x[:1].repeat(rows, 1)
    elif kind == "tiny":
        x = x * 1e-30
    elif kind == "rank_one":
        x = torch.randn(rows, 1, generator=g) @ torch.randn(1, cols, generator=g)
    elif kind == "huge":
        x = x * 1e15
    elif kind == "duplicate_sigma":
        x = torch.eye(rows, cols) * 3.0
    return x


@settings(max_examples=120, deadline=None)
@given(degenerate_features(), degenerate_features(), st.sampled_from(["singular", "energy"]))
def test_no_nan_or_inf_on_degenerate_inputs(query, target, on):
    rows = min(query.shape[0], target.shape[0])
    query, target = query[:rows, :], target[:rows, : query.shape[1]]
    if target.shape[1] != query.shape[1]:
        target = torch.nn.functional.pad(target, (0, query.shape[1] - target.shape[1]))
    query, target = query.clone().requires_grad_(), target.clone().requires_grad_()
    spectra = [svd_spectrum(x) for x in (query, target)]
    energies = [projected_energies(x, s.basis) for x, s in zip((query, target), spectra)]
    partition = partition_spectrum(spectra[0].sigma, rows, query.shape[1])
    k = min(3, spectra[0].rank)
    bases = [frozen_basis(x, s.basis[:, :k], s.sigma[:k]) for x, s in zip((query, target), spectra)]
    total = (
        hellinger_loss(*energies, on)
        + subspace_surrogate(query, target, spectra[0].basis[:, :k], spectra[1].basis[:, :k])
        + projector_distance(*bases)
        + snr_loss(energies[0], partition.noise, 0.2)
    )
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(query.grad).all() and torch.isfinite(target.grad).all()
