"""`sde-ray bench spectral`: the cost of the spectral stage next to the bare decomposition.

For each N × d on the grid, in one run and on the same matrix, we time (median of repeats):
- the floors: `torch.linalg.svdvals(F)` (float32) and the float64 Gram FᵀF + `torch.linalg.eigh`;
- `svd`: the thin SVD with vectors (what gather mode needs: V is not free);
- the full single-process stage in each mode — decompose + partition + Δ + apply F·M — exactly the
  library calls `SDEObjective` makes.
Ratios stage/floor are reported (target ≤ 1.3×), together with the bytes one of W workers would
send for the decomposition in gather mode (its rows, float32) and Gram mode (ring all-reduce of
the float64 d × d Gram), and the crossover N at which Gram mode becomes faster for each d (the
measurement behind `spectral.auto_gram_ratio`). Timings depend on the machine and its load; the
ratios are what to read.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from sde_ray.losses.sde import SDESpectral, sde_spectral
from sde_ray.spectral import (
    apply_enhancement,
    communicated_bytes,
    enhancement_deltas,
    gram_matrix,
    gram_spectrum,
    marchenko_pastur_quantile,
    random_signs,
    svd_spectrum,
)

FULL_SIZES = (256, 512, 1024, 2048, 4096)
MAX_ELEMENTS = 4096 * 1024
QUICK_SIZES = (32, 96)
SLOW_SECONDS = (
    4.0  # a cell whose first round averages longer per call is not repeated (keeps the run ~10 min)
)


def spectral_stage(
    features: torch.Tensor, mode: str, settings: SDESpectral, generator: torch.Generator
) -> torch.Tensor:
    """Decompose, partition, Δ at α = 0.5 and F·M on one process: what each training step does."""
    spectrum = svd_spectrum(features) if mode == "gather" else gram_spectrum(features)
    rows, cols = features.shape
    partition = settings.spectrum.partition.split(spectrum.sigma, rows, cols)
    xi = random_signs(spectrum.rank, generator)
    enhancement = enhancement_deltas(
        spectrum.sigma,
        partition,
        0.5,
        xi,
        eps_strong=settings.eps_strong,
        eps_weak=settings.eps_weak,
        eps_noise=settings.eps_noise,
        rho=settings.rho,
    )
    return apply_enhancement(features, spectrum.basis, enhancement.scale, enhancement.base_scale)


def _interleaved_medians(functions: dict, repeats: int) -> tuple[dict, int]:
    """Median seconds per function, timed in interleaved rounds so that load drifts hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if round_index == 0 and sum(t[0] for t in times.values()) > SLOW_SECONDS * len(functions):
            break
    return {name: statistics.median(t) for name, t in times.items()}, len(next(iter(times.values())))


def _gram_eigh(features: torch.Tensor) -> None:
    torch.linalg.eigh(gram_matrix(features))


def measure_cell(rows: int, cols: int, settings: SDESpectral, repeats: int, world_size: int) -> dict:
    """All timings for one N × d matrix of a spiked (3 strong directions) Gaussian batch."""
    g = torch.Generator().manual_seed(rows * 7919 + cols)
    features = torch.randn(rows, cols, generator=g) + 4.0 * torch.randn(rows, 3, generator=g) @ torch.randn(
        3, cols, generator=g
    )
    marchenko_pastur_quantile(min(rows, cols) / max(rows, cols), 0.5)  # the cached MP median, outside timing
    stage_generator = torch.Generator().manual_seed(0)
    if rows * cols <= 1024 * 1024:  # warm up allocator and kernels where that is cheap
        spectral_stage(features, "gather", settings, stage_generator)
    timings, rounds = _interleaved_medians(
        {
            "svdvals_s": lambda: torch.linalg.svdvals(features),
            "svd_s": lambda: torch.linalg.svd(features, full_matrices=False),
            "gram_eigh_s": lambda: _gram_eigh(features),
            "stage_gather_s": lambda: spectral_stage(features, "gather", settings, stage_generator),
            "stage_gram_s": lambda: spectral_stage(features, "gram", settings, stage_generator),
        },
        repeats,
    )
    faster = "gram" if timings["stage_gram_s"] < timings["stage_gather_s"] else "gather"
    return {
        "rows": rows,
        "cols": cols,
        **{k: round(v, 5) for k, v in timings.items()},
        "repeats": rounds,
        "ratio_gather_vs_svdvals": round(timings["stage_gather_s"] / timings["svdvals_s"], 3),
        "ratio_gather_vs_svd": round(timings["stage_gather_s"] / timings["svd_s"], 3),
        "ratio_gram_vs_gram_eigh": round(timings["stage_gram_s"] / timings["gram_eigh_s"], 3),
        "faster_mode": faster,
        "world_size": world_size,
        "bytes_gather": communicated_bytes(rows, cols, world_size, "gather"),
        "bytes_gram": communicated_bytes(rows, cols, world_size, "gram"),
    }


