"""Training metrics: cross-rank averaging, spectral diagnostics, and the rank-0 sinks.

Every rank computes the same metric names; `sde_ray.distributed.mean_over_ranks` turns them into global values (the
mean of per-rank losses is the global loss; spectral numbers are identical on every rank anyway), so
all ranks report the same dict. Rank 0 alone writes them to the console, `<output_dir>/metrics.jsonl`
and wandb (offline unless a key is set). `spectral_snapshot` gives the objective-independent
diagnostics (σ, partition, energy shares, effective rank, modality gap) so the InfoNCE baseline logs
the same numbers as SDE.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sde_ray.spectral import (
    centroid_gap,
    distributed_spectrum,
    effective_rank,
    energy_shares,
    partition_kwargs,
    partition_spectrum,
)

CONSOLE_KEYS = ("loss", "loss_instance", "alpha", "lambda", "energy_strong_q", "effective_rank_q", "val_p_at_1")


def spectral_snapshot(query: torch.Tensor, target: torch.Tensor, config, rank: int, world_size: int):
    """Diagnostics of the global batch (a collective: every rank calls it at the same step).

    Returns (metrics, spectra) where `spectra[side]` is the plot-ready dict of `eval.plots.plot_spectrum`.
    """
    metrics: dict[str, float] = {}
    spectra: dict[str, dict[str, Any]] = {}
    num_rows, dim = query.shape[0] * world_size, query.shape[1]
    with torch.no_grad():
        for side, name, features in (("q", "query", query), ("t", "target", target)):
            spectrum = distributed_spectrum(features.detach().float(), rank, world_size, config.spectral.mode,
                                            config.spectral.auto_gram_ratio)
            partition = partition_spectrum(spectrum.sigma, num_rows, dim, **partition_kwargs(config.spectral))
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


def say(message: str) -> None:
    """One console line from a worker. Written to the process's real stdout, which Ray forwards to
    the driver: Ray Train's print patch would also log it, and tees it when wandb or Ray has wrapped
    `sys.stdout`, so a plain `print` shows every line twice."""
    print(message, file=sys.__stdout__, flush=True)


def wandb_mode(logging_config) -> str:
    """`auto` resolves to online with WANDB_API_KEY set, else offline; WANDB_MODE in the env wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if logging_config.wandb_mode != "auto":
        return logging_config.wandb_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _format(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.2e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunLogger:
    """Rank-0 sinks: console progress, metrics.jsonl (truncated to the resumed step) and wandb."""

    def __init__(self, config, output_dir: str, run_id: str, mode: str, resumed_step: int):
        self.config = config
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.output_dir / "metrics.jsonl"
        self._truncate_after(resumed_step)
        self.start_time = time.time()
        self.start_step = resumed_step
        self.run = None
        if config.logging.wandb and mode != "disabled":
            import wandb

            from sde_ray.config import to_dict

            self.run = wandb.init(
                project=config.logging.wandb_project,
                group=config.logging.wandb_group or None,
                name=config.train.run_name,
                id=run_id,  # stable across worker-group restarts, so a resumed run continues one chart
                resume="allow",
                dir=str(self.output_dir),
                mode=mode,
                config=to_dict(config),
                reinit="finish_previous",
            )

    def _truncate_after(self, step: int) -> None:
        """Drops rows past the checkpoint a restart resumed from, so every step appears once."""
        if not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, "time": time.time(), **metrics}
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        if step % max(1, self.config.logging.console_every) == 0 or step == self.config.train.max_steps:
            self.console(step, metrics)

    def console(self, step: int, metrics: dict[str, float]) -> None:
        total = self.config.train.max_steps
        elapsed = time.time() - self.start_time
        done = max(step - self.start_step, 1)
        eta = elapsed / done * (total - step)
        parts = [f"step {step:>5d}/{total} ({100.0 * step / total:3.0f}%)"]
        parts += [f"{k} {_format(metrics[k])}" for k in CONSOLE_KEYS if k in metrics and not math.isnan(metrics[k])]
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        parts.append(f"eta {eta:.0f}s")
        say(" | ".join(parts))

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            for key, value in (summary or {}).items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
            self.run.finish()
            self.run = None
