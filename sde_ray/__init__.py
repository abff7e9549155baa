"""sde_ray: distributed training of multimodal embedding models with Spectral Disentanglement and
Enhancement (SDE) and its sibling objectives, on Ray Train + DeepSpeed, evaluated on MMEB.

The pure library (`spectral`, `losses`, `models`, `data`) depends on torch/numpy only and takes rank
and world size as arguments; the application (`train`, `tune`, `eval`, `cli`) owns Ray and DeepSpeed.
"""

__version__ = "0.1.0"
