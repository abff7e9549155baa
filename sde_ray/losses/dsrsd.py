"""DSRSD-Net: dual-stream residual semantic decorrelation (`loss.name=dsrsd`).

DSRSD-Net (arXiv 2512.07568) splits each modality's representation into a shared (inter-modal) stream
obtained by projection and a private (intra-modal) stream, the residual; it decorrelates the shared
space, keeps shared and private orthogonal, and aligns the modalities' shared factors with
contrastive + regression objectives. The formulas are not public; this is our reading
(docs/objectives.md), with the weights in `loss.dsrsd`:

- per modality m a learned head W_m (k × d, k = shared_dim): shared factors z = f·W_mᵀ (N × k),
  shared stream s = z·W_m = f·W_mᵀW_m (in feature space), private stream p = f − s. When W_m has
  orthonormal rows, W_mᵀW_m is an orthogonal projector and s ⟂ p row by row; heads start that way;
- decorrelation: mean squared off-diagonal entry of the correlation matrix of z over the global batch;
- orthogonality: mean over rows of cos²(s_n, p_n), zero exactly when the streams are orthogonal;
- alignment: InfoNCE between normalise(z_q) and normalise(z_t) plus the regression term
  mean‖normalise(z_q) − normalise(z_t)‖²;
- because the evaluator embeds with the encoder alone, InfoNCE on the full features is added with
  weight `w_instance` (0 gives the shared-stream-only objective).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sde_ray.losses import StepContext
from sde_ray.losses.gap import modality_gap_metrics
from sde_ray.distributed import gather_with_grad
from sde_ray.losses.batch import ContrastiveBatch, ContrastiveObjective
from sde_ray.losses.objectives import Temperature


def off_diagonal_correlation(factors: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal entry of the column correlation matrix of `factors` (N × k)."""
    rows, dims = factors.shape
    if dims < 2:
        return factors.sum() * 0.0
    if rows < 2:
        raise ValueError("the shared-factor correlation needs a global batch of at least 2 rows")
    standardised = (factors - factors.mean(0)) / (factors.std(0, unbiased=False) + 1e-6)
    correlation = standardised.T @ standardised / rows
    off_diagonal = correlation - torch.diag_embed(torch.diagonal(correlation))
    return off_diagonal.pow(2).sum() / (dims * (dims - 1))


def orthogonality_loss(shared: torch.Tensor, private: torch.Tensor) -> torch.Tensor:
    """Mean over rows of cos²(shared_n, private_n); rows where either stream vanishes count as 0."""
    inner = (shared * private).sum(-1)
    norms = shared.norm(dim=-1) * private.norm(dim=-1)
    return (inner.pow(2) / (norms.pow(2) + 1e-12)).mean()


def dual_streams(
    features: torch.Tensor, head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shared factors z, shared stream s, private stream p) of `features` for a k × d head."""
    factors = features @ head.T
    shared = factors @ head
    return factors, shared, features - shared


class DSRSDObjective(ContrastiveObjective):
    """Shared-factor contrastive + regression alignment with decorrelation and orthogonality penalties."""

    def __init__(
        self,
        embed_dim: int,
        shared_dim: int,
        w_decorrelation: float,
        w_orthogonality: float,
        w_regression: float,
        w_instance: float,
        temperature: float,
        learnable_temperature: bool,
        duplicates: str,
    ):
        super().__init__()
        if not 1 <= shared_dim <= embed_dim:
            raise ValueError(f"loss.dsrsd.shared_dim must be in [1, embed_dim={embed_dim}], got {shared_dim}")
        self.query_head = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(shared_dim, embed_dim)))
        self.target_head = torch.nn.Parameter(torch.nn.init.orthogonal_(torch.empty(shared_dim, embed_dim)))
        self.w_decorrelation, self.w_orthogonality = w_decorrelation, w_orthogonality
        self.w_regression, self.w_instance = w_regression, w_instance
        self.scale = Temperature(temperature, learnable_temperature)
        self.duplicates = duplicates

    def contrastive(self, batch: ContrastiveBatch, context: StepContext):
        world_size = batch.world_size
        # Explicit negatives are contrastive candidates only (their shared factors through the
        # target head); decorrelation, orthogonality and regression use the paired rows.
        query, target, negatives = batch.query, batch.positives, batch.negatives
        scale = self.scale()
        zq, sq, pq = dual_streams(query, self.query_head.to(query.dtype))
        zt, st, pt = dual_streams(target, self.target_head.to(target.dtype))
        nq, nt = F.normalize(zq, dim=-1), F.normalize(zt, dim=-1)
        shared_negatives = None
        if negatives is not None:
            shared_negatives = F.normalize(dual_streams(negatives, self.target_head.to(negatives.dtype))[0], dim=-1)
        contrastive = batch.replace(query=nq, positives=nt, negatives=shared_negatives).info_nce(scale, self.duplicates)
        regression = (nq - nt).pow(2).sum(-1).mean()
        decorrelation = 0.5 * (
            off_diagonal_correlation(gather_with_grad(zq, world_size))
            + off_diagonal_correlation(gather_with_grad(zt, world_size))
        )
        orthogonality = 0.5 * (orthogonality_loss(sq, pq) + orthogonality_loss(st, pt))
        loss = (
            contrastive
            + self.w_regression * regression
            + self.w_decorrelation * decorrelation
            + self.w_orthogonality * orthogonality
        )
        metrics = {
            "loss_contrastive": contrastive.detach(),
            "loss_regression": regression.detach(),
            "loss_decorrelation": decorrelation.detach(),
            "loss_orthogonality": orthogonality.detach(),
        }
        if self.w_instance > 0:
            instance = batch.info_nce(scale, self.duplicates, normalize=True)
            loss = loss + self.w_instance * instance
            metrics["loss_instance"] = instance.detach()
        metrics.update(modality_gap_metrics(query, target, world_size))
        return loss, metrics


def build_dsrsd(config, embed_dim: int) -> DSRSDObjective:
    loss, dsrsd = config.loss, config.loss.dsrsd
    return DSRSDObjective(
        embed_dim,
        dsrsd.shared_dim,
        dsrsd.w_decorrelation,
        dsrsd.w_orthogonality,
        dsrsd.w_regression,
        dsrsd.w_instance,
        loss.temperature,
        loss.learnable_temperature,
        loss.duplicate_targets,
    )
