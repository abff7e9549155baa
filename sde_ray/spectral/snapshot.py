"""The objective-independent diagnostics of a global batch, logged by training and by evaluation.

σ, the strong / weak / noise partition, energy shares, effective rank and the centroid gap of the
query and target features, so the InfoNCE baseline logs the same numbers as SDE and the evaluator
reports them on the evaluated datasets. A collective when world_size > 1 (every rank calls it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sde_ray.spectral.decompose import distributed_spectrum
from sde_ray.spectral.diagnostics import centroid_gap, effective_rank, energy_shares
from sde_ray.spectral.partition import PartitionRule


@dataclass(frozen=True)
class SpectrumRule:
    """How a global batch's spectrum is taken (`choose_mode(N, d, mode, auto_gram_ratio)`, then
    `distributed_spectrum`) and split (`partition.split(σ, N, d)`): SDE's first two stages, and the
    snapshot's."""

    mode: str  # gather | gram | auto
    auto_gram_ratio: float
    partition: PartitionRule


def spectrum_rule(spectral_config) -> SpectrumRule:
    """The rule of the config's `spectral` section (`sde_ray.config.SpectralConfig`). Read here once
    for the objective builders (`build_sde`) and the application's diagnostics (training loop,
    evaluator); the library below takes the rule."""
    s = spectral_config
    partition = PartitionRule(
        noise_estimator=s.noise_estimator,
        tw_margin=s.tw_margin,
        fence=s.fence,
        iqr_k=s.iqr_k,
        energy_fraction=s.energy_fraction,
        partition=s.partition,
        soft_width=s.soft_width,
    )
    return SpectrumRule(mode=s.mode, auto_gram_ratio=s.auto_gram_ratio, partition=partition)


def spectral_snapshot(query: torch.Tensor, target: torch.Tensor, rule: SpectrumRule, rank: int, world_size: int):
    """Diagnostics of the global batch (a collective: every rank calls it at the same step).

    Returns (metrics, spectra) where `spectra[side]` is the plot-ready dict of `eval.plots.plot_spectrum`.
    """
    metrics: dict[str, float] = {}
    spectra: dict[str, dict[str, Any]] = {}
    num_rows, dim = query.shape[0] * world_size, query.shape[1]
    with torch.no_grad():
        for side, name, features in (("q", "query", query), ("t", "target", target)):
            spectrum = distributed_spectrum(features.detach().float(), rank, world_size, rule.mode,
                                            rule.auto_gram_ratio)
            partition = rule.partition.split(spectrum.sigma, num_rows, dim)
            for subset, share in energy_shares(spectrum.sigma, partition).items():
                metrics[f"energy_{subset}_{side}"] = share
            metrics[f"effective_rank_{side}"] = effective_rank(spectrum.sigma)
            spectra[name] = {
                "sigma": spectrum.sigma.detach().cpu().double().numpy(),
                "strong": partition.strong.cpu().numpy(),
                "weak": partition.weak.cpu().numpy(),
                "noise": partition.noise.cpu().numpy(),
                "noise_edge": partition.tau_mp,
                "strong_fence": max(partition.tau_mp, partition.tau_fence),
            }
        metrics["gap_centroid"] = centroid_gap(query.detach(), target.detach(), world_size)
    return metrics, spectra
