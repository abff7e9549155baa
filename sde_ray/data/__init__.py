"""MMEB data: the dataset catalog, the converter to WebDataset shards, the synthetic MMEB generator
and the Ray Data pipeline.

`mmeb`, `convert` and `synthetic` are pure format code (no Ray), as are `batching` (epoch batch
planners) and `negatives` (hard-negative mining, the sidecar and its join); `pipeline` imports
`ray.data` (never `ray.train`). Import submodules directly, e.g. `from sde_ray.data.mmeb import MMEB_DATASETS`.
"""
