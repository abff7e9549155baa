"""Rows -> batches: the raw-batch contract, bad-sample handling, and gathering a batch from pieces.

- `raw_batch_from_rows`: WebDataset columns (raw bytes) -> the raw batch of docs/architecture.md;
- `process_rows`: the processor on a run of rows; a sample it rejects is dropped and logged
  (with its key and shard) instead of failing the task, and the indices of the kept rows are
  returned so the caller knows which stream positions survived;
- `gather_rows`: the rows of a batch copied once, straight from zero-copy pieces of the stream.

No Ray here (the Ray Data tasks and the worker-side stream of `sde_ray.train.data` use these).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RAW_TEXT_COLUMNS = ("qry_text", "pos_text", "target_hash", "subset", "key")
RAW_IMAGE_COLUMNS = ("qry_image", "pos_image")


def _bytes_or_none(value: Any) -> bytes | None:
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def raw_batch_from_rows(batch: dict[str, Any]) -> dict[str, list]:
    """A read_webdataset batch (raw bytes, columns json/qry.img/pos.img) -> the raw-batch contract."""
    metas = [json.loads(bytes(value)) for value in batch["json"]]
    n = len(metas)
    raw = {
        "qry_text": [m["qry_text"] for m in metas],
        "pos_text": [m["pos_text"] for m in metas],
        "qry_image": [_bytes_or_none(v) for v in batch["qry.img"]] if "qry.img" in batch else [None] * n,
        "pos_image": [_bytes_or_none(v) for v in batch["pos.img"]] if "pos.img" in batch else [None] * n,
        "target_hash": [m["target_hash"] for m in metas],
        "subset": [m["subset"] for m in metas],
        "key": [str(k) for k in batch["__key__"]] if "__key__" in batch else [""] * n,
    }
    raw.update(own_negatives(metas, batch.get("neg.img") if "neg.img" in batch else [None] * n))
    # MMEB-V2 video sides (sde_ray/data/convert_v2.py): each row's frames, [] where a side has none.
    for side in ("qry", "pos"):
        if f"{side}.frames" in batch:
            from sde_ray.data.convert_v2 import unpack_frames

            raw[f"{side}_frames"] = [unpack_frames(v) if _bytes_or_none(v) else [] for v in batch[f"{side}.frames"]]
    return raw


def own_negatives(metas: list[dict], images: list) -> dict[str, list[list]]:
    """The dataset's own negatives (MMEB-train's neg_text / neg_image_path, carried by the
    converter as json `neg_text` and member `neg.img`) as per-row lists of 0 or 1 negative.
    Their content ids are computed by the processor, and only when negatives are used."""
    texts, pixels = [], []
    for meta, image in zip(metas, images):
        text, image = meta.get("neg_text") or "", _bytes_or_none(image)
        present = bool(text.strip()) or image is not None
        texts.append([text] if present else [])
        pixels.append([image] if present else [])
    return {"neg_text": texts, "neg_image": pixels}


# Each Ray worker process keeps the processors it has built (keyed by their factory's pickled
# bytes): a tokenizer and image processor are built once per process and reused by every later


# What a processor raises for one bad sample: PIL's UnidentifiedImageError and truncation errors are
# OSErrors; our processors raise ValueError; a record without its json member gives a KeyError or
# TypeError in `raw_batch_from_rows`.
SAMPLE_ERRORS = (ValueError, OSError, KeyError, TypeError)


def process_rows(rows: dict[str, list], processor: Callable[[dict], dict],
                 shard: str = "?") -> tuple[dict | None, list[int]]:
    """`processor(raw_batch_from_rows(rows))` and the kept row indices (all of them); if that fails,
    the rows one by one, dropping (and logging) those that fail alone. (None, []) when none is left."""
    count = len(next(iter(rows.values())))
    try:
        return processor(raw_batch_from_rows(rows)), list(range(count))
    except SAMPLE_ERRORS:
        pass  # rare: find the culprits row by row
    outputs, kept, skipped = [], [], []
    for i in range(count):
        row = {name: values[i:i + 1] for name, values in rows.items()}
        try:
            outputs.append(processor(raw_batch_from_rows(row)))
            kept.append(i)
        except SAMPLE_ERRORS as exc:
            skipped.append(f"{row.get('__key__', ['?'])[0]} ({type(exc).__name__}: {exc})")
    logger.warning("skipped %d of %d samples of shard %s that the processor rejects: %s",
                   len(skipped), count, shard, "; ".join(skipped))
    if not outputs:
        return None, []
    # Processor outputs are arrays with the row on axis 0: the kept rows' outputs stack as they are.
    return {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}, kept


def piece_rows(piece: dict) -> int:
    return len(next(iter(piece.values())))


def stream_chunks(pieces: Iterator[dict], chunk_rows: int) -> Iterator[list[dict]]:
    """Consecutive runs of exactly `chunk_rows` rows of the stream (the last may be shorter), each
    a list of pieces and views of pieces: nothing is copied."""
    held, held_rows = [], 0
    for piece in pieces:
        offset, rows = 0, piece_rows(piece)
        while offset < rows:
            take = min(rows - offset, chunk_rows - held_rows)
            held.append(piece if take == rows else {name: value[offset:offset + take] for name, value in piece.items()})
            offset, held_rows = offset + take, held_rows + take
            if held_rows == chunk_rows:
                yield held
                held, held_rows = [], 0
    if held:
        yield held


def gather_rows(pieces: list[dict], index) -> dict:
    """The rows `index` of the pieces' concatenation as one batch, in stream order.

    Sorting the index makes each piece's rows a contiguous slice of the batch, which
    `index_select(out=)` fills directly. So the pieces are never concatenated, and each row is
    copied once. Which rows share a batch is what the shuffle decides. The order inside a batch
    carries no information: every objective here treats a batch as a set of pairs.
    """
    import torch

    index = index.sort().values
    out = {name: value.new_empty((len(index), *value.shape[1:])) for name, value in pieces[0].items()}
    begin, piece_start = 0, 0
    for piece in pieces:
        piece_end = piece_start + piece_rows(piece)
        end = int(torch.searchsorted(index, piece_end))
        if end > begin:
            local = index[begin:end] - piece_start
            for name, value in piece.items():
                # index_select copies whole rows; advanced indexing (value[index]) goes element by
                # element and was 20x slower on uint8 images (bench data, 224 px).
                torch.index_select(value, 0, local, out=out[name][begin:end])
        begin, piece_start = end, piece_end
    return out

