"""Partition of a spectrum into strong / weak / noise directions (random-matrix noise edge + fence).

Our reading of SDE's "IQR + Marchenko–Pastur" split (docs/spectral.md):

- Noise edge. An N × d matrix of iid noise with entry std s has singular values below s(√N + √d)
  asymptotically (Marchenko–Pastur), whatever the entry distribution. s is estimated robustly from
  the bulk of the spectrum: Gavish–Donoho, s = σ_med / √(max(N, d)·μ_β) with μ_β the median of the
  MP law of ratio β = min/max (computed numerically and cached), or the inter-quartile range of the
  σ's matched to the MP quartiles. At finite size the top noise singular value exceeds the edge by
  Tracy–Widom fluctuations of relative order min(N, d)^(-2/3), so the edge is raised by
  `tw_margin` such units: τ_mp = s(√N + √d)(1 + tw_margin·min(N, d)^(-2/3)). noise = σ ≤ τ_mp.
- Strong fence, among the directions above the edge: `iqr` (Tukey: σ > Q3 + k·IQR of the whole
  spectrum), `energy` (the fewest top directions holding `energy_fraction` of the signal energy) or
  `log_gap` (cut at the largest gap in log σ). The rest above the edge is weak.

The three masks are disjoint, cover every index and are ordered: strong ones come first.

Soft membership (`partition="soft"`, ours). The hard masks are a step function of σ: a singular value
a rounding error away from τ_mp or the fence flips sets, and Δ jumps by O(ε·σ). The soft partition
keeps the same thresholds and replaces each step by a logistic in log σ,

    above_i = S((log σ_i − log τ_mp) / w),   strong|above_i = S((log σ_i − log τ_s) / w),
    strong_i = above_i·strong|above_i,  weak_i = above_i·(1 − strong|above_i),  noise_i = 1 − above_i,

with S the logistic, τ_s = max(τ_mp, τ_fence) and w = soft_width·min(N, d)^(-2/3): the width is
counted in the same Tracy–Widom units as the margin, the scale on which the top noise singular value
fluctuates anyway. The three weights are in [0, 1] and sum to 1 for every direction. Both
thresholds are continuous functions of σ (quantiles with linear interpolation), so the weights are
too, and |∂weight/∂log σ_i| ≤ 1/(4w) at fixed thresholds (S' ≤ 1/4). The `energy` and `log_gap`
fences cut at a singular value chosen by a count, which jumps; they are hard-only. The boolean
masks of a soft partition are the hard partition with the same thresholds (counts, plots).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

NOISE_ESTIMATORS = ("gavish_donoho", "iqr")
FENCES = ("iqr", "energy", "log_gap")
PARTITIONS = ("hard", "soft")
SOFT_FENCES = ("iqr",)  # fences whose threshold is a continuous function of σ


@dataclass(frozen=True)
class Partition:
    """Boolean masks over the r singular values and the thresholds that produced them."""

    strong: torch.Tensor
    weak: torch.Tensor
    noise: torch.Tensor
    tau_mp: float  # noise edge incl. the Tracy–Widom margin: noise = σ ≤ tau_mp
    tau_fence: float  # the strong fence as computed by the rule (strong = σ > max(tau_mp, tau_fence))
    noise_std: float  # estimated entry std s of the noise
    # (3, r) float64 memberships (strong, weak, noise) of a soft partition; None: the masks themselves.
    soft_weights: torch.Tensor | None = None

    @property
    def soft(self) -> bool:
        return self.soft_weights is not None

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(strong, weak, noise) memberships in [0, 1] summing to 1 per direction (float64)."""
        if self.soft_weights is not None:
            return self.soft_weights[0], self.soft_weights[1], self.soft_weights[2]
        return tuple(mask.to(torch.float64) for mask in (self.strong, self.weak, self.noise))

    @property
    def num_strong(self) -> int:
        return int(self.strong.sum())

    @property
    def num_weak(self) -> int:
        return int(self.weak.sum())

    @property
    def num_noise(self) -> int:
        return int(self.noise.sum())


