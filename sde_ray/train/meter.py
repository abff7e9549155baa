"""The step meter: what the loop measures between two logged steps, owned by one object.

It holds the window (sums of the objective's metrics and the loss over the finite steps since the
last log, kept on the device until the log step reads them back at once), its timing and the samples it consumed (skipped steps read their batch too, so they
count), this rank's rows that stood in for read-time rejects since the last sync, and the last
step's features (the spectral diagnostics and the final spectrum plot are computed from them).

`window_metrics` turns the window into the logged row: means over the window, spectral diagnostics
for objectives that do not log them, averaged over ranks (every rank calls it at the same steps).
"""

from __future__ import annotations

import time

import torch

from sde_ray.distributed import all_reduce, mean_over_ranks
from sde_ray.spectral import spectral_snapshot, spectrum_rule

# A metric every spectral objective logs itself; without it the meter computes the diagnostics.
SPECTRAL_MARKER = "effective_rank_q"


def on_host(values: dict) -> dict[str, float]:
    """`values` (floats and 0-dim tensors) as floats: the tensors stacked per device and brought over
    in one transfer each (one host sync, not one per metric)."""
    out = {key: float(value) for key, value in values.items() if not isinstance(value, torch.Tensor)}
    by_device: dict[torch.device, list[str]] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append(key)
    for keys in by_device.values():
        stacked = torch.stack([values[key].reshape(()).to(torch.float64) for key in keys]).cpu()
        out.update(zip(keys, stacked.tolist()))
    return {key: out[key] for key in values}


class StepMeter:
    def __init__(self, spectral_config, global_batch_size: int, rank: int, world_size: int):
        self.rule = spectrum_rule(spectral_config)
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.replaced_rows = 0  # this rank's rows that replaced read-time rejects, since the last sync
        self.features: tuple[torch.Tensor, torch.Tensor] | None = None  # the last finite step's (query, target)
        self.reset()

    def reset(self) -> None:
        """Opens a new window (after a log)."""
        self.sums: dict[str, float] = {}
        self.steps, self.samples, self.start = 0, 0, time.time()

    def batch(self, replaced: int) -> None:
        """A global batch was read (by every rank), whatever its step becomes."""
        self.replaced_rows += replaced
        self.samples += self.global_batch_size

    def step(self, result) -> None:
        """A finite step: its loss, metrics and features enter the window. Tensor values are summed
        where they are, in float64 (the sums a host loop over `float()`s would make), so a step reads
        nothing back from the device; `window_metrics` brings them over in one transfer."""
        for key, value in {**result.metrics, "loss": result.loss_value}.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().to(torch.float64)
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.features = (result.query, result.target)

    def sync_replaced(self, state) -> None:
        """Adds every rank's replaced rows since the last sync to `state.rows_replaced` (one
        all-reduce; every rank calls it at the same steps)."""
        count = torch.tensor([self.replaced_rows], dtype=torch.int64, device="cpu")
        state.rows_replaced += int(all_reduce(count, self.world_size).item())
        self.replaced_rows = 0

    def spectra(self) -> tuple[dict[str, float], object]:
        """Spectral diagnostics and spectra of the last finite step's features (a collective)."""
        return spectral_snapshot(self.features[0], self.features[1], self.rule, self.rank, self.world_size)

    def window_metrics(self) -> dict[str, float]:
        """The window's means averaged over ranks, with throughput (a collective)."""
        local = {key: value / max(self.steps, 1) for key, value in on_host(self.sums).items()}
        if self.features is not None and SPECTRAL_MARKER not in local:
            local.update(self.spectra()[0])  # the InfoNCE baseline logs the same numbers as SDE
        metrics = mean_over_ranks(local, self.world_size)
        elapsed = max(time.time() - self.start, 1e-9)
        metrics.update(samples_per_s=self.samples / elapsed,
                       steps_per_s=(self.samples / self.global_batch_size) / elapsed)
        return metrics
