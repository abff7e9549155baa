"""Training objectives (pure torch; rank and world size are arguments, never globals).

Every objective is an `nn.Module` built by a builder function `build(config, embed_dim)` from the
registry below: the builder is the one place that reads the config; the constructor takes plain
values or the objective's own frozen dataclasses (`SDEObjective(SDESpectral, SDELoss)`), as open_clip's
`ClipLoss(rank=, world_size=)` does, so nothing here imports `sde_ray.config`. Its forward is `objective(query, target, context) -> (loss, metrics)` where
`query`/`target` are this rank's raw (B × d) encoder features (before L2 normalisation), `context` is
a `StepContext`, `loss` is this rank's scalar loss (the mean over ranks is the global loss) and
`metrics` is a dict of floats or detached 0-dim tensors for logging (a loss term stays a tensor on
the features' device: the training loop reads the window's metrics back in one transfer at its log
step, never one `float()` per metric per step). Objectives with parameters (heads, a learnable
temperature) are trained together with the encoder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

# name -> "module:builder". Kept as import strings so that importing the registry stays cheap.
OBJECTIVES: dict[str, str] = {
    "infonce": "sde_ray.losses.objectives:build_infonce",
    "sde": "sde_ray.losses.sde:build_sde",
    "fanoise": "sde_ray.losses.fanoise:build_fanoise",
    "disncl": "sde_ray.losses.disncl:build_disncl",
    "dsrsd": "sde_ray.losses.dsrsd:build_dsrsd",
    "gap": "sde_ray.losses.gap:build_gap",
}


@dataclass
class StepContext:
    """What an objective needs to know about the step besides the features."""

    progress: float = 0.0  # t = step / total_steps, in [0, 1]
    rank: int = 0
    world_size: int = 1
    training: bool = True  # enhancement and noise injection apply only while training
    # (B,) int64 content hashes of this rank's targets, or the positive groups of
    # `infonce.duplicate_groups` (rows sharing a query or a target) under loss.duplicate_key=pair
    target_ids: torch.Tensor | None = None
    generator: torch.Generator | None = None  # randomness shared by all ranks (same seed)


def build_objective(config, embed_dim: int) -> torch.nn.Module:
    """Builds `config.loss.name` from the registry; `config` is the whole `sde_ray.config.Config`."""
    name = config.loss.name
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    module_name, builder_name = OBJECTIVES[name].split(":")
    builder: Callable = getattr(importlib.import_module(module_name), builder_name)
    return builder(config, embed_dim)