def crossover(cells: list[dict]) -> dict:
    """Per d, the smallest N at which Gram mode was faster, and the implied auto_gram_ratio = d / N."""
    result = {}
    for cols in sorted({c["cols"] for c in cells}):
        gram_rows = [c["rows"] for c in cells if c["cols"] == cols and c["faster_mode"] == "gram"]
        first = min(gram_rows) if gram_rows else None
        result[str(cols)] = {
            "gram_faster_from_rows": first,
            "implied_ratio": (cols / first) if first else None,
        }
    return result


def format_table(cells: list[dict]) -> str:
    header = (
        f"{'N':>5} {'d':>5} | {'svdvals':>8} {'svd':>8} {'gram+eigh':>9} | {'stage:gather':>12} "
        f"{'stage:gram':>10} | {'g/svdvals':>9} {'g/svd':>6} {'gram/floor':>10} | {'faster':>6} | "
        f"{'MiB gather':>10} {'MiB gram':>8}"
    )
    lines = [header, "-" * len(header)]
    for c in cells:
        lines.append(
            f"{c['rows']:>5} {c['cols']:>5} | {c['svdvals_s']:>8.3f} {c['svd_s']:>8.3f} {c['gram_eigh_s']:>9.3f} | "
            f"{c['stage_gather_s']:>12.3f} {c['stage_gram_s']:>10.3f} | {c['ratio_gather_vs_svdvals']:>9.2f} "
            f"{c['ratio_gather_vs_svd']:>6.2f} {c['ratio_gram_vs_gram_eigh']:>10.2f} | {c['faster_mode']:>6} | "
            f"{c['bytes_gather'] / 2**20:>10.1f} {c['bytes_gram'] / 2**20:>8.1f}"
        )
    return "\n".join(lines)


def main(
    json_path: str | None = None,
    config=None,
    quick: bool = False,
    sizes=None,
    world_size: int = 8,
    repeats: int | None = None,
    max_elements: int = MAX_ELEMENTS,
) -> dict:
    """Runs the grid (quick: a tiny one for tests), prints the table, optionally writes JSON.

    Cells run cheapest first and the JSON is rewritten after each one, so an interrupted run keeps
    what it measured. Cells with N·d > `max_elements` are skipped (4096 × 4096 alone takes minutes
    on two CPU cores).
    """
    if config is None:
        from sde_ray.config import Config

        config = Config()
    sizes = tuple(sizes or (QUICK_SIZES if quick else FULL_SIZES))
    repeats = repeats or (2 if quick else 3)
    grid = sorted(
        ((r, c) for c in sizes for r in sizes if r * c <= max_elements), key=lambda rc: (rc[0] * rc[1], rc)
    )
    settings = sde_spectral(config.spectral)
    results = {
        "benchmark": "spectral",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quick": quick,
        "world_size_for_bytes": world_size,
        "cells": [],
        "crossover": {},
    }
    for rows, cols in grid:
        results["cells"].append(measure_cell(rows, cols, settings, repeats, world_size))
        results["cells"].sort(key=lambda c: (c["cols"], c["rows"]))
        results["crossover"] = crossover(results["cells"])
        if json_path:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(results, indent=2))
    print(format_table(results["cells"]))
    print("crossover (smallest N where gram mode is faster, per d):", json.dumps(results["crossover"]))
    return results
