"""Curriculum spectral enhancement F' = U(Σ + Δ)Vᵀ = F·M without an SVD backward.

Δ = diag(δ_i) per DESIGN (training only), with α = α(t):
- strong: δ_i = ε_s·α·(σ_i/σ_1)·σ_i·ξ_i, ξ_i uniform in [−1, 1] or the adversarial sign (below);
- weak:   δ_i = −ε_w·α·σ_i;
- noise:  δ_i = −ε_n·(1 − α)·σ_i;
then Δ is rescaled so that ‖Δ‖_F ≤ ρ‖Σ‖_F. With a soft partition (memberships m_s + m_w + m_n = 1,
`spectral.partition`) each δ_i is the membership-weighted sum of the three lines, which is the
formula above wherever the memberships are 0/1.

Every δ_i is a bounded multiple c_i·σ_i of its σ_i, so we carry the ratios `scale_i = δ_i/σ_i`
directly (computed without dividing; a zero σ_i keeps its set's ratio): M = I + V·diag(scale)·Vᵀ, and
F·M = F + (F V)·diag(scale)·Vᵀ, applied to each rank's own rows with V, σ, δ detached — gradients
flow through F linearly and exactly.

Adversarial ξ (FGSM on the singular values): ∂L/∂σ_i = u_iᵀ (∂L/∂F) v_i = ⟨F v_i, G v_i⟩ / σ_i
with G = ∂L/∂F, a sum over rows, hence an all-reduce of r numbers across ranks. Its sign is the
direction that increases the contrastive loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sde_ray.distributed import all_reduce_with_grad
from sde_ray.spectral.partition import Partition


@dataclass(frozen=True)
class Enhancement:
    """δ (the diagonal of Δ) and the ratios δ/σ that define M; both detached, shape (r,)."""

    delta: torch.Tensor
    scale: torch.Tensor
    bound_factor: float  # the rescaling applied for the Frobenius bound (1.0: bound not active)
    base_scale: float  # the pure-noise ratio −ε_n(1 − α)·bound_factor (see `apply_enhancement`)


def enhancement_deltas(
    sigma: torch.Tensor,
    partition: Partition,
    alpha: float,
    xi: torch.Tensor,
    *,
    eps_strong: float,
    eps_weak: float,
    eps_noise: float,
    rho: float,
) -> Enhancement:
    """Δ for one modality. `xi`: (r,) values in [−1, 1] for the strong directions (others ignored)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if min(eps_strong, eps_weak, eps_noise, rho) < 0:
        raise ValueError("eps_strong, eps_weak, eps_noise and rho must be >= 0")
    if xi.shape != sigma.shape:
        raise ValueError(f"xi must have the shape of sigma {tuple(sigma.shape)}, got {tuple(xi.shape)}")
    sigma = sigma.detach().to(torch.float64)
    xi = xi.detach().to(device=sigma.device, dtype=torch.float64)
    top = float(sigma[0]) if sigma.numel() else 0.0
    relative = sigma / top if top > 0 else torch.zeros_like(sigma)
    strong, weak, noise = (w.to(sigma.device) for w in partition.weights())
    coefficient = (
        strong * (eps_strong * alpha * relative * xi)
        - weak * (eps_weak * alpha)
        - noise * (eps_noise * (1.0 - alpha))
    )
    # σ = 0 keeps its set's ratio (δ = 0 either way): M acts on a zero direction as on a tiny one, so
    # the gradient G·Mᵀ does not jump when rounding puts an eigenvalue at 0 instead of 1e-9.
    delta = coefficient * sigma
    delta_norm, sigma_norm = float(torch.linalg.vector_norm(delta)), float(torch.linalg.vector_norm(sigma))
    bound_factor = min(1.0, rho * sigma_norm / delta_norm) if delta_norm > 0 else 1.0
    # The pure-noise ratio, for the hard and the soft partition alike: a soft membership of a σ far
    # below τ_mp is 1 in float64, so those directions share it exactly (`apply_enhancement`).
    base_scale = -eps_noise * (1.0 - alpha) * bound_factor
    return Enhancement(delta * bound_factor, coefficient * bound_factor, bound_factor, base_scale)


