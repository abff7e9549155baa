"""Validation P@1 during training, in process: a small fixed slice of the validation root, read once
per process and re-encoded at every validation, spread over the training ranks (`sde_ray.eval.sharded`).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Sequence

from sde_ray.data.mmeb import META_TASKS, eval_image_source
from sde_ray.eval.encode import ModelEncoder
from sde_ray.eval.metrics import summarize
from sde_ray.eval.roots import select_datasets
from sde_ray.eval.scoring import PreparedDataset, score_dataset


@functools.lru_cache(maxsize=4)
def _validation_slice(
    eval_root: str, names: tuple[str, ...] | None, max_queries: int, rank: int = 0, world_size: int = 1
) -> tuple[PreparedDataset, ...]:
    """The slice's tables, with the images of this rank's share only (`sharded.prepare_share`)."""
    from sde_ray.eval.sharded import prepare_share

    root = Path(eval_root)
    infos = select_datasets(root, names)
    per_dataset = max(1, math.ceil(max_queries / len(infos)))
    source = eval_image_source(root)
    try:
        return tuple(prepare_share(root, info, source, per_dataset, rank, world_size) for info in infos)
    finally:
        source.close()


def validation_p_at_1(
    model,
    processor,
    eval_root: str | os.PathLike,
    max_queries: int = 200,
    batch_size: int = 64,
    datasets: Sequence[str] | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather=None,
    precision: str = "fp32",
    equal_shares: bool = False,
) -> float:
    """Mean P@1 over datasets on a small fixed slice: the first ⌈max_queries / #datasets⌉ rows of each.

    The slice is read and its images loaded once per process, then only re-encoded. With
    `world_size > 1` every rank calls it with its own copy of the model on its device, loads the
    images of its share of the distinct items only and encodes that share; `gather` (every rank's
    object in rank order, default `sharded.all_gather_objects`) joins them and every rank returns
    the same value. `equal_shares`: every rank runs the same forwards (a ZeRO-3-partitioned model:
    `sharded.sharded_encode`).
    """
    from sde_ray.eval.sharded import all_gather_objects, sharded_encode

    prepared = _validation_slice(
        str(Path(eval_root).resolve()), tuple(datasets) if datasets else None, max_queries, rank, world_size
    )
    encoder = ModelEncoder(model, processor, batch_size, precision=precision)
    encoded = sharded_encode(prepared, encoder, rank, world_size, gather or all_gather_objects, equal_shares)
    scores = {e.info.name: score_dataset(e) for e in encoded}
    overall = summarize(scores, META_TASKS)["overall"]
    if overall is None:  # only datasets outside the catalog: their mean stands in
        overall = summarize(scores, META_TASKS)["outside_catalog"]
    return float(overall)
