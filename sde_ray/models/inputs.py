"""A processed batch (the BatchProcessor's numpy arrays) → the model's input tensors on its device.

The training loop and its benchmarks move every local batch through `to_model_inputs`; the rows'
per-row facts (`is_host_fact`) stay on the host, where the model reads them without a host sync.
"""

from __future__ import annotations

import numpy as np
import torch

from sde_ray.models.embedder import is_host_fact
from sde_ray.models.vlm import trim_patches


def to_model_inputs(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors on the engine's device; float inputs in the engine's precision (pixels arrive as uint8
    and stay so: the model normalises them on its device). A VLM's padded patches are cut to the
    batch's largest image first (`trim_patches`): only those bytes cross to the device. The per-row
    facts (`sde_ray.models.is_host_fact`: has_image, token spans, image grids) stay on the host, where
    the model reads them without waiting on the device."""
    out = {}
    for key, value in trim_patches(batch).items():
        tensor = torch.as_tensor(value if isinstance(value, torch.Tensor) else np.asarray(value),
                                 device="cpu" if is_host_fact(key) else device)
        out[key] = tensor.to(float_dtype) if tensor.is_floating_point() else tensor
    return out
