"""Spectral and modality-gap diagnostics of a checkpoint on an eval set, and across training.

On an eval set, the paired features are each scorable row's query embedding and its positive's
(candidate 0) embedding, raw as the encoder emits them (before L2 normalisation), pooled over the
evaluated datasets. They go through the same `spectral_snapshot` the training loop logs, so the
numbers carry the same names (`energy_{strong,weak,noise}_{q,t}`, `effective_rank_{q,t}`,
`gap_centroid`) and mean the same thing; the principal angles between the two sides' top-k
subspaces are added (`gap_min_principal_angle`, `gap_mean_principal_angle`, radians).

Across training, `training_history` reads `<run>/metrics.jsonl` (one JSON object per logged step)
and `write_history_plots` draws the energy shares, effective rank and gap against the step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from sde_ray.eval import plots
from sde_ray.spectral import modality_gap, spectral_snapshot, spectrum_rule

SUBSPACES = ("strong", "weak", "noise")
SIDES = {"q": "query", "t": "target"}
HISTORY_SCALARS = ("effective_rank_q", "effective_rank_t", "gap_centroid", "modality_gap", "val_p_at_1")


def pool_pairs(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], max_rows: int | None = 4096, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-dataset (queries, positives) stacked, at most `max_rows` rows (a seeded sample)."""
    query = np.concatenate([q for q, _ in pairs]) if pairs else np.zeros((0, 0), np.float32)
    target = np.concatenate([t for _, t in pairs]) if pairs else np.zeros((0, 0), np.float32)
    if max_rows is not None and len(query) > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(len(query), max_rows, replace=False))
        query, target = query[keep], target[keep]
    return query, target


def feature_diagnostics(
    query: np.ndarray, target: np.ndarray, config, k: int | None = None
) -> tuple[dict, dict]:
    """(metrics, spectra) of paired features; `spectra` is what `plots.plot_spectrum` draws."""
    if len(query) < 2:
        raise ValueError(f"diagnostics need at least 2 scorable rows, got {len(query)}")
    q = torch.from_numpy(np.asarray(query, dtype=np.float32))
    t = torch.from_numpy(np.asarray(target, dtype=np.float32))
    metrics, spectra = spectral_snapshot(q, t, spectrum_rule(config.spectral), rank=0, world_size=1)
    gap = modality_gap(q, t, k=k or config.loss.gap.k)
    metrics["gap_min_principal_angle"] = gap["min_principal_angle"]
    metrics["gap_mean_principal_angle"] = gap["mean_principal_angle"]
    metrics["num_rows"] = int(len(query))
    return metrics, spectra


def training_history(metrics_jsonl: str | os.PathLike) -> list[dict]:
    """The rows of a run's metrics.jsonl sorted by step (the last row wins for a repeated step)."""
    by_step: dict[int, dict] = {}
    for number, line in enumerate(Path(metrics_jsonl).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{metrics_jsonl}:{number}: not a JSON line ({exc})") from exc
        if "step" not in row:
            raise ValueError(f"{metrics_jsonl}:{number}: row without a 'step'")
        by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def _series(history: list[dict], key: str) -> list[float]:
    return [float(row[key]) if row.get(key) is not None else float("nan") for row in history]


def energy_history(history: list[dict]) -> dict[str, dict[str, list[float]]]:
    """{side: {subspace: values per row}} for the sides whose energy shares were logged."""
    shares = {}
    for side, name in SIDES.items():
        if any(f"energy_strong_{side}" in row for row in history):
            shares[name] = {s: _series(history, f"energy_{s}_{side}") for s in SUBSPACES}
    return shares


def write_history_plots(history: list[dict], output_dir: str | os.PathLike) -> dict[str, Path]:
    """energy_over_training.png and spectral_over_training.png from logged rows (those present)."""
    output_dir = Path(output_dir)
    steps = [row["step"] for row in history]
    paths: dict[str, Path] = {}
    shares = energy_history(history)
    if shares:
        paths["energy_over_training"] = plots.plot_energy_over_training(
            steps, shares, output_dir / "energy_over_training.png"
        )
    scalars = {k: _series(history, k) for k in HISTORY_SCALARS if any(k in row for row in history)}
    if scalars:
        paths["spectral_over_training"] = plots.plot_series(
            steps, scalars, output_dir / "spectral_over_training.png"
        )
    return paths
