"""Spectral-domain terms of the dual-domain loss, differentiable without an SVD backward.

With the right singular vectors V detached, σ_i = ‖F v_i‖ has exactly the true gradient u_i v_iᵀ at
that point (v_i is a stationary point of ‖F v‖ on the unit sphere), so every term below is built
from the energies e_i = ‖F v_i‖² = Σ_ranks ‖F_local v_i‖²: one differentiable all-reduce of a few
numbers per step, the same in gather and Gram mode.

- Hellinger: squared Hellinger distance H² = ½‖√p − √q‖² between the normalised spectra of the two
  modalities, p = σ/Σσ (`on="singular"`) or σ²/Σσ² (`on="energy"`). We use H² (not H) as the loss,
  and √(p + ε) with ε = 1e-8: both keep the gradient finite at p = q and at σ_i = 0.
- Subspace consistency between the top-k right singular subspaces:
  `surrogate` ½[(1 − ‖F_t V_q‖²/‖F_t‖²) + (1 − ‖F_q V_t‖²/‖F_q‖²)] with detached bases V (k columns);
  `projector` ‖P_q − P_t‖²_F / 2k with P = B Bᵀ, B = Fᵀ (F V)_detached Σ⁻² — at the current point
  B = V exactly, and its gradient holds U and Σ fixed, avoiding the 1/(σ_i² − σ_j²) terms of a true
  SVD backward (our choice).
- SNR: (1 − α)·Σ_noise σ_i² / Σ σ_i² (`sde_ray.spectral.snr_loss`).
- total: λ·L_inst + (1 − λ)(w_h·L_hell + w_s·L_sub) + w_snr·L_snr.
"""

from __future__ import annotations

import torch

from sde_ray.distributed import all_reduce_with_grad
from sde_ray.spectral.enhance import clamp_denominator

HELLINGER_EPS = 1e-8


def projected_energies(
    local_features: torch.Tensor, basis: torch.Tensor, world_size: int = 1
) -> torch.Tensor:
    """e_i = ‖F v_i‖² over every rank's rows (differentiable w.r.t. the local rows), shape (r,)."""
    dtype = torch.promote_types(local_features.dtype, torch.float32)
    basis = basis.detach().to(device=local_features.device, dtype=dtype)
    local = (local_features.to(dtype) @ basis).square().sum(0)
    return all_reduce_with_grad(local, world_size)


def singular_values_from_energies(energies: torch.Tensor) -> torch.Tensor:
    """σ = √e with a bounded gradient where e underflows to 0."""
    return clamp_denominator(energies).sqrt()


def spectral_distribution(energies: torch.Tensor, on: str = "singular") -> torch.Tensor:
    """p = σ/Σσ (`singular`) or σ²/Σσ² (`energy`); all zeros for an all-zero spectrum."""
    if on == "singular":
        values = singular_values_from_energies(energies)
    elif on == "energy":
        values = energies
    else:
        raise ValueError(f"hellinger_on must be singular or energy, got {on!r}")
    return values / clamp_denominator(values.sum())


def squared_hellinger(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """½‖√(p+ε) − √(q+ε)‖² for two distributions of the same length (in [0, 1] up to ε)."""
    if p.shape != q.shape:
        raise ValueError(f"distributions have different shapes {tuple(p.shape)} and {tuple(q.shape)}")
    return 0.5 * ((p + HELLINGER_EPS).sqrt() - (q + HELLINGER_EPS).sqrt()).square().sum()


def hellinger_distance(p: torch.Tensor, q: torch.Tensor) -> float:
    """The Hellinger distance H ∈ [0, 1] itself (a diagnostic; no gradient)."""
    return float(squared_hellinger(p.detach(), q.detach()).clamp_min(0.0).sqrt())


def hellinger_loss(energies_q: torch.Tensor, energies_t: torch.Tensor, on: str = "singular") -> torch.Tensor:
    """H² between the two modalities' normalised spectra."""
    return squared_hellinger(spectral_distribution(energies_q, on), spectral_distribution(energies_t, on))


def subspace_surrogate(
    local_query: torch.Tensor,
    local_target: torch.Tensor,
    basis_q: torch.Tensor,
    basis_t: torch.Tensor,
    world_size: int = 1,
) -> torch.Tensor:
    """½[(1 − ‖F_t V_q‖²/‖F_t‖²) + (1 − ‖F_q V_t‖²/‖F_q‖²)] with detached k-column bases V."""
    dtype = torch.promote_types(local_query.dtype, torch.float32)
    q, t = local_query.to(dtype), local_target.to(dtype)
    basis_q = basis_q.detach().to(device=q.device, dtype=dtype)
    basis_t = basis_t.detach().to(device=q.device, dtype=dtype)
    sums = torch.stack(
        [(t @ basis_q).square().sum(), t.square().sum(), (q @ basis_t).square().sum(), q.square().sum()]
    )
    sums = all_reduce_with_grad(sums, world_size)
    captured_t = sums[0] / clamp_denominator(sums[1])
    captured_q = sums[2] / clamp_denominator(sums[3])
    return 1.0 - 0.5 * (captured_t + captured_q)


def frozen_basis(
    local_features: torch.Tensor, basis: torch.Tensor, sigma: torch.Tensor, world_size: int = 1
) -> torch.Tensor:
    """B = Fᵀ (F V)_detached Σ⁻² (d × k): equals V at this point; its gradient keeps U and Σ fixed.

    `sigma` are the global σ's of those k columns, descending. Columns whose σ_i is numerically zero
    (below √eps·σ_1, where a float Gram or SVD cannot resolve the direction) are zero.
    """
    dtype = torch.promote_types(local_features.dtype, torch.float32)
    x = local_features.to(dtype)
    basis = basis.detach().to(device=x.device, dtype=dtype)
    sigma = sigma.detach().to(device=x.device, dtype=dtype)
    resolved = sigma > torch.finfo(dtype).eps ** 0.5 * sigma.max().clamp_min(torch.finfo(dtype).tiny)
    inverse_energy = torch.where(resolved, 1.0 / clamp_denominator(sigma.square()), torch.zeros_like(sigma))
    projected = (x.detach() @ basis) * inverse_energy
    return all_reduce_with_grad(x.T @ projected, world_size)


def projector_distance(basis_q: torch.Tensor, basis_t: torch.Tensor) -> torch.Tensor:
    """‖B_qB_qᵀ − B_tB_tᵀ‖²_F / 2k via k × k products (k = number of columns)."""
    if basis_q.shape != basis_t.shape:
        raise ValueError(f"bases have different shapes {tuple(basis_q.shape)} and {tuple(basis_t.shape)}")
    k = basis_q.shape[1]
    gram_q, gram_t, cross = basis_q.T @ basis_q, basis_t.T @ basis_t, basis_q.T @ basis_t
    return (gram_q.square().sum() + gram_t.square().sum() - 2.0 * cross.square().sum()) / (2.0 * k)


def dual_domain_total(
    instance: torch.Tensor,
    hellinger: torch.Tensor,
    subspace: torch.Tensor,
    snr: torch.Tensor,
    lam: float,
    w_hellinger: float,
    w_subspace: float,
    w_snr: float,
) -> torch.Tensor:
    """λ·L_inst + (1 − λ)(w_h·L_hell + w_s·L_sub) + w_snr·L_snr."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    return lam * instance + (1.0 - lam) * (w_hellinger * hellinger + w_subspace * subspace) + w_snr * snr
