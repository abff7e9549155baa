"""Spectral and modality-gap diagnostics (no gradients): used by the losses' metrics, the training
logs and the evaluator.

- energy shares of the strong / weak / noise sets: Σ_set σ_i² / Σ σ_i²;
- effective rank (Roy & Vetterli 2007): exp of the Shannon entropy of p_i = σ_i / Σ σ_j;
- modality gap: distance between the centroids of the L2-normalised features of the two
  modalities, and the principal angles between their top-k right singular subspaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sde_ray.distributed import all_reduce_with_grad
from sde_ray.spectral.partition import Partition


def energy_shares(singular_values: torch.Tensor, partition: Partition) -> dict[str, float]:
    """{"strong", "weak", "noise"} shares of the energy Σσ² (they sum to 1; all 0 for a zero matrix)."""
    energy = singular_values.detach().to(torch.float64).square()
    total = float(energy.sum())
    if total <= 0:
        return {"strong": 0.0, "weak": 0.0, "noise": 0.0}
    # Membership-weighted: the masks for a hard partition, the soft memberships otherwise.
    return {
        name: float((energy * weight.to(energy.device)).sum()) / total
        for name, weight in zip(("strong", "weak", "noise"), partition.weights())
    }


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp(H(p)), p = σ/Σσ (Roy & Vetterli); 0 for an all-zero spectrum, in [1, r] otherwise."""
    sigma = singular_values.detach().to(torch.float64).clamp_min(0.0)
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    p = sigma / total
    entropy = -float(torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum())
    return math.exp(entropy)


def centroid_gap(query: torch.Tensor, target: torch.Tensor, world_size: int = 1) -> float:
    """‖mean(q̂) − mean(t̂)‖ of the L2-normalised rows, the means taken over every rank's rows."""
    if query.shape[-1] != target.shape[-1]:
        raise ValueError(f"query and target dims differ: {query.shape[-1]} vs {target.shape[-1]}")
    with torch.no_grad():
        sums = torch.stack(
            [
                F.normalize(query.detach().double(), dim=-1).sum(0),
                F.normalize(target.detach().double(), dim=-1).sum(0),
            ]
        )
        counts = torch.tensor([query.shape[0], target.shape[0]], dtype=torch.float64, device=sums.device)
        sums = all_reduce_with_grad(sums, world_size)
        counts = all_reduce_with_grad(counts, world_size)
        means = sums / counts[:, None]
        return float(torch.linalg.vector_norm(means[0] - means[1]))


def principal_angles(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """All principal angles (radians, ascending) between the column spans of two orthonormal bases."""
    if basis_a.dim() != 2 or basis_b.dim() != 2 or basis_a.shape[0] != basis_b.shape[0]:
        raise ValueError(
            f"bases must be d × k matrices of the same d, got {tuple(basis_a.shape)} and {tuple(basis_b.shape)}"
        )
    cosines = torch.linalg.svdvals(basis_a.detach().double().T @ basis_b.detach().double())
    return torch.arccos(cosines.clamp(-1.0, 1.0))


def smallest_principal_angle(basis_a: torch.Tensor, basis_b: torch.Tensor) -> float:
    """The smallest principal angle (radians) between two subspaces: 0 when they share a direction."""
    return float(principal_angles(basis_a, basis_b).min())


def top_subspace(features: torch.Tensor, k: int) -> torch.Tensor:
    """Orthonormal basis (d × k') of the top-k right singular subspace, k' = min(k, N, d)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _, _, vh = torch.linalg.svd(features.detach().double(), full_matrices=False)
    return vh[:k].T


def modality_gap(query: torch.Tensor, target: torch.Tensor, k: int = 8) -> dict[str, float]:
    """Gap metrics on single-process features: centroid distance and principal angles (top-k)."""
    angles = principal_angles(top_subspace(query, k), top_subspace(target, k))
    return {
        "centroid_distance": centroid_gap(query, target),
        "min_principal_angle": float(angles.min()),
        "mean_principal_angle": float(angles.mean()),
    }
