"""The spectral stage and the diagnostics with CPU features while torch's default device is `meta`
(tests/conftest.py `meta_default_device`): the snapshot (both decomposition routes, every fence and
noise estimator, soft and hard partitions), the energy shares, effective rank and modality gap.
A tensor made without an explicit device lands on `meta` and fails here as it would beside CUDA
features; the IQR estimator and fence did (their quantile probabilities were made on the CPU).
Reference: the same calls outside the mode."""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import load_config
from sde_ray.spectral import (
    effective_rank,
    energy_shares,
    modality_gap,
    spectral_snapshot,
    spectrum_rule,
    svd_spectrum,
)

RULES = [
    ["spectral.mode=gather", "spectral.noise_estimator=iqr", "spectral.fence=iqr"],
    ["spectral.mode=gram", "spectral.noise_estimator=gavish_donoho", "spectral.fence=energy"],
    ["spectral.mode=gather", "spectral.fence=log_gap"],
    ["spectral.mode=gram", "spectral.noise_estimator=iqr", "spectral.partition=soft"],
]


def _features():
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(24, 3, generator=g) @ torch.randn(3, 32, generator=g) * 4.0
    return shared + torch.randn(24, 32, generator=g), shared + torch.randn(24, 32, generator=g)


def _everything(query: torch.Tensor, target: torch.Tensor, rule) -> dict:
    metrics, spectra = spectral_snapshot(query, target, rule, rank=0, world_size=1)
    sigma = svd_spectrum(query).sigma
    partition = rule.partition.split(sigma, query.shape[0], query.shape[1])
    return {**metrics, **{f"share_{k}": v for k, v in energy_shares(sigma, partition).items()},
            "signal_directions": int((partition.strong | partition.weak).sum()),
            "effective_rank": effective_rank(sigma), **modality_gap(query, target, k=4),
            "spectra": spectra}


@pytest.mark.parametrize("overrides", RULES, ids=lambda o: "-".join(v.split("=")[1] for v in o))
def test_snapshot_and_diagnostics_run_with_meta_as_the_default_device(meta_default_device, overrides):
    rule = spectrum_rule(load_config(None, overrides).spectral)
    query, target = _features()
    want = _everything(query, target, rule)
    with meta_default_device():
        got = _everything(query, target, rule)
    assert want["signal_directions"] == 3  # the planted directions: a real partition ran
    assert {k: v for k, v in got.items() if k != "spectra"} == {k: v for k, v in want.items() if k != "spectra"}
