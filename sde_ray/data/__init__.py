"""MMEB data: the dataset catalog, the converter to WebDataset shards, the synthetic MMEB generator,
and the Ray-free parts of the training data path.

`mmeb`, `convert` and `synthetic` are format code; `shards` (checks, selective tar reads),
`batches` (rows -> batches), `cache` (prepared shards under a lock) and `order` (the epoch order
as a pure function of (seed, epoch)) are what the Ray Data side (`sde_ray.train.data`) runs.
`batching` (epoch batch planners) and `negatives` (hard-negative mining,
the sidecar and its join) are pure functions too. Nothing here imports Ray. Import submodules directly, e.g. `from sde_ray.data.mmeb import MMEB_DATASETS`.
"""
