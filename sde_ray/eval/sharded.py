"""Validation spread over the ranks of a process group (Ray-free: rank, world size and the gather
are arguments).

Every rank holds the same prepared datasets (read once per process), encodes a contiguous slice of
each dataset's distinct queries and of its de-duplicated candidates on its own device, and one
gather of those slices gives every rank every embedding, in item order; each rank then scores
locally and so returns the same P@1 as a single process encoding everything. The only wait is at
that one gather, and the slices differ by at most one item per dataset, so no rank waits much
longer than its share of the validation itself.

`gather(obj) -> list` returns every rank's `obj` in rank order (an all-gather of Python objects).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sde_ray.distributed import all_gather_object, get_world_size
from sde_ray.eval.scoring import EncodedDataset, Encoder, PreparedDataset, Request

Gather = Callable[[Any], list]


def rank_slice(count: int, rank: int, world_size: int) -> slice:
    """The rank's contiguous share of `count` items (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _sliced(request: Request, part: slice) -> Request:
    side, texts, images = request
    return side, texts[part], images[part]


def sharded_encode(
    prepared: Sequence[PreparedDataset], encoder: Encoder, rank: int, world_size: int, gather: Gather
) -> list[EncodedDataset]:
    """Every dataset encoded by all ranks together; the full embeddings on every rank."""
    requests = [r for p in prepared for r in p.requests()]
    mine = [_sliced(r, rank_slice(len(r[1]), rank, world_size)) for r in requests]
    local = encoder.encode(mine) if mine else []
    everyone = gather(local) if world_size > 1 else [local]
    # All ranks' pieces of request i, in rank order = request i in item order.
    full = []
    for i in range(len(requests)):
        pieces = [np.asarray(parts[i], dtype=np.float32) for parts in everyone]
        width = max(piece.shape[1] if piece.ndim == 2 else 0 for piece in pieces)
        full.append(np.concatenate([p.reshape(-1, width) for p in pieces]))
    return [
        EncodedDataset(p.info, p.table, p.missing_images, p.scorable, full[2 * k], full[2 * k + 1])
        for k, p in enumerate(prepared)
    ]


def all_gather_objects(obj: Any) -> list:
    """Every rank's `obj` over the default process group (through sde_ray.distributed)."""
    return all_gather_object(obj, get_world_size())