def enhancement_matrix(basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """M = I + V·diag(δ/σ)·Vᵀ (d × d)."""
    basis = basis.detach()
    scale = scale.detach().to(basis.dtype)
    identity = torch.eye(basis.shape[0], dtype=basis.dtype, device=basis.device)
    return identity + (basis * scale) @ basis.T


def apply_enhancement(
    features: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor, base_scale: float = 0.0
) -> torch.Tensor:
    """F·M without forming M: (1 + b)·F + (F V_a)·diag(scale_a − b)·V_aᵀ, a = {i : scale_i ≠ b}.

    With b = 0 this is F + (F V)·diag(δ/σ)·Vᵀ for any basis. A nonzero b (the pure-noise ratio,
    `Enhancement.base_scale`) is exact only when the columns of V span the row space of F — true for
    the full top-min(N, d) basis of the global matrix and any subset of its rows — and then only the
    few strong/weak directions are multiplied: 2·n·k·d flops instead of 2·n·r·d. Works on a rank's
    local rows; differentiable w.r.t. `features` only.

    The value F·M does not depend on M outside F's row space, but the gradient G·Mᵀ does (G, from the
    other modality's rows, has components in F's null space). With b, M is (1 + b) on every
    direction outside the active set: on F's null directions that V happens to hold (σ ≈ 0, V
    arbitrary there, set by rounding) and on the complement of V (N < d) alike, so the gradient is
    a function of F alone. With b = 0, M is 1 + b on the null directions in V but 1 on those outside
    it, and which null directions V holds is decided by rounding: two ranks' gathered features and
    one process's (bitwise different) gave gradients 3 % apart.
    """
    dtype = torch.promote_types(features.dtype, torch.float32)
    basis = basis.detach().to(device=features.device, dtype=dtype)
    scale = scale.detach().to(device=features.device, dtype=dtype)
    active = scale != base_scale
    x = features.to(dtype)
    out = x if base_scale == 0.0 else (1.0 + base_scale) * x
    if not bool(active.any()):
        return out
    basis = basis[:, active]
    return out + ((x @ basis) * (scale[active] - base_scale)) @ basis.T


def random_signs(
    num: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """ξ uniform in [−1, 1] from `generator` (drawn on the CPU so every rank's stream agrees)."""
    return (torch.rand(num, generator=generator, dtype=torch.float64, device="cpu") * 2.0 - 1.0).to(device)


def adversarial_signs(
    local_features: torch.Tensor, basis: torch.Tensor, loss_gradient: torch.Tensor, world_size: int
) -> torch.Tensor:
    """sign(∂L/∂σ_i) = sign(Σ_rows ⟨F v_i, G v_i⟩) over all ranks' rows (G = ∂L/∂F, local rows).

    Zero where the derivative vanishes. Needs the same `basis` on every rank.
    """
    if loss_gradient.shape != local_features.shape:
        raise ValueError(
            f"loss_gradient shape {tuple(loss_gradient.shape)} != features shape {tuple(local_features.shape)}"
        )
    basis = basis.detach().to(torch.float64)
    projected = local_features.detach().to(torch.float64) @ basis
    projected_gradient = loss_gradient.detach().to(torch.float64) @ basis
    derivative = all_reduce_with_grad((projected * projected_gradient).sum(0), world_size)
    return torch.sign(derivative)


def clamp_denominator(x: torch.Tensor) -> torch.Tensor:
    """`x` floored at √(smallest normal float): 0/0 becomes 0, and the 1/x² of a backward stays finite
    (with the float32 floor 1e-19, a gradient of 1e4 upstream is at most ~1e42·0 = 0, never Inf·0)."""
    return x.clamp_min(torch.finfo(x.dtype).tiny ** 0.5)


def snr_loss(energies: torch.Tensor, noise_mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_snr = (1 − α)·Σ_noise σ_i² / Σ_all σ_i², from (differentiable) energies σ_i²."""
    total = clamp_denominator(energies.sum())
    noise = (energies * noise_mask.to(device=energies.device, dtype=energies.dtype)).sum()
    return (1.0 - alpha) * noise / total
