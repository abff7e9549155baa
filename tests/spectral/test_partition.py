"""Partition of a spectrum: Marchenko–Pastur law, false positives on pure noise, spiked recovery,
invariants (hypothesis) and the alternative fences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_ray.spectral import FENCES, marchenko_pastur_quantile, partition_spectrum


def _gd_omega(beta: float) -> float:
    """Gavish–Donoho ω(β) = λ*(β)/√μ_β (their eq. for unknown noise)."""
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / ((beta + 1) + math.sqrt(beta**2 + 14 * beta + 1)))
    return lam / math.sqrt(marchenko_pastur_quantile(beta, 0.5))


def test_marchenko_pastur_median_matches_gavish_donoho():
    # Known values: μ_1 ≈ 0.6528; ω(β) tabulated by Gavish & Donoho (and their cubic approximation).
    assert math.isclose(marchenko_pastur_quantile(1.0, 0.5), 0.6528, abs_tol=2e-4)
    for beta, omega in ((1.0, 2.858), (0.5, 2.171), (0.25, 1.837), (0.1, 1.609)):
        assert math.isclose(_gd_omega(beta), omega, abs_tol=2e-3)
        approx = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert math.isclose(_gd_omega(beta), approx, abs_tol=7e-3)


def test_marchenko_pastur_quantile_against_a_simulated_spectrum():
    rng = np.random.default_rng(0)
    m, n = 400, 1600
    noise = rng.standard_normal((m, n))
    eigenvalues = np.linalg.eigvalsh(noise @ noise.T / n)
    for p in (0.25, 0.5, 0.75):
        assert math.isclose(np.quantile(eigenvalues, p), marchenko_pastur_quantile(m / n, p), rel_tol=0.02)


NOISE_SHAPES = [(16, 16), (32, 256), (256, 32), (64, 64), (128, 512), (512, 128), (200, 200), (8, 300)]


def _noise(kind: str, shape, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(
        3
    )  # uniform, unit variance


@pytest.fixture(scope="module")
def noise_spectra():
    """Singular values of pure-noise matrices: shapes × distributions × scales × seeds."""
    g = torch.Generator().manual_seed(0)
    return [
        (shape, torch.linalg.svdvals(scale * _noise(kind, shape, g)))
        for shape in NOISE_SHAPES
        for kind in ("gaussian", "rademacher", "uniform")
        for scale in (1e-3, 1.0, 3e2)
        for _ in range(4)
    ]


@pytest.mark.parametrize("estimator", ["gavish_donoho", "iqr"])
def test_pure_noise_is_all_noise(noise_spectra, estimator):
    """False-positive rate over many pure-noise matrices; the bare MP edge is far worse."""
    false_positives = bare_false_positives = 0
    for shape, sigma in noise_spectra:
        part = partition_spectrum(sigma, *shape, noise_estimator=estimator)
        bare = partition_spectrum(sigma, *shape, noise_estimator=estimator, tw_margin=0.0)
        false_positives += part.num_noise != sigma.shape[0]
        bare_false_positives += bare.num_noise != sigma.shape[0]
    trials = len(noise_spectra)
    rate = false_positives / trials
    print(
        f"{estimator}: false-positive rate {rate:.4f} over {trials} matrices "
        f"(bare MP edge: {bare_false_positives / trials:.3f})"
    )
    assert rate <= 0.02
    assert bare_false_positives > false_positives  # the Tracy–Widom margin is what makes the difference


@pytest.mark.parametrize("shape", [(128, 512), (512, 128), (256, 256), (96, 1024), (1024, 64)])
@pytest.mark.parametrize("estimator", ["gavish_donoho", "iqr"])
def test_spiked_matrix_has_exactly_k_signal_directions(shape, estimator):
    rows, cols = shape
    g = torch.Generator().manual_seed(rows + cols)
    for k in (1, 3, 6):
        s = 0.5
        threshold = s * (rows * cols) ** 0.25  # BBP / Benaych-Georges–Nadakuditi detection threshold
        u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
        theta = threshold * torch.linspace(3.0, 6.0, k, dtype=torch.float64)
        matrix = (u * theta) @ v.T + s * torch.randn(rows, cols, generator=g, dtype=torch.float64)
        part = partition_spectrum(torch.linalg.svdvals(matrix), rows, cols, noise_estimator=estimator)
        assert part.num_strong + part.num_weak == k, (shape, k, part)
        assert part.noise[k:].all() and not part.noise[:k].any()
        assert math.isclose(part.noise_std, s, rel_tol=0.1)


@st.composite
def spectra(draw):
    rows = draw(st.integers(1, 40))
    cols = draw(st.integers(1, 40))
    r = min(rows, cols)
    values = draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(1e-30, 1e6, allow_nan=False), st.sampled_from([1.0, 2.0])),
            min_size=r,
            max_size=r,
        )
    )
    return torch.tensor(sorted(values, reverse=True), dtype=torch.float64), rows, cols


@settings(max_examples=150, deadline=None)
@given(spectra(), st.sampled_from(FENCES), st.sampled_from(["gavish_donoho", "iqr"]))
def test_masks_are_disjoint_covering_and_ordered(case, fence, estimator):
    sigma, rows, cols = case
    part = partition_spectrum(sigma, rows, cols, fence=fence, noise_estimator=estimator)
    total = part.strong.int() + part.weak.int() + part.noise.int()
    assert (total == 1).all()
    # Ordered: every strong index precedes every weak one, which precedes every noise one.
    labels = (part.weak.int() + 2 * part.noise.int()).tolist()
    assert labels == sorted(labels)
    assert all(math.isfinite(x) for x in (part.tau_mp, part.tau_fence, part.noise_std))
    assert (sigma[part.noise] <= part.tau_mp).all()


def test_iqr_fence_splits_strong_from_weak():
    # A real 256 × 1024 noise bulk (top 4 dropped), two far outliers and two values between the
    # noise edge (≈ 51.7) and the Tukey fence (≈ 57.0).
    g = torch.Generator().manual_seed(0)
    bulk = torch.linalg.svdvals(torch.randn(256, 1024, generator=g, dtype=torch.float64))[4:]
    sigma = torch.cat([torch.tensor([200.0, 150.0, 55.0, 54.5], dtype=torch.float64), bulk])
    part = partition_spectrum(sigma, 256, 1024)
    q1, q3 = np.percentile(sigma.numpy(), [25, 75])
    assert math.isclose(part.tau_fence, q3 + 1.5 * (q3 - q1), rel_tol=1e-12)
    assert math.isclose(part.noise_std, 1.0, rel_tol=0.05)
    assert part.tau_mp < 54.5 and 55.0 < part.tau_fence < 150.0
    assert part.strong.tolist() == [True, True] + [False] * 254
    assert part.weak.tolist() == [False, False, True, True] + [False] * 252


def test_energy_and_log_gap_fences():
    bulk = torch.linspace(1.0, 0.5, 60, dtype=torch.float64)
    sigma = torch.cat([torch.tensor([50.0, 45.0, 10.0, 9.0], dtype=torch.float64), bulk])
    energy = partition_spectrum(sigma, 64, 1024, fence="energy", energy_fraction=0.5)
    assert energy.num_strong == 1 and energy.num_weak == 3  # 50² alone holds > half the signal energy
    energy_all = partition_spectrum(sigma, 64, 1024, fence="energy", energy_fraction=1.0)
    assert energy_all.num_strong == 4 and energy_all.num_weak == 0
    gap = partition_spectrum(sigma, 64, 1024, fence="log_gap")
    assert gap.num_strong == 2 and gap.num_weak == 2  # the largest log-gap is 45 → 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"singular_values": torch.tensor([1.0, 2.0]), "num_rows": 2, "num_cols": 5}, "descending"),
        ({"singular_values": torch.tensor([2.0, 1.0]), "num_rows": 3, "num_cols": 5}, "min\\(num_rows"),
        ({"singular_values": torch.tensor([float("nan"), 1.0]), "num_rows": 2, "num_cols": 2}, "finite"),
        ({"singular_values": torch.ones(2), "num_rows": 2, "num_cols": 2, "fence": "tukey"}, "unknown fence"),
        (
            {"singular_values": torch.ones(2), "num_rows": 2, "num_cols": 2, "noise_estimator": "mad"},
            "noise_estimator",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition_spectrum(**kwargs)


# ---------------------------------------------------------------------------------------------
# Soft partition: memberships, agreement with the hard one, continuity of Δ


def _spiked(shape=(64, 48), spikes=(40.0, 25.0, 12.0, 6.0, 3.5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*shape, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(shape[0], len(spikes), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], len(spikes), generator=g, dtype=torch.float64))[0]
    signal = u @ torch.diag(torch.tensor(spikes, dtype=torch.float64) * math.sqrt(shape[0])) @ v.T
    return torch.linalg.svdvals(signal / math.sqrt(shape[0]) + noise)


def _width(shape, soft_width=1.0) -> float:
    # docs/spectral.md: the logistic width in log σ is soft_width Tracy–Widom units min(N, d)^(-2/3).
    return soft_width * min(shape) ** (-2.0 / 3.0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("soft_width", [0.3, 1.0, 4.0])
def test_soft_memberships_are_in_unit_interval_and_sum_to_one(seed, soft_width):
    shape = (64, 48)
    sigma = _spiked(shape, seed=seed)
    part = partition_spectrum(sigma, *shape, partition="soft", soft_width=soft_width)
    weights = torch.stack(part.weights())
    assert weights.shape == (3, sigma.numel())
    assert (weights >= 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(0), torch.ones(sigma.numel(), dtype=torch.float64), atol=1e-12, rtol=0)
    # The boolean masks of a soft partition are the hard partition with the same thresholds.
    hard = partition_spectrum(sigma, *shape)
    assert torch.equal(part.strong, hard.strong) and torch.equal(part.noise, hard.noise)


@pytest.mark.parametrize("seed", range(4))
def test_soft_and_hard_agree_far_from_the_thresholds(seed):
    shape = (64, 48)
    sigma = _spiked(shape, seed=seed)
    hard = partition_spectrum(sigma, *shape)
    soft = partition_spectrum(sigma, *shape, partition="soft", soft_width=0.5)
    width = _width(shape, 0.5)
    tau_strong = max(hard.tau_mp, hard.tau_fence)
    distance = torch.minimum((sigma.log() - math.log(hard.tau_mp)).abs(), (sigma.log() - math.log(tau_strong)).abs())
    far = distance > 12 * width  # logistic(12) > 1 − 1e-5 on each side
    assert far.sum() >= sigma.numel() // 2  # the check covers most of the spectrum
    for hard_mask, soft_weight in zip((hard.strong, hard.weak, hard.noise), soft.weights()):
        assert (soft_weight[far] - hard_mask[far].double()).abs().max() < 2e-5
    assert hard.num_strong >= 1 and hard.num_noise >= 1  # both thresholds are exercised


def test_soft_partition_needs_a_continuous_fence():
    sigma = _spiked()
    with pytest.raises(ValueError, match="partition=soft needs a fence"):
        partition_spectrum(sigma, 64, 48, partition="soft", fence="energy")
    with pytest.raises(ValueError, match="soft_width"):
        partition_spectrum(sigma, 64, 48, partition="soft", soft_width=0.0)


def _deltas(sigma, shape, partition, xi, eps=(0.3, 0.2, 0.5), alpha=0.4):
    from sde_ray.spectral import enhancement_deltas

    part = partition_spectrum(sigma, *shape, partition=partition, soft_width=1.0)
    # ρ large: the Frobenius rescale stays inactive, so Δ is the membership formula itself.
    enhancement = enhancement_deltas(
        sigma, part, alpha, xi, eps_strong=eps[0], eps_weak=eps[1], eps_noise=eps[2], rho=10.0
    )
    assert enhancement.bound_factor == 1.0
    return enhancement.delta, part


def _lipschitz_bound(sigma, part, shape, eps=(0.3, 0.2, 0.5), iqr_k=1.5) -> float:
    """First-order bound on ‖∂Δ/∂σ_j‖ for the soft partition (derivation in docs/spectral.md).

    δ_i = c_i·σ_i, |c_i| ≤ E = Σ ε; d(a_jσ_j)/dσ_j ≤ 2E; each membership is built from two logistics
    of slope ≤ 1/(4w) in log σ; a linearly interpolated quantile moves at most as fast as one σ_j, so
    d log τ_mp/dσ_j ≤ 1/σ_med and d log τ_s/dσ_j ≤ (1 + 2k)/τ_s; a membership change of each of the two
    logistics moves |c_i| by at most 5E/2·(its change)."""
    E = sum(eps)
    w = _width(shape)
    median = float(torch.quantile(sigma, 0.5))
    tau_s = max(part.tau_mp, part.tau_fence)
    g = max(1.0 / median, (1 + 2 * iqr_k) / tau_s)
    return 2 * E + (5 * E / (4 * w)) * (1.0 + g * float(sigma.sum()))


@pytest.mark.parametrize("threshold", ["noise_edge", "strong_fence"])
def test_soft_delta_is_continuous_where_the_hard_one_jumps(threshold):
    """Move one σ_j across a threshold in steps of 1e-9·σ_j: the hard Δ jumps by O(ε·σ_j) at the
    crossing, the soft Δ changes by at most the Lipschitz bound times the step."""
    shape = (64, 48)
    sigma = _spiked(shape, seed=1)
    xi = torch.linspace(-1, 1, sigma.numel(), dtype=torch.float64)
    hard = partition_spectrum(sigma, *shape)
    tau = hard.tau_mp if threshold == "noise_edge" else max(hard.tau_mp, hard.tau_fence)
    count = hard.num_strong + hard.num_weak
    j = count - 1 if threshold == "noise_edge" else hard.num_strong - 1  # the last one above
    assert j >= 1

    def with_value(value):
        out = sigma.clone()
        out[j] = value
        return out

    def crossing_count(s):
        p = partition_spectrum(s, *shape)
        return p.num_strong + p.num_weak if threshold == "noise_edge" else p.num_strong

    # Bisect the σ_j at which the hard partition changes (the thresholds move with σ_j a little).
    low, high = float(sigma[j + 1]) * 1.0000001, float(sigma[j - 1]) * 0.9999999
    assert crossing_count(with_value(low)) != crossing_count(with_value(high))
    while high - low > 1e-9 * high:
        mid = 0.5 * (low + high)
        if crossing_count(with_value(mid)) == crossing_count(with_value(low)):
            low = mid
        else:
            high = mid
    assert abs(high / tau - 1) < 0.05  # the crossing is at the threshold
    step = high - low
    hard_low, _ = _deltas(with_value(low), shape, "hard", xi)
    hard_high, _ = _deltas(with_value(high), shape, "hard", xi)
    soft_low, part = _deltas(with_value(low), shape, "soft", xi)
    soft_high, _ = _deltas(with_value(high), shape, "soft", xi)
    hard_jump = float(torch.linalg.vector_norm(hard_high - hard_low))
    soft_change = float(torch.linalg.vector_norm(soft_high - soft_low))
    assert hard_jump > 0.01 * high  # a discontinuity: a finite jump for a 1e-9 relative step
    bound = _lipschitz_bound(with_value(low), part, shape) * step
    assert soft_change <= bound
    # And the soft Δ is differentiable there: finite differences at two step sizes agree.
    rates = []
    for h in (1e-5 * high, 1e-7 * high):
        up, _ = _deltas(with_value(low + h), shape, "soft", xi)
        rates.append((up - soft_low) / h)
    torch.testing.assert_close(rates[0], rates[1], rtol=1e-2, atol=1e-3 * float(rates[0].abs().max()))
