"""The plain InfoNCE baseline objective (`loss.name=infonce`) and the temperature shared by all."""

from __future__ import annotations

import math

import torch

from sde_ray.losses import StepContext
from sde_ray.losses.batch import ContrastiveBatch, ContrastiveObjective


class Temperature(torch.nn.Module):
    """1/τ, fixed or learnable as log(1/τ), kept in [0, ln 100] (τ in [0.01, 1]) like CLIP.

    The bound is not applied here: a clamp in the forward pass zeroes the gradient once the value
    is past it, for good. The training loop clamps the parameter in place after each optimizer
    step instead (`sde_ray.train.loop.clamp_temperatures`, open_clip's rule).
    """

    MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 1.0
    bounds = (0.0, math.log(1.0 / MIN_TEMPERATURE))

    def __init__(self, temperature: float, learnable: bool):
        super().__init__()
        if not self.MIN_TEMPERATURE <= temperature <= self.MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [{self.MIN_TEMPERATURE}, {self.MAX_TEMPERATURE}], got {temperature}")
        # Shape (1,), not 0-dim: DeepSpeed's ZeRO-1/2 flat buffers hand a 0-dim parameter a (1,)
        # gradient, and its backward then fails on the shape.
        value = torch.tensor([math.log(1.0 / temperature)])
        if learnable:
            self.log_scale = torch.nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()[0]


class InfoNCEObjective(ContrastiveObjective):
    """Symmetric InfoNCE on L2-normalised features over the global batch (plus explicit negatives
    when `target` carries them, see `sde_ray.losses.infonce`)."""

    def __init__(self, temperature: float, learnable_temperature: bool, duplicates: str):
        super().__init__()
        self.scale = Temperature(temperature, learnable_temperature)
        self.duplicates = duplicates

    def contrastive(self, batch: ContrastiveBatch, context: StepContext):
        loss = batch.info_nce(self.scale(), self.duplicates, normalize=True)
        return loss, {"loss_instance": loss.detach()}


def build_infonce(config, embed_dim: int) -> InfoNCEObjective:
    del embed_dim
    loss = config.loss
    return InfoNCEObjective(loss.temperature, loss.learnable_temperature, loss.duplicate_targets)
