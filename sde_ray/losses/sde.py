"""The SDE objective (`loss.name=sde`): spectral disentanglement and enhancement, dual-domain loss.

One step, per modality on this rank's raw features (top to bottom in `SDEObjective.forward`):
1. the global spectrum σ, V of every rank's rows (gather → SVD, or Gram all-reduce → eigh;
   `spectral.mode`), identical on all ranks;
2. the strong / weak / noise partition (`spectral.partition_spectrum`; hard masks or soft
   memberships, `spectral.partition`);
3. training only: Δ(α(t)) with ξ from `context.generator` (same on all ranks) or the adversarial
   sign, and F' = F·M applied to the local rows;
4. the instance loss: symmetric InfoNCE over the global batch on the L2-normalised F';
5. the spectral terms on the raw F (Hellinger, subspace consistency, SNR), through energies
   ‖F v_i‖² with V detached — no SVD backward;
6. total = λ(t)·L_inst + (1 − λ(t))(w_h·L_hell + w_s·L_sub) + w_snr·L_snr.

Explicit negatives (`target` in the per-query layout of `sde_ray.losses.infonce`) are left out of
the spectrum, the partition and the spectral terms, which compare the two modalities' spectra of
*paired* rows; they are mapped by the target modality's M, the map the paired rows see, and join
the instance loss as candidates (docs/objectives.md).

The spectral terms are the same number on every rank, so the mean of the per-rank losses is the
global loss and rank-averaged gradients equal the single-process ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sde_ray.distributed import all_ranks_true
from sde_ray.losses import StepContext
from sde_ray.losses.dual_domain import (
    dual_domain_total,
    frozen_basis,
    hellinger_distance,
    hellinger_loss,
    projected_energies,
    projector_distance,
    spectral_distribution,
    subspace_surrogate,
)
from sde_ray.losses.batch import ContrastiveBatch, ContrastiveObjective
from sde_ray.losses.objectives import Temperature
from sde_ray.spectral import (
    Partition,
    Schedule,
    Spectrum,
    SpectrumRule,
    adversarial_signs,
    apply_enhancement,
    centroid_gap,
    choose_mode,
    distributed_spectrum,
    effective_rank,
    energy_shares,
    enhancement_deltas,
    random_signs,
    schedule_value,
    smallest_principal_angle,
    snr_loss,
    spectrum_rule,
)


def _finite_on_every_rank(query: torch.Tensor, target: torch.Tensor, world_size: int) -> bool:
    return all_ranks_true(bool(torch.isfinite(query).all() and torch.isfinite(target).all()), world_size)


@dataclass(frozen=True)
class SDESpectral:
    """Stages 1–3: how σ, V are taken and split (`spectrum`), and the enhancement Δ(α(t))."""

    spectrum: SpectrumRule
    alpha: Schedule
    eps_strong: float
    eps_weak: float
    eps_noise: float
    rho: float
    strong_perturbation: str  # random | adversarial


@dataclass(frozen=True)
class SDELoss:
    """Stages 4–6: the instance loss and the dual-domain total."""

    temperature: float
    learnable_temperature: bool
    duplicate_targets: str  # ignore | mask | multi_positive
    lambda_schedule: Schedule
    w_hellinger: float
    w_subspace: float
    w_snr: float
    hellinger_on: str  # singular | energy
    hellinger_numerical_rank: bool
    subspace_k: int
    subspace_form: str  # projector | surrogate


class SDEObjective(ContrastiveObjective):
    """λ(t)·InfoNCE(F_q·M_q, F_t·M_t) + (1 − λ(t))·spectral terms + w_snr·L_snr.

    Takes its own two frozen dataclasses of plain values, not config sections (`build_sde` fills
    them from the config's `spectral` and `loss` keys of the same names)."""

    def __init__(self, spectral: SDESpectral, loss: SDELoss):
        super().__init__()
        self.spectral = spectral
        self.loss = loss
        self.scale = Temperature(loss.temperature, loss.learnable_temperature)

    def _instance(self, batch: ContrastiveBatch, logit_scale) -> torch.Tensor:
        return batch.info_nce(logit_scale, self.loss.duplicate_targets, normalize=True)

    def _strong_xi(self, features, spectra, logit_scale, context: StepContext,
                   batch: ContrastiveBatch) -> list[torch.Tensor]:
        """ξ per modality: uniform [−1, 1] from the shared generator, or sign(∂L_inst/∂σ_i)."""
        if self.spectral.strong_perturbation == "random":
            if context.generator is None and context.world_size > 1:
                raise ValueError("SDE with strong_perturbation=random needs context.generator on every rank")
            return [random_signs(s.rank, context.generator, s.sigma.device) for s in spectra]
        leaves = [
            x.detach().to(torch.promote_types(x.dtype, torch.float32)).requires_grad_() for x in features
        ]
        with torch.enable_grad():
            negatives = None if batch.negatives is None else batch.negatives.detach()
            loss = self._instance(batch.replace(query=leaves[0], positives=leaves[1], negatives=negatives),
                                  logit_scale.detach())
            gradients = torch.autograd.grad(loss, leaves)
        return [
            adversarial_signs(x, s.basis, g, context.world_size)
            for x, s, g in zip(leaves, spectra, gradients)
        ]

    def contrastive(self, batch: ContrastiveBatch, context: StepContext):
        query, target, negatives = batch.query, batch.positives, batch.negatives
        if query.dim() != 2 or query.shape != target.shape:
            raise ValueError(
                f"query and target must be (B × d) of the same shape, got {tuple(query.shape)} and {tuple(target.shape)}"
            )
        sp, lc = self.spectral, self.loss
        rank, world_size = context.rank, context.world_size
        if not _finite_on_every_rank(query, target if negatives is None else torch.cat([target, negatives]),
                                     world_size):
            # A NaN loss on every rank (not an exception on one) lets the trainer's nan_policy act.
            nan = float("nan")
            extra = 0.0 if negatives is None else negatives.sum()
            return (query.sum() + target.sum() + extra) * nan, {"loss": nan, "nonfinite_features": 1.0}
        num_rows, dim = query.shape[0] * world_size, query.shape[1]
        mode = choose_mode(num_rows, dim, sp.spectrum.mode, sp.spectrum.auto_gram_ratio)
        features = (query, target)
        spectra: list[Spectrum] = [distributed_spectrum(x, rank, world_size, mode) for x in features]
        resolved = [_above_numerical_rank(s.sigma, max(num_rows, dim), query.dtype, mode) for s in spectra]
        # σ's below the numerical rank are zeros up to rounding: partitioned as exact zeros, so that the
        # thresholds (a median, quantiles) do not follow the rounding when they fall among them.
        partitions: list[Partition] = [
            sp.spectrum.partition.split(torch.where(keep, s.sigma, 0.0), num_rows, dim)
            for s, keep in zip(spectra, resolved)
        ]
        alpha = schedule_value(sp.alpha, context.progress)
        lam = schedule_value(lc.lambda_schedule, context.progress)
        logit_scale = self.scale()

        enhanced, enhanced_negatives = features, negatives
        bound_factors = [1.0, 1.0]
        if context.training:
            xis = self._strong_xi(features, spectra, logit_scale, context, batch)
            enhancements = [
                enhancement_deltas(
                    s.sigma,
                    p,
                    alpha,
                    xi,
                    eps_strong=sp.eps_strong,
                    eps_weak=sp.eps_weak,
                    eps_noise=sp.eps_noise,
                    rho=sp.rho,
                )
                for s, p, xi in zip(spectra, partitions, xis)
            ]
            enhanced = tuple(
                apply_enhancement(x, s.basis, e.scale, e.base_scale)
                for x, s, e in zip(features, spectra, enhancements)
            )
            bound_factors = [e.bound_factor for e in enhancements]
            if negatives is not None:
                # The paired rows' M, (1 + b) outside the strong/weak directions: a negative's part outside
                # their signal subspace is attenuated like noise. I + V·diag(scale)·Vᵀ (b = 0) would
                # depend on which null directions of a rank-deficient target batch V holds (rounding).
                enhanced_negatives = apply_enhancement(
                    negatives, spectra[1].basis, enhancements[1].scale, enhancements[1].base_scale
                )
        loss_instance = self._instance(
            batch.replace(query=enhanced[0], positives=enhanced[1], negatives=enhanced_negatives), logit_scale)

        energies = [projected_energies(x, s.basis, world_size) for x, s in zip(features, spectra)]
        hellinger_energies = energies
        if lc.hellinger_numerical_rank:
            hellinger_energies = [_detach_below_numerical_rank(e, keep) for e, keep in zip(energies, resolved)]
        loss_hellinger = hellinger_loss(hellinger_energies[0], hellinger_energies[1], lc.hellinger_on)
        k = min(lc.subspace_k, spectra[0].rank)
        tops = [s.basis[:, :k] for s in spectra]
        if lc.subspace_form == "surrogate":
            loss_subspace = subspace_surrogate(query, target, tops[0], tops[1], world_size)
        else:
            bases = [frozen_basis(x, v, s.sigma[:k], world_size) for x, v, s in zip(features, tops, spectra)]
            loss_subspace = projector_distance(bases[0], bases[1])
        loss_snr = 0.5 * sum(snr_loss(e, p.weights()[2], alpha) for e, p in zip(energies, partitions))
        total = dual_domain_total(
            loss_instance,
            loss_hellinger,
            loss_subspace,
            loss_snr,
            lam,
            lc.w_hellinger,
            lc.w_subspace,
            lc.w_snr,
        )
        metrics = {
            "loss": total.detach(),
            "loss_instance": loss_instance.detach(),
            "loss_hellinger": loss_hellinger.detach(),
            "loss_subspace": loss_subspace.detach(),
            "loss_snr": loss_snr.detach(),
            "alpha": alpha,
            "lambda": lam,
            "spectral_mode_gram": 1.0 if mode == "gram" else 0.0,
            "hellinger_distance": hellinger_distance(
                spectral_distribution(energies[0].detach(), lc.hellinger_on),
                spectral_distribution(energies[1].detach(), lc.hellinger_on),
            ),
            "gap_centroid": centroid_gap(query, target, world_size),
            "gap_min_angle": smallest_principal_angle(tops[0], tops[1]),
        }
        for side, spectrum, partition, bound in zip("qt", spectra, partitions, bound_factors):
            metrics.update(_side_metrics(side, spectrum, partition, bound))
        return total, metrics


def _above_numerical_rank(sigma: torch.Tensor, size: int, dtype: torch.dtype, mode: str) -> torch.Tensor:
    """Which σ_i are above the numerical rank: σ_i > σ_1·max(N, d)·eps, numpy's matrix_rank
    tolerance for the features' dtype; in Gram mode at least σ_1·√(max(N, d)·eps_float64), since
    eigh of the float64 Gram resolves σ² to max(N, d)·eps·σ_1² (it squares the condition number).
    Below it, σ_i and its singular vectors are rounding noise (duplicate rows, collapsed features):
    they differ between one process and the ranks' gather or Gram, and between row orders."""
    if sigma.numel() == 0:
        return torch.ones_like(sigma, dtype=torch.bool)
    relative = size * torch.finfo(dtype).eps
    if mode == "gram":
        relative = max(relative, (size * torch.finfo(torch.float64).eps) ** 0.5)
    return sigma > float(sigma[0]) * relative


def _detach_below_numerical_rank(energies: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Energies with no gradient through the directions below the numerical rank (`keep` false).

    Why: there u_i = F v_i/σ_i is rounding noise, so the Hellinger gradient's push on those σ_i —
    large, since ∂√p/∂p grows as p → 0 — points in an arbitrary, row-order-dependent direction. The
    values (hence the loss) are unchanged."""
    return torch.where(keep.to(device=energies.device), energies, energies.detach())


def _side_metrics(side: str, spectrum: Spectrum, partition: Partition, bound_factor: float) -> dict[str, float]:
    """One modality's spectral diagnostics, keyed `<name>_q` / `<name>_t`."""
    metrics = {f"energy_{name}_{side}": share for name, share in energy_shares(spectrum.sigma, partition).items()}
    metrics[f"effective_rank_{side}"] = effective_rank(spectrum.sigma)
    metrics[f"num_strong_{side}"] = float(partition.num_strong)
    metrics[f"num_weak_{side}"] = float(partition.num_weak)
    metrics[f"num_noise_{side}"] = float(partition.num_noise)
    metrics[f"tau_mp_{side}"] = partition.tau_mp
    metrics[f"delta_bound_factor_{side}"] = bound_factor
    return metrics


def sde_spectral(spectral_config) -> SDESpectral:
    """`SDESpectral` from the config's `spectral` section (also what `sde-ray bench spectral` times)."""
    s = spectral_config
    return SDESpectral(
        spectrum=spectrum_rule(s),
        alpha=s.alpha,
        eps_strong=s.eps_strong,
        eps_weak=s.eps_weak,
        eps_noise=s.eps_noise,
        rho=s.rho,
        strong_perturbation=s.strong_perturbation,
    )


def build_sde(config, embed_dim: int) -> SDEObjective:
    """The SDE objective from the whole `Config` (sections `spectral` and `loss`): the one place
    that reads them."""
    if embed_dim < 1:
        raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
    loss = config.loss
    return SDEObjective(
        sde_spectral(config.spectral),
        SDELoss(
            temperature=loss.temperature,
            learnable_temperature=loss.learnable_temperature,
            duplicate_targets=loss.duplicate_targets,
            lambda_schedule=loss.lambda_schedule,
            w_hellinger=loss.w_hellinger,
            w_subspace=loss.w_subspace,
            w_snr=loss.w_snr,
            hellinger_on=loss.hellinger_on,
            hellinger_numerical_rank=loss.hellinger_numerical_rank,
            subspace_k=loss.subspace_k,
            subspace_form=loss.subspace_form,
        ),
    )
