"""FANoise: feature-adaptive spectral noise injection for InfoNCE (`loss.name=fanoise`).

FANoise (arXiv 2511.20997) adds Gaussian noise along the principal directions of the features, with
a strength that grows sublinearly with the singular value, and trains InfoNCE on the noisy features.
The paper's exact formula is not public; this is our reading (docs/objectives.md):

With the global batch F = U Σ Vᵀ (N × d, raw features before normalisation) of one modality,

    F̃ = F + Z·diag(s)·Vᵀ,   Z_ni ~ N(0, 1),   s_i² = γ(t) · σ_i^{2p} · Σ_j σ_j² / (N · Σ_j σ_j^{2p}),

so each row gets noise of std s_i ∝ σ_i^p along v_i, and the expected injected energy is exactly
E‖F̃ − F‖²_F = γ(t)·‖F‖²_F, with γ(t) = strength · schedule(t). Training only; the noise is
detached (the decomposition is never differentiated), and InfoNCE runs on normalise(F̃).

Distributed: σ and V come from the global batch (`sde_ray.spectral.distributed_spectrum`, gather or
Gram route); with a shared `StepContext.generator` every rank draws the global N × r matrix Z and
keeps its own rows, so the noise equals the single-process noise on the concatenated batch.
"""

from __future__ import annotations

import torch

from sde_ray.losses import StepContext
from sde_ray.losses.gap import modality_gap_metrics
from sde_ray.losses.batch import ContrastiveBatch, ContrastiveObjective
from sde_ray.losses.objectives import Temperature
from sde_ray.spectral.decompose import Spectrum, distributed_spectrum
from sde_ray.spectral.schedules import Schedule, schedule_value

INJECT_SIDES = ("both", "query", "target")


def direction_stds(spectrum: Spectrum, level: float, power: float) -> torch.Tensor:
    """Per-direction noise std s_i, so that the expected noise energy is `level`·Σσ² over N rows."""
    sigma = spectrum.sigma.double()
    weights = sigma.pow(2 * power)
    total_weight = weights.sum()
    if level <= 0 or total_weight <= 0:
        return torch.zeros_like(spectrum.sigma)
    variances = level * weights * sigma.pow(2).sum() / (spectrum.num_rows * total_weight)
    return variances.sqrt().to(spectrum.sigma.dtype)


def spectral_noise(
    local_features: torch.Tensor,
    level: float,
    power: float,
    rank: int,
    world_size: int,
    generator: torch.Generator | None = None,
    spectral_mode: str = "auto",
    auto_gram_ratio: float = 1.0,
) -> torch.Tensor:
    """The (detached) noise for this rank's rows, shaped like `local_features`.

    With a `generator` (seeded equally on every rank) the global Z is drawn and sliced, so the result
    does not depend on how the batch is split over ranks; without one, only local rows are drawn.
    """
    if power <= 0:
        raise ValueError(f"FANoise power must be > 0, got {power}")
    # Non-finite features (a diverging step) must give a non-finite loss for the NaN policy, not an
    # exception: the noise is shaped by the spectrum of the finite entries (zeros elsewhere), and
    # the loss on features + noise carries the NaN/Inf through. Every rank takes the same path, so
    # the collectives stay in step whichever rank diverged.
    finite = local_features.detach()
    finite = torch.where(torch.isfinite(finite), finite, torch.zeros_like(finite))
    spectrum = distributed_spectrum(finite, rank, world_size, spectral_mode, auto_gram_ratio)
    stds = direction_stds(spectrum, level, power)
    # Each v_i is defined up to sign and the two decomposition routes may disagree; fixing the sign
    # makes the noise a function of F alone, whichever route and split of the batch produced V.
    basis = spectrum.basis
    pivots = basis.abs().argmax(dim=0)
    basis = basis * torch.sign(basis[pivots, torch.arange(basis.shape[1], device=basis.device)])
    local_rows = local_features.shape[0]
    draw_device = generator.device if generator is not None else local_features.device
    if generator is not None:
        z = torch.randn(spectrum.num_rows, spectrum.rank, generator=generator, device=draw_device)
        z = z[rank * local_rows : (rank + 1) * local_rows]
    else:
        z = torch.randn(local_rows, spectrum.rank, device=draw_device)
    z = z.to(device=local_features.device, dtype=basis.dtype)
    return ((z * stds) @ basis.T).to(local_features.dtype)


class FANoiseObjective(ContrastiveObjective):
    """Symmetric InfoNCE on features with σ^p-shaped spectral noise on a schedule (training only)."""

    def __init__(
        self,
        power: float,
        strength: float,
        schedule: Schedule,
        inject: str,
        temperature: float,
        learnable_temperature: bool,
        duplicates: str,
        spectral_mode: str = "auto",
        auto_gram_ratio: float = 1.0,
    ):
        super().__init__()
        if inject not in INJECT_SIDES:
            raise ValueError(f"unknown FANoise inject side {inject!r}; valid: {', '.join(INJECT_SIDES)}")
        if power <= 0:
            raise ValueError(f"loss.fanoise.power must be > 0, got {power}")
        if strength < 0:
            raise ValueError(f"loss.fanoise.strength must be >= 0, got {strength}")
        self.power, self.strength, self.schedule, self.inject = power, strength, schedule, inject
        self.scale = Temperature(temperature, learnable_temperature)
        self.duplicates = duplicates
        self.spectral_mode, self.auto_gram_ratio = spectral_mode, auto_gram_ratio

    def noise_level(self, context: StepContext) -> float:
        """γ(t): the expected injected energy as a share of ‖F‖²_F (0 outside training)."""
        return self.strength * schedule_value(self.schedule, context.progress) if context.training else 0.0

    def _noisy(
        self, features: torch.Tensor, level: float, context: StepContext
    ) -> tuple[torch.Tensor, float]:
        if level <= 0:
            return features, 0.0
        noise = spectral_noise(
            features,
            level,
            self.power,
            context.rank,
            context.world_size,
            context.generator,
            self.spectral_mode,
            self.auto_gram_ratio,
        )
        realised = (noise.float().pow(2).sum() / features.detach().float().pow(2).sum().clamp_min(1e-12)).detach()
        return features + noise, realised

    def contrastive(self, batch: ContrastiveBatch, context: StepContext):
        # Explicit negatives enter the InfoNCE candidates without noise: the noise lives in the
        # spectrum of the paired rows, which is what FANoise regularises.
        query, target = batch.query, batch.positives
        level = self.noise_level(context)
        noisy_query, query_energy = self._noisy(
            query, level if self.inject in ("both", "query") else 0.0, context
        )
        noisy_target, target_energy = self._noisy(
            target, level if self.inject in ("both", "target") else 0.0, context
        )
        loss = batch.replace(query=noisy_query, positives=noisy_target).info_nce(
            self.scale(), self.duplicates, normalize=True)
        metrics = {
            "loss_instance": loss.detach(),
            "fanoise_level": level,
            "fanoise_energy_query": query_energy,
            "fanoise_energy_target": target_energy,
        }
        metrics.update(modality_gap_metrics(query, target, context.world_size))
        return loss, metrics


def build_fanoise(config, embed_dim: int) -> FANoiseObjective:
    del embed_dim
    loss, fanoise = config.loss, config.loss.fanoise
    return FANoiseObjective(
        fanoise.power,
        fanoise.strength,
        fanoise.schedule,
        fanoise.inject,
        loss.temperature,
        loss.learnable_temperature,
        loss.duplicate_targets,
        config.spectral.mode,
        config.spectral.auto_gram_ratio,
    )
