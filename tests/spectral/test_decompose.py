"""SVD vs Gram decomposition, the enhancement identity F·M = U(Σ+Δ)Vᵀ, mode choice, input errors."""

from __future__ import annotations

import pytest
import torch

from sde_ray.spectral import (
    apply_enhancement,
    choose_mode,
    communicated_bytes,
    enhancement_deltas,
    enhancement_matrix,
    gram_spectrum,
    partition_spectrum,
    random_signs,
    svd_spectrum,
)

SHAPES = [(40, 12), (12, 40), (24, 24), (64, 96)]


def _distinct_spectrum_matrix(rows: int, cols: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """A matrix with well-separated singular values (so V is unique up to sign)."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, r, generator=g, dtype=torch.float64))
    sigma = torch.linspace(10.0, 1.0, r, dtype=torch.float64) ** 1.5
    return ((u * sigma) @ v.T).to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_and_svd_agree_on_sigma_and_m(shape, dtype):
    features = _distinct_spectrum_matrix(*shape, seed=sum(shape), dtype=dtype)
    svd, gram = svd_spectrum(features), gram_spectrum(features)
    assert svd.sigma.shape == gram.sigma.shape == (min(shape),)
    assert svd.basis.shape == gram.basis.shape == (shape[1], min(shape))
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(gram.sigma.double(), svd.sigma.double(), rtol=tol, atol=tol)
    # V agrees column by column up to sign, hence M agrees exactly.
    cosines = (svd.basis.double() * gram.basis.double()).sum(0).abs()
    torch.testing.assert_close(cosines, torch.ones_like(cosines), rtol=tol, atol=tol)
    scale = torch.linspace(-0.2, 0.3, min(shape), dtype=dtype)
    torch.testing.assert_close(
        enhancement_matrix(gram.basis, scale).double(),
        enhancement_matrix(svd.basis, scale).double(),
        rtol=tol,
        atol=tol,
    )


def test_gram_keeps_only_the_top_min_n_d_for_wide_matrices():
    features = _distinct_spectrum_matrix(6, 50, seed=3)
    spectrum = gram_spectrum(features)
    assert spectrum.sigma.shape == (6,) and spectrum.basis.shape == (50, 6)
    assert float(spectrum.sigma.min()) > 0.5  # the 44 zero eigenvalues were dropped


@pytest.mark.parametrize("shape", SHAPES)
def test_f_m_equals_u_sigma_plus_delta_vt(shape):
    features = _distinct_spectrum_matrix(*shape, seed=1) + 0.01 * torch.randn(*shape, dtype=torch.float64)
    u, sigma, vh = torch.linalg.svd(features, full_matrices=False)
    partition = partition_spectrum(sigma, *shape, tw_margin=0.0)
    xi = random_signs(sigma.shape[0], torch.Generator().manual_seed(0))
    enhancement = enhancement_deltas(
        sigma, partition, 0.4, xi, eps_strong=0.3, eps_weak=0.2, eps_noise=0.5, rho=0.5
    )
    expected = (u * (sigma + enhancement.delta)) @ vh
    spectrum = svd_spectrum(features)
    torch.testing.assert_close(features @ enhancement_matrix(spectrum.basis, enhancement.scale), expected)
    torch.testing.assert_close(apply_enhancement(features, spectrum.basis, enhancement.scale), expected)
    # The low-rank form with the shared noise ratio (only strong/weak directions multiplied) is exact.
    assert enhancement.base_scale != 0
    torch.testing.assert_close(
        apply_enhancement(features, spectrum.basis, enhancement.scale, enhancement.base_scale), expected
    )
    gram = gram_spectrum(features)
    for base in (0.0, enhancement.base_scale):
        torch.testing.assert_close(
            apply_enhancement(features, gram.basis, enhancement.scale, base), expected, rtol=1e-7, atol=1e-7
        )
    # ... also on a subset of the rows (a rank's local rows), with the global basis.
    torch.testing.assert_close(
        apply_enhancement(features[:5], spectrum.basis, enhancement.scale, enhancement.base_scale),
        expected[:5],
    )


def test_rank_deficient_matrix_zero_sigma_is_skipped():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 20, generator=g, dtype=torch.float64
    )
    for spectrum in (svd_spectrum(features), gram_spectrum(features)):
        partition = partition_spectrum(spectrum.sigma, 30, 20)
        xi = torch.ones(20, dtype=torch.float64)
        enhancement = enhancement_deltas(
            spectrum.sigma, partition, 0.5, xi, eps_strong=0.1, eps_weak=0.1, eps_noise=0.5, rho=0.1
        )
        enhanced = apply_enhancement(features, spectrum.basis, enhancement.scale, enhancement.base_scale)
        torch.testing.assert_close(enhanced, features @ enhancement_matrix(spectrum.basis, enhancement.scale))
        assert torch.isfinite(enhanced).all()
        # The enhancement never leaves the row space of F: nothing is added along the null directions.
        assert torch.linalg.matrix_rank(enhanced) == 3


def test_choose_mode():
    assert choose_mode(4096, 1024, "auto", 1.0) == "gram"
    assert choose_mode(1024, 4096, "auto", 1.0) == "gather"
    assert choose_mode(1024, 4096, "auto", 4.0) == "gram"
    assert choose_mode(10, 10, "gather") == "gather"
    with pytest.raises(ValueError, match="unknown spectral mode"):
        choose_mode(10, 10, "svd")


def test_communicated_bytes():
    # N=4096, d=1024: the float64 Gram is half the size of the float32 rows, but a ring all-reduce
    # sends its buffer twice (reduce-scatter + all-gather), so each worker sends the same bytes.
    assert communicated_bytes(4096, 1024, 8, "gram") / communicated_bytes(4096, 1024, 8, "gather") == 1.0
    assert communicated_bytes(4096, 1024, 2, "gather") == 4096 * 1024 * 4 // 2
    assert communicated_bytes(100, 10, 1, "gram") == 0


@pytest.mark.parametrize(
    "bad, message",
    [(torch.randn(5), "2-D"), (torch.full((3, 3), float("nan")), "NaN"), (torch.empty(0, 4), "empty")],
)
def test_bad_input_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        svd_spectrum(bad)
    with pytest.raises(ValueError, match=message):
        gram_spectrum(bad)