@functools.lru_cache(maxsize=512)
def marchenko_pastur_quantile(beta: float, probability: float) -> float:
    """Quantile of the Marchenko–Pastur law of the eigenvalues of XXᵀ/n (unit variance, β = m/n ≤ 1)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    from scipy.integrate import quad
    from scipy.optimize import brentq

    lower, upper = (1.0 - math.sqrt(beta)) ** 2, (1.0 + math.sqrt(beta)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((upper - x) * (x - lower), 0.0)) / (2.0 * math.pi * beta * x)

    def cdf_minus(x: float) -> float:
        return quad(density, lower, x, limit=200)[0] - probability

    return brentq(cdf_minus, lower, upper, xtol=1e-12)


def _aspect(num_rows: int, num_cols: int) -> float:
    return min(num_rows, num_cols) / max(num_rows, num_cols)


def _quartiles(sigma: torch.Tensor) -> torch.Tensor:
    """The probabilities (0.25, 0.75) for `torch.quantile(sigma, ·)`, which wants them on σ's device
    and in its dtype (a CPU q beside CUDA σ raises)."""
    return torch.tensor([0.25, 0.75], dtype=sigma.dtype, device=sigma.device)


def estimate_noise_std(singular_values: torch.Tensor, num_rows: int, num_cols: int, estimator: str) -> float:
    """Entry std s of the noise, from the bulk of the spectrum (robust to a few signal directions)."""
    sigma = singular_values.detach().to(torch.float64)
    beta = _aspect(num_rows, num_cols)
    scale = math.sqrt(max(num_rows, num_cols))
    if estimator == "gavish_donoho":
        median = float(torch.quantile(sigma, 0.5))
        return median / (scale * math.sqrt(marchenko_pastur_quantile(beta, 0.5)))
    if estimator == "iqr":
        q1, q3 = (float(v) for v in torch.quantile(sigma, _quartiles(sigma)))
        law_iqr = math.sqrt(marchenko_pastur_quantile(beta, 0.75)) - math.sqrt(
            marchenko_pastur_quantile(beta, 0.25)
        )
        return (q3 - q1) / (scale * law_iqr)
    raise ValueError(f"unknown noise_estimator {estimator!r}; valid: {', '.join(NOISE_ESTIMATORS)}")


def noise_edge(noise_std: float, num_rows: int, num_cols: int, tw_margin: float) -> float:
    """s(√N + √d) raised by `tw_margin` Tracy–Widom units of relative size min(N, d)^(-2/3)."""
    edge = noise_std * (math.sqrt(num_rows) + math.sqrt(num_cols))
    return edge * (1.0 + tw_margin * min(num_rows, num_cols) ** (-2.0 / 3.0))


def _strong_count(
    sigma: torch.Tensor, num_signal: int, tau_mp: float, fence: str, iqr_k: float, energy_fraction: float
) -> tuple[int, float]:
    """How many of the top `num_signal` directions are strong, and the fence value the rule used."""
    if fence == "iqr":
        q1, q3 = (float(v) for v in torch.quantile(sigma, _quartiles(sigma)))
        tau_fence = q3 + iqr_k * (q3 - q1)
        return int((sigma[:num_signal] > max(tau_mp, tau_fence)).sum()), tau_fence
    if num_signal == 0:
        return 0, tau_mp
    signal = sigma[:num_signal]
    if fence == "energy":
        energy = signal.square()
        cumulative = energy.cumsum(0) / energy.sum()
        count = int((cumulative < energy_fraction - 1e-12).sum()) + 1
    elif fence == "log_gap":
        if num_signal == 1:
            count = 1
        else:
            gaps = signal[:-1].log() - signal[1:].log()
            count = int(gaps.argmax()) + 1
    else:
        raise ValueError(f"unknown fence {fence!r}; valid: {', '.join(FENCES)}")
    count = min(count, num_signal)
    tau_fence = float(signal[count]) if count < num_signal else tau_mp
    return count, tau_fence


def partition_spectrum(
    singular_values: torch.Tensor,
    num_rows: int,
    num_cols: int,
    *,
    noise_estimator: str = "gavish_donoho",
    tw_margin: float = 3.0,
    fence: str = "iqr",
    iqr_k: float = 1.5,
    energy_fraction: float = 0.5,
    partition: str = "hard",
    soft_width: float = 1.0,
) -> Partition:
    """Splits the descending singular values of an N × d matrix into strong / weak / noise masks
    (and, with `partition="soft"`, continuous memberships around the same thresholds)."""
    if singular_values.dim() != 1:
        raise ValueError(f"singular_values must be 1-D, got shape {tuple(singular_values.shape)}")
    if num_rows < 1 or num_cols < 1:
        raise ValueError(f"num_rows and num_cols must be >= 1, got {num_rows} × {num_cols}")
    if singular_values.shape[0] != min(num_rows, num_cols):
        raise ValueError(
            f"expected min(num_rows, num_cols) = {min(num_rows, num_cols)} singular values, "
            f"got {singular_values.shape[0]}"
        )
    if fence not in FENCES:
        raise ValueError(f"unknown fence {fence!r}; valid: {', '.join(FENCES)}")
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; valid: {', '.join(PARTITIONS)}")
    if partition == "soft" and fence not in SOFT_FENCES:
        raise ValueError(
            f"partition=soft needs a fence whose threshold is continuous in σ ({', '.join(SOFT_FENCES)}), got {fence!r}"
        )
    if partition == "soft" and not soft_width > 0:
        raise ValueError(f"soft_width must be > 0, got {soft_width}")
    if tw_margin < 0 or iqr_k < 0 or not 0 < energy_fraction <= 1:
        raise ValueError(
            f"need tw_margin >= 0, iqr_k >= 0 and 0 < energy_fraction <= 1; "
            f"got {tw_margin}, {iqr_k}, {energy_fraction}"
        )
    sigma = singular_values.detach().to(torch.float64)
    if not torch.isfinite(sigma).all() or (sigma < 0).any():
        raise ValueError("singular_values must be finite and non-negative")
    if (sigma[1:] > sigma[:-1] * (1 + 1e-6) + 1e-12).any():
        raise ValueError("singular_values must be sorted in descending order")

    noise_std = estimate_noise_std(sigma, num_rows, num_cols, noise_estimator)
    tau_mp = noise_edge(noise_std, num_rows, num_cols, tw_margin)
    num_signal = int((sigma > tau_mp).sum())
    num_strong, tau_fence = _strong_count(sigma, num_signal, tau_mp, fence, iqr_k, energy_fraction)
    # Masks by position: σ is sorted, so this keeps the sets ordered even with ties at a threshold.
    index = torch.arange(sigma.shape[0], device=sigma.device)
    strong = index < num_strong
    weak = (index >= num_strong) & (index < num_signal)
    noise = index >= num_signal
    weights = None
    if partition == "soft":
        width = soft_width * min(num_rows, num_cols) ** (-2.0 / 3.0)
        weights = soft_memberships(sigma, tau_mp, max(tau_mp, tau_fence), width)
    return Partition(strong, weak, noise, tau_mp, tau_fence, noise_std, weights)


def soft_memberships(sigma: torch.Tensor, tau_mp: float, tau_strong: float, width: float) -> torch.Tensor:
    """(3, r) logistic memberships (strong, weak, noise) in log σ around τ_mp and τ_strong.

    σ = 0 (or a zero threshold) is handled as the limit: log 0 = −∞ is pure noise.
    """
    sigma = sigma.to(torch.float64)
    log_sigma = torch.where(sigma > 0, sigma.clamp_min(torch.finfo(torch.float64).tiny).log(), -math.inf)

    def step(tau: float) -> torch.Tensor:
        if tau <= 0:
            return (sigma > 0).to(torch.float64)
        return torch.sigmoid((log_sigma - math.log(tau)) / width)

    above, strong_given_above = step(tau_mp), step(tau_strong)
    strong = above * strong_given_above
    return torch.stack([strong, above - strong, 1.0 - above])


@dataclass(frozen=True)
class PartitionRule:
    """The rule `partition_spectrum` applies after (σ, N, d): its keyword arguments as one value.

    Plain values (no defaults: the caller states every choice); `SpectrumRule` carries one, and
    `spectrum_rule` builds it from the config's `spectral` section, whose keys these names are."""

    noise_estimator: str
    tw_margin: float
    fence: str
    iqr_k: float
    energy_fraction: float
    partition: str
    soft_width: float

    def split(self, singular_values: torch.Tensor, num_rows: int, num_cols: int) -> Partition:
        """`partition_spectrum(singular_values, num_rows, num_cols, **this rule)`."""
        return partition_spectrum(
            singular_values,
            num_rows,
            num_cols,
            noise_estimator=self.noise_estimator,
            tw_margin=self.tw_margin,
            fence=self.fence,
            iqr_k=self.iqr_k,
            energy_fraction=self.energy_fraction,
            partition=self.partition,
            soft_width=self.soft_width,
        )
