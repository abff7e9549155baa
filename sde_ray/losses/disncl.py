"""DisNCL: disentangled noisy-correspondence learning (`loss.name=disncl`).

DisNCL (Dang et al., arXiv 2408.05503, IEEE TIP 2025) separates modality-invariant from modality-
exclusive information, measures cross-modal similarity on the invariant part only, and trains with
soft many-to-many targets so that noisy (mismatched) pairs hurt less. Its exact losses are not
public; this is our reading (docs/objectives.md), with every constant in `loss.disncl`:

- split: the first k = round(invariant_fraction·d) feature dimensions are the invariant part, the
  rest the exclusive part (the encoder's last linear layer makes a fixed coordinate split as
  expressive as a learned linear one);
- soft targets over the global batch: Y = (1 − ε)·I + ε·softmax_j(S_ij / τ_s), where
  S_ij = ½(q̂_i·q̂_j + t̂_i·t̂_j) is the (detached) intra-modal similarity of the invariant parts;
  rows sum to 1 and Y is one-hot at ε = 0;
- pair confidence: w_i = σ(m_i / τ_w), m_i = s_ii − max_{j≠i} max(s_ij, s_ji) with s the cross-modal
  cosine similarity of the invariant parts (detached): a pair whose positive is beaten by some
  negative is likely mismatched. Weights are renormalised to mean 1 over the global batch and are all
  1 during the first `mismatch_warmup` of training;
- alignment: Σ_i w_i·½(CE(Y_i, q_i→T) + CE(Y_i, t_i→Q)) / N on the invariant parts, temperature τ;
- disentanglement: mean squared cross-correlation between invariant and exclusive dimensions over
  the global batch, per modality (zero when the two parts are uncorrelated), weight `w_exclusive`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sde_ray.losses import StepContext
from sde_ray.losses.gap import modality_gap_metrics
from sde_ray.distributed import gather_no_grad, gather_with_grad
from sde_ray.losses.objectives import Temperature


def soft_targets(
    intra_similarity: torch.Tensor, labels: torch.Tensor, smoothing: float, temperature: float
) -> torch.Tensor:
    """Rows (1 − ε)·onehot(label) + ε·softmax(similarity / τ_s): each row sums to 1."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"soft-target smoothing must be in [0, 1], got {smoothing}")
    if temperature <= 0:
        raise ValueError(f"soft-target temperature must be > 0, got {temperature}")
    one_hot = F.one_hot(labels, intra_similarity.shape[1]).to(intra_similarity.dtype)
    if smoothing == 0.0:
        return one_hot
    return (1.0 - smoothing) * one_hot + smoothing * torch.softmax(intra_similarity / temperature, dim=1)


