"""Validation spread over the ranks of a process group (Ray-free: rank, world size and the gather
are arguments).

Every rank reads the same tables (parquet only) and, of the images, only those of its share
(`prepare_share`): a contiguous slice of each dataset's distinct queries and of its de-duplicated
candidates, which it encodes on its own device. One gather of those slices and of the images each
rank found missing gives every rank every embedding, in item order, and every missing image; each
rank then scores locally and so returns the same P@1 as a single process reading and encoding
everything. The only wait is at that one gather, and the slices differ by at most one item per
dataset, so no rank waits much longer than its share of the validation itself.

`gather(obj) -> list` returns every rank's `obj` in rank order (an all-gather of Python objects).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from sde_ray.data.mmeb import DatasetInfo, ImageSource
from sde_ray.distributed import all_gather_object, get_world_size
from sde_ray.eval.dataset import load_images, load_table
from sde_ray.eval.scoring import EncodedDataset, Encoder, PreparedDataset, Request

Gather = Callable[[Any], list]


def rank_slice(count: int, rank: int, world_size: int) -> slice:
    """The rank's contiguous share of `count` items (sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def prepare_share(eval_root, info: DatasetInfo, source: ImageSource, max_rows: int | None, rank: int,
                  world_size: int) -> PreparedDataset:
    """A dataset's whole table with the images of the rank's share only: its slice of the distinct
    queries and of the distinct candidates (what `sharded_encode` has it encode). Its `scorable`
    knows this rank's missing images only; `sharded_encode` scores with every rank's."""
    table = load_table(eval_root, info.name, max_rows=max_rows)
    mine = (table.queries[rank_slice(len(table.queries), rank, world_size)]
            + table.candidates[rank_slice(len(table.candidates), rank, world_size)])
    images, missing = load_images(list(dict.fromkeys(item.image for item in mine if item.image)), source)
    return PreparedDataset(info, table, images, missing, table.scorable(set(missing)))


def _sliced(request: Request, part: slice, length: int | None = None) -> Request:
    """The request's items in `part`, repeated from the first up to `length` items when given (an
    empty part: the request's first item, its text alone, since this rank may not hold its image)."""
    side, texts, images = request
    texts, images = texts[part], images[part]
    if length is not None and len(texts) < length:
        pad_text, pad_image = (texts[0], images[0]) if texts else (request[1][0], None)
        texts, images = texts + [pad_text] * (length - len(texts)), images + [pad_image] * (length - len(images))
    return side, texts, images


def sharded_encode(
    prepared: Sequence[PreparedDataset], encoder: Encoder, rank: int, world_size: int, gather: Gather,
    equal_shares: bool = False,
) -> list[EncodedDataset]:
    """Every dataset encoded by all ranks together; the full embeddings on every rank.

    `equal_shares`: every rank encodes as many items of each request as the largest share (the
    shorter shares padded, their extra rows dropped), so every rank runs the same forwards — a
    ZeRO-3-partitioned model gathers its weights with collectives in each one."""
    requests = [r for p in prepared for r in p.requests()]
    parts = [rank_slice(len(r[1]), rank, world_size) for r in requests]
    lengths = [-(-len(r[1]) // world_size) if equal_shares else None for r in requests]
    mine = [_sliced(r, part, length) for r, part, length in zip(requests, parts, lengths)]
    local = encoder.encode(mine) if mine else []
    local = [rows[:part.stop - part.start] for rows, part in zip(local, parts)]
    found_missing = [p.missing_images for p in prepared]  # of this rank's share of the images
    everyone = gather((local, found_missing)) if world_size > 1 else [(local, found_missing)]
    # All ranks' pieces of request i, in rank order = request i in item order.
    full = []
    for i in range(len(requests)):
        pieces = [np.asarray(parts[i], dtype=np.float32) for parts, _ in everyone]
        width = max(piece.shape[1] if piece.ndim == 2 else 0 for piece in pieces)
        full.append(np.concatenate([p.reshape(-1, width) for p in pieces]))
    encoded = []
    for k, p in enumerate(prepared):
        missing = {path: why for _, found in everyone for path, why in found[k].items()}
        encoded.append(EncodedDataset(p.info, p.table, missing, p.table.scorable(set(missing)), full[2 * k],
                                      full[2 * k + 1]))
    return encoded


def all_gather_objects(obj: Any) -> list:
    """Every rank's `obj` over the default process group (through sde_ray.distributed)."""
    return all_gather_object(obj, get_world_size())
