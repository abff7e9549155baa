"""sde_ray: distributed training of multimodal embedding models with Spectral Disentanglement and
Enhancement (SDE) and its sibling objectives, on Ray Train + DeepSpeed, evaluated on MMEB.

The pure library (`spectral`, `losses`, `models`, `data`) depends on torch/numpy only and takes rank
and world size as arguments; the application (`train`, `tune`, `eval`, `cli`) owns Ray and DeepSpeed.
Shared by both: `config` (the typed tree) and `distributed` (every collective); shared by the
application: `runs` (checkpoint format, run logging) and `ray_cluster` (joining or starting Ray).
docs/architecture.md draws the import arrows; tests/test_architecture.py enforces them.
"""

__version__ = "0.1.0"
