"""Modality-gap remedies and the `gap` training objective (`loss.name=gap`).

Yi, Douady & Chen (arXiv 2510.03268) trace the modality gap to dimension collapse: each modality
ends up on its own (affine) subspace, and paired samples can only be aligned perfectly by a
*hyperplane rotation* or by a *shared-space projection*. The two pure functions below are those
remedies, fitted on a batch of paired features; the evaluator imports them for its eval-time remedy.

- `procrustes_rotation(source, target)`: the orthogonal R minimising ‖source·R − target‖_F
  (orthogonal Procrustes: R = U Vᵀ from the SVD sourceᵀ·target = U S Vᵀ).
- `shared_space_projection(query, target, k)`: the d × d orthogonal projector onto the k-dim subspace
  the two modalities share. Our reading (the paper gives no formula): take the top-k right singular
  subspaces of each modality's *centred* features (centring keeps the centroid offset — the gap
  itself — out of the estimate), and keep the top-k eigenvectors of P_q + P_t (eigenvalue 2:
  directions in both subspaces).

The training objective is ours too: InfoNCE + w_gap·L_remedy + w_centroid·‖μ_q − μ_t‖², where the
remedy is refitted (detached) on the global batch each step and L_remedy pulls every normalised
feature toward where the remedy would put it, ½·mean‖q̂ − sg(r_q(q̂))‖² + ½·mean‖t̂ − sg(r_t(t̂))‖²
(procrustes: r_q(q̂) = q̂R, r_t(t̂) = t̂Rᵀ; shared_projection: r(x) = xP). It is zero exactly when the
remedy is already the identity on the batch, i.e. when training has closed the gap the remedy fixes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sde_ray.losses import StepContext
from sde_ray.distributed import gather_with_grad
from sde_ray.losses.batch import ContrastiveBatch, ContrastiveObjective
from sde_ray.losses.objectives import Temperature
from sde_ray.spectral.diagnostics import centroid_gap

REMEDIES = ("procrustes", "shared_projection")


def _check_pair(query: torch.Tensor, target: torch.Tensor) -> None:
    if query.dim() != 2 or target.dim() != 2:
        raise ValueError(
            "query and target must be 2-D (rows × dims), "
            f"got shapes {tuple(query.shape)} and {tuple(target.shape)}"
        )
    if query.shape != target.shape:
        raise ValueError(
            "query and target must be paired rows of equal shape, "
            f"got {tuple(query.shape)} vs {tuple(target.shape)}"
        )
    if not (torch.isfinite(query).all() and torch.isfinite(target).all()):
        raise ValueError("query or target contains NaN or Inf")


def procrustes_rotation(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The orthogonal d × d matrix R minimising ‖source·R − target‖_F over paired rows (no gradient).

    Computed in float64 and returned in the input dtype. Apply it as `source @ R`.
    """
    _check_pair(source, target)
    cross = source.detach().double().T @ target.detach().double()
    u, _, vh = torch.linalg.svd(cross)
    return (u @ vh).to(source.dtype)


def _top_right_subspace(features: torch.Tensor, k: int) -> torch.Tensor:
    centred = features - features.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return vh[:k].T


def shared_space_projection(query: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """The d × d orthogonal projector onto the k-dim subspace shared by both modalities (no gradient).

    Needs k <= min(rows − 1, dims): a centred batch of N rows spans at most N − 1 directions.
    Apply it as `features @ P` (P is symmetric).
    """
    _check_pair(query, target)
    rows, dims = query.shape
    if not 1 <= k <= min(rows - 1, dims):
        raise ValueError(
            f"shared-space rank k={k} must be in [1, min(rows − 1, dims)] = [1, {min(rows - 1, dims)}]"
        )
    q_basis = _top_right_subspace(query.detach().double(), k)
    t_basis = _top_right_subspace(target.detach().double(), k)
    _, eigenvectors = torch.linalg.eigh(q_basis @ q_basis.T + t_basis @ t_basis.T)
    shared = eigenvectors[:, -k:]  # eigh sorts ascending
    return (shared @ shared.T).to(query.dtype)


def modality_gap_metrics(query: torch.Tensor, target: torch.Tensor, world_size: int) -> dict[str, float]:
    """The gap diagnostic every objective logs: centroid distance of the normalised global batch.

    Named like the training loop's own snapshot (`gap_centroid`), so both report the same number.
    """
    return {"gap_centroid": centroid_gap(query, target, world_size)}


class GapObjective(ContrastiveObjective):
    """InfoNCE plus a pull toward the gap remedy's output and a centroid-gap penalty (see module doc)."""

    def __init__(
        self,
        remedy: str,
        w_gap: float,
        w_centroid: float,
        k: int,
        temperature: float,
        learnable_temperature: bool,
        duplicates: str,
    ):
        super().__init__()
        if remedy not in REMEDIES:
            raise ValueError(f"unknown gap remedy {remedy!r}; valid: {', '.join(REMEDIES)}")
        self.remedy, self.w_gap, self.w_centroid, self.k = remedy, w_gap, w_centroid, k
        self.scale = Temperature(temperature, learnable_temperature)
        self.duplicates = duplicates

    def remedy_targets(self, all_query: torch.Tensor, all_target: torch.Tensor):
        """The remedy fitted on the (normalised, detached) global batch, as two maps for the rows."""
        if self.remedy == "procrustes":
            rotation = procrustes_rotation(all_query, all_target)
            return (lambda q: q @ rotation), (lambda t: t @ rotation.T)
        k = min(self.k, all_query.shape[0] - 1, all_query.shape[1])
        projector = shared_space_projection(all_query, all_target, k)
        return (lambda q: q @ projector), (lambda t: t @ projector)

    def contrastive(self, batch: ContrastiveBatch, context: StepContext):
        # Explicit negatives are InfoNCE candidates only; the remedy is fitted on the paired rows.
        query, target, negatives = batch.query, batch.positives, batch.negatives
        q, t = F.normalize(query, dim=-1), F.normalize(target, dim=-1)
        n = None if negatives is None else F.normalize(negatives, dim=-1)
        instance = batch.replace(query=q, positives=t, negatives=n).info_nce(self.scale(), self.duplicates)
        all_q = gather_with_grad(q, context.world_size)
        all_t = gather_with_grad(t, context.world_size)
        map_q, map_t = self.remedy_targets(all_q.detach(), all_t.detach())
        # Local rows only: the mean over ranks of these per-row means is the global per-row mean.
        pull = 0.5 * (
            (q - map_q(q.detach())).pow(2).sum(-1).mean() + (t - map_t(t.detach())).pow(2).sum(-1).mean()
        )
        centroid = (all_q.mean(0) - all_t.mean(0)).pow(2).sum()
        loss = instance + self.w_gap * pull + self.w_centroid * centroid
        metrics = {
            "loss_instance": instance.detach(),
            "loss_gap_remedy": pull.detach(),
            "loss_gap_centroid": centroid.detach(),
        }
        metrics.update(modality_gap_metrics(query, target, context.world_size))
        return loss, metrics


def build_gap(config, embed_dim: int) -> GapObjective:
    del embed_dim
    loss = config.loss
    return GapObjective(
        loss.gap.remedy,
        loss.gap.w_gap,
        loss.gap.w_centroid,
        loss.gap.k,
        loss.temperature,
        loss.learnable_temperature,
        loss.duplicate_targets,
    )
