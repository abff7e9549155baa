"""The objective-independent diagnostics of a global batch, logged by training and by evaluation.

σ, the strong / weak / noise partition, energy shares, effective rank and the centroid gap of the
query and target features, so the InfoNCE baseline logs the same numbers as SDE and the evaluator
reports them on the evaluated datasets. A collective when world_size > 1 (every rank calls it).
"""

from __future__ import annotations

from typing import Any

import torch

from sde_ray.spectral.decompose import distributed_spectrum
from sde_ray.spectral.diagnostics import centroid_gap, effective_rank, energy_shares
from sde_ray.spectral.partition import partition_kwargs, partition_spectrum


def spectral_snapshot(query: torch.Tensor, target: torch.Tensor, spectral_config, rank: int, world_size: int):
    """Diagnostics of the global batch (a collective: every rank calls it at the same step).

    Returns (metrics, spectra) where `spectra[side]` is the plot-ready dict of `eval.plots.plot_spectrum`.
    `spectral_config`: the `spectral` section of the config (mode, auto_gram_ratio, partition keys).
    """
    metrics: dict[str, float] = {}
    spectra: dict[str, dict[str, Any]] = {}
    num_rows, dim = query.shape[0] * world_size, query.shape[1]
    with torch.no_grad():
        for side, name, features in (("q", "query", query), ("t", "target", target)):
            spectrum = distributed_spectrum(features.detach().float(), rank, world_size, spectral_config.mode,
                                            spectral_config.auto_gram_ratio)
            partition = partition_spectrum(spectrum.sigma, num_rows, dim, **partition_kwargs(spectral_config))
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