def pair_confidence(
    query_to_all: torch.Tensor, target_to_all: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """σ(margin / τ_w) per local row: the positive's similarity minus the best negative's, both ways.

    `query_to_all[i, j]` = s(q_i, t_j) and `target_to_all[i, j]` = s(t_i, q_j) over the global batch.
    """
    if temperature <= 0:
        raise ValueError(f"mismatch temperature must be > 0, got {temperature}")
    if query_to_all.shape[1] < 2:
        raise ValueError("DisNCL needs a global batch of at least 2 pairs")
    is_positive = F.one_hot(labels, query_to_all.shape[1]).bool()
    positive = query_to_all.gather(1, labels[:, None]).squeeze(1)
    hardest_negative = torch.maximum(
        query_to_all.masked_fill(is_positive, float("-inf")).amax(1),
        target_to_all.masked_fill(is_positive, float("-inf")).amax(1),
    )
    return torch.sigmoid((positive - hardest_negative) / temperature)


def cross_correlation_penalty(first: torch.Tensor, second: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean squared correlation between every column of `first` and every column of `second`.

    Columns are standardised over the global batch (gathered with gradient); 0 for empty parts.
    """
    if first.shape[1] == 0 or second.shape[1] == 0:
        return first.sum() * 0.0
    both = gather_with_grad(torch.cat([first, second], dim=1), world_size)
    standardised = (both - both.mean(0)) / (both.std(0, unbiased=False) + 1e-6)
    a, b = standardised[:, : first.shape[1]], standardised[:, first.shape[1] :]
    correlation = a.T @ b / both.shape[0]
    return correlation.pow(2).mean()


class DisNCLObjective(torch.nn.Module):
    """Soft-target, confidence-weighted InfoNCE on the invariant part + invariant/exclusive decorrelation."""

    def __init__(
        self,
        embed_dim: int,
        invariant_fraction: float,
        smoothing: float,
        soft_temperature: float,
        mismatch_temperature: float,
        mismatch_warmup: float,
        w_exclusive: float,
        temperature: float,
        learnable_temperature: bool,
    ):
        super().__init__()
        if not 0.0 < invariant_fraction <= 1.0:
            raise ValueError(f"loss.disncl.invariant_fraction must be in (0, 1], got {invariant_fraction}")
        self.invariant_dim = max(1, round(invariant_fraction * embed_dim))
        self.smoothing, self.soft_temperature = smoothing, soft_temperature
        self.mismatch_temperature, self.mismatch_warmup = mismatch_temperature, mismatch_warmup
        self.w_exclusive = w_exclusive
        self.scale = Temperature(temperature, learnable_temperature)

    def forward(self, query: torch.Tensor, target: torch.Tensor, context: StepContext):
        k, world_size = self.invariant_dim, context.world_size
        if target.shape[0] != query.shape[0]:
            raise ValueError(
                "disncl builds soft many-to-many targets over paired rows and takes no explicit negatives "
                f"(target has {target.shape[0]} rows for {query.shape[0]} queries); set loss.negatives_per_query=0"
            )
        if query.shape[1] < k:
            raise ValueError(f"features have {query.shape[1]} dims but the invariant part needs {k}")
        q = F.normalize(query[:, :k], dim=-1)
        t = F.normalize(target[:, :k], dim=-1)
        all_q, all_t = gather_with_grad(q, world_size), gather_with_grad(t, world_size)
        local = q.shape[0]
        labels = torch.arange(local, device=q.device) + local * context.rank
        q_to_t, t_to_q = q @ all_t.T, t @ all_q.T
        with torch.no_grad():
            intra = 0.5 * (q @ all_q.T + t @ all_t.T)
            targets = soft_targets(intra, labels, self.smoothing, self.soft_temperature)
            if context.progress < self.mismatch_warmup:
                weights = torch.ones(local, device=q.device, dtype=q.dtype)
            else:
                weights = pair_confidence(q_to_t, t_to_q, labels, self.mismatch_temperature)
                weights = weights / gather_no_grad(weights.contiguous(), world_size).mean().clamp_min(1e-12)
        scale = self.scale()
        per_pair = 0.5 * (
            -(targets * F.log_softmax(scale * q_to_t, dim=1)).sum(1)
            - (targets * F.log_softmax(scale * t_to_q, dim=1)).sum(1)
        )
        alignment = (weights * per_pair).mean()
        decorrelation = 0.5 * (
            cross_correlation_penalty(query[:, :k], query[:, k:], world_size)
            + cross_correlation_penalty(target[:, :k], target[:, k:], world_size)
        )
        loss = alignment + self.w_exclusive * decorrelation
        metrics = {
            "loss_alignment": alignment.detach(),
            "loss_decorrelation": decorrelation.detach(),
            "pair_weight_min": weights.detach().min(),
        }
        metrics.update(modality_gap_metrics(query, target, world_size))
        return loss, metrics


def build_disncl(config, embed_dim: int) -> DisNCLObjective:
    loss, disncl = config.loss, config.loss.disncl
    return DisNCLObjective(
        embed_dim,
        disncl.invariant_fraction,
        disncl.soft_target_smoothing,
        disncl.soft_target_temperature,
        disncl.mismatch_temperature,
        disncl.mismatch_warmup,
        disncl.w_exclusive,
        loss.temperature,
        loss.learnable_temperature,
    )
