"""PNG plots of the evaluation and the spectral diagnostics (matplotlib, Agg backend).

Each function takes plain arrays/dicts, writes one PNG and returns its path, so the training loop,
the eval runner and the notebooks share them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sde_ray.data.mmeb import META_TASK_TITLES  # noqa: E402

SUBSPACE_COLOURS = {"strong": "tab:red", "weak": "tab:orange", "noise": "tab:gray"}
META_TASK_COLOURS = {
    "classification": "tab:blue",
    "vqa": "tab:orange",
    "retrieval": "tab:green",
    "grounding": "tab:purple",
}


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_spectrum(
    spectra: Mapping[str, Mapping[str, object]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Singular values per modality, one panel each, coloured by subspace, with both thresholds.

    `spectra[modality]` holds `sigma` (descending), boolean masks `strong`, `weak`, `noise`, and the
    scalars `noise_edge` (Marchenko-Pastur edge with its margin) and `strong_fence`.
    """
    figure, axes = plt.subplots(1, len(spectra), figsize=(5.5 * len(spectra), 4), squeeze=False)
    for axis, (modality, spec) in zip(axes[0], spectra.items()):
        sigma = np.asarray(spec["sigma"], dtype=float)
        index = np.arange(1, sigma.size + 1)
        for name, colour in SUBSPACE_COLOURS.items():
            mask = np.asarray(spec[name], dtype=bool)
            axis.scatter(index[mask], sigma[mask], s=14, color=colour, label=f"{name} ({int(mask.sum())})")
        axis.plot(index, sigma, color="black", linewidth=0.6, alpha=0.5)
        axis.axhline(float(spec["noise_edge"]), color="tab:gray", linestyle="--", label="noise edge (MP)")
        axis.axhline(float(spec["strong_fence"]), color="tab:red", linestyle=":", label="strong fence")
        if sigma.size and sigma.min() > 0:
            axis.set_yscale("log")
        axis.set_xlabel("index i")
        axis.set_ylabel("σ_i")
        axis.set_title(modality)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_energy_over_training(
    steps: Sequence[float], shares: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike
) -> Path:
    """Energy share of strong / weak / noise against the step; one panel per modality.

    `shares[modality][subspace]` is a sequence aligned with `steps` (NaN where not logged).
    """
    figure, axes = plt.subplots(
        1, max(len(shares), 1), figsize=(5.5 * max(len(shares), 1), 3.8), squeeze=False
    )
    for axis, (modality, series) in zip(axes[0], shares.items()):
        for name, values in series.items():
            values = np.asarray(values, dtype=float)
            logged = np.isfinite(values)
            axis.plot(
                np.asarray(steps, dtype=float)[logged],
                100.0 * values[logged],
                marker="o",
                markersize=3,
                color=SUBSPACE_COLOURS.get(name),
                label=name,
            )
        axis.set_xlabel("step")
        axis.set_ylabel("energy share (%)")
        axis.set_title(modality)
        axis.legend(fontsize=8)
    return _save(figure, path)


def plot_p_at_1(results: dict, path: str | os.PathLike, title: str = "P@1 per dataset") -> Path:
    """Bars of P@1 (%) per dataset coloured by meta-task, with the overall mean as a line."""
    names = list(results["datasets"])
    values = [100.0 * results["datasets"][n]["p_at_1"] for n in names]
    tasks = [results["datasets"][n]["meta_task"] for n in names]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.35 * len(names) + 2), 4))
    axis.bar(range(len(names)), values, color=[META_TASK_COLOURS.get(t, "tab:cyan") for t in tasks])
    if results.get("overall") is not None:
        axis.axhline(
            100.0 * results["overall"],
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"overall {100.0 * results['overall']:.1f}",
        )
    for task in dict.fromkeys(tasks):
        axis.bar(
            [0], [0], color=META_TASK_COLOURS.get(task, "tab:cyan"), label=META_TASK_TITLES.get(task, task)
        )
    axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    axis.set_ylabel("P@1 (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    axis.legend(fontsize=8)
    return _save(figure, path)


def plot_series(
    steps: Sequence[float], series: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """One small panel per scalar metric against the step (effective rank, modality gap, P@1...)."""
    count = max(len(series), 1)
    figure, axes = plt.subplots(1, count, figsize=(3.6 * count, 3.2), squeeze=False)
    for axis, (name, values) in zip(axes[0], series.items()):
        values = np.asarray(values, dtype=float)
        logged = np.isfinite(values)
        axis.plot(np.asarray(steps, dtype=float)[logged], values[logged], marker="o", markersize=3)
        axis.set_xlabel("step")
        axis.set_title(name, fontsize=9)
    if title:
        figure.suptitle(title)
    return _save(figure, path)
