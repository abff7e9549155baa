"""Reads one MMEB-eval dataset as released and indexes it for scoring.

Layout (HF `TIGER-Lab/MMEB-eval`): `<root>/<Dataset>/test-*.parquet` with the columns
`qry_text: str, qry_img_path: str, tgt_text: list[str], tgt_img_path: list[str]`; the positive is
candidate 0; image paths are relative to the unpacked `images.zip` (or read straight from it, see
`sde_ray.data.mmeb.eval_image_source`). An empty image path means "no image".

An `EvalTable` holds the distinct queries and candidates (keyed by `(text, image path)`, as
VLM2Vec's `get_paired_data` does) and, per row, the index of its query and of each candidate, so
every distinct item is encoded once. `dedup=False` keeps one entry per occurrence instead: the
naive computation that the tests and the benchmark compare against.

Rows that are malformed (missing or non-string fields, no candidates, text and image lists of
different lengths) are kept with `malformed=True` and no indices: they count as misses. Images
that cannot be read or decoded are listed by `load_images` and make every row that uses them a
miss as well.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq

from sde_ray.data.mmeb import EVAL_COLUMNS, ImageSource, UnsafePathError


class Item(NamedTuple):
    """One encodable input: text plus an image path relative to the image source ('' = none)."""

    text: str
    image: str


@dataclass
class EvalTable:
    """One dataset's rows as indices into its distinct query and candidate items."""

    name: str
    queries: list[Item]
    candidates: list[Item]
    query_index: np.ndarray  # int64 [R]; -1 for malformed rows
    candidate_index: np.ndarray  # int64 [R, K]; -1 pads rows with fewer candidates
    malformed: np.ndarray  # bool [R]
    malformed_reasons: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return int(self.query_index.shape[0])

    def image_paths(self) -> list[str]:
        """Distinct non-empty image paths used by the queries and candidates, in first-use order."""
        return list(dict.fromkeys(item.image for item in self.queries + self.candidates if item.image))

    def scorable(self, missing_images: set[str]) -> np.ndarray:
        """bool [R]: well-formed rows whose query and every candidate have their image."""
        ok = ~self.malformed
        if not missing_images:
            return ok
        bad_query = np.array([q.image in missing_images for q in self.queries] + [False], dtype=bool)
        bad_candidate = np.array([c.image in missing_images for c in self.candidates] + [False], dtype=bool)
        # index -1 lands on the trailing False, so padding never marks a row bad
        ok &= ~bad_query[self.query_index]
        ok &= ~bad_candidate[self.candidate_index].any(axis=1)
        return ok


def parquet_files(dataset_dir: str | os.PathLike) -> list[Path]:
    files = sorted(Path(dataset_dir).glob("test-*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no test-*.parquet in {dataset_dir} (expected MMEB-eval's <Dataset>/test-*.parquet)"
        )
    return files


def read_rows(dataset_dir: str | os.PathLike, max_rows: int | None = None) -> list[dict]:
    """The raw rows of `<dataset_dir>/test-*.parquet` in file order, at most `max_rows`."""
    rows: list[dict] = []
    for path in parquet_files(dataset_dir):
        schema = pq.read_schema(path)
        absent = [c for c in EVAL_COLUMNS if c not in schema.names]
        if absent:
            raise ValueError(f"{path}: missing MMEB-eval column(s) {absent}; found {schema.names}")
        rows.extend(pq.read_table(path, columns=list(EVAL_COLUMNS)).to_pylist())
        if max_rows is not None and len(rows) >= max_rows:
            return rows[:max_rows]
    return rows


def _row_items(row: dict) -> tuple[Item, list[Item]]:
    """(query, candidates) of a raw row; ValueError naming the defect when it is malformed."""
    qry_text, qry_img = row.get("qry_text"), row.get("qry_img_path")
    tgt_text, tgt_img = row.get("tgt_text"), row.get("tgt_img_path")
    if not isinstance(qry_text, str):
        raise ValueError(f"qry_text is {type(qry_text).__name__}, not str")
    if qry_img is not None and not isinstance(qry_img, str):
        raise ValueError(f"qry_img_path is {type(qry_img).__name__}, not str")
    if not isinstance(tgt_text, (list, tuple)) or not tgt_text:
        raise ValueError("tgt_text is not a non-empty list")
    if tgt_img is None:
        tgt_img = [""] * len(tgt_text)
    if not isinstance(tgt_img, (list, tuple)) or len(tgt_img) != len(tgt_text):
        raise ValueError(
            f"tgt_img_path has {len(tgt_img) if isinstance(tgt_img, (list, tuple)) else 'no'} "
            f"entries for {len(tgt_text)} tgt_text entries"
        )
    candidates = []
    for text, image in zip(tgt_text, tgt_img):
        if not isinstance(text, str) or not (image is None or isinstance(image, str)):
            raise ValueError("a candidate text or image path is not a string")
        candidates.append(Item(text, image or ""))
    return Item(qry_text, qry_img or ""), candidates


def build_table(name: str, rows: list[dict], dedup: bool = True) -> EvalTable:
    """Indexes raw rows; with `dedup`, equal (text, image) items share one entry."""
    queries: list[Item] = []
    candidates: list[Item] = []
    query_ids: dict[Item, int] = {}
    candidate_ids: dict[Item, int] = {}

    def intern(item: Item, items: list[Item], ids: dict[Item, int]) -> int:
        if dedup and item in ids:
            return ids[item]
        ids[item] = len(items)
        items.append(item)
        return ids[item]

    query_index = np.full(len(rows), -1, dtype=np.int64)
    per_row: list[list[int]] = []
    malformed = np.zeros(len(rows), dtype=bool)
    reasons = []
    for r, row in enumerate(rows):
        try:
            query, row_candidates = _row_items(row)
        except ValueError as exc:
            malformed[r] = True
            reasons.append(f"row {r}: {exc}")
            per_row.append([])
            continue
        query_index[r] = intern(query, queries, query_ids)
        per_row.append([intern(c, candidates, candidate_ids) for c in row_candidates])
    width = max((len(c) for c in per_row), default=0)
    candidate_index = np.full((len(rows), width), -1, dtype=np.int64)
    for r, ids in enumerate(per_row):
        candidate_index[r, : len(ids)] = ids
    return EvalTable(name, queries, candidates, query_index, candidate_index, malformed, reasons)


def load_table(
    eval_root: str | os.PathLike, name: str, dedup: bool = True, max_rows: int | None = None
) -> EvalTable:
    dataset_dir = Path(eval_root) / name
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset {name!r} not found: no folder {dataset_dir}")
    return build_table(name, read_rows(dataset_dir, max_rows), dedup=dedup)


def read_image(path: str, source: ImageSource) -> tuple[bytes | None, str | None]:
    """(the image's encoded bytes, None) or (None, why it is missing)."""
    try:
        return source.read(path), None
    except (FileNotFoundError, UnsafePathError) as exc:
        return None, str(exc)
    except Exception as exc:  # an unreadable archive member: the image cannot be had either
        return None, undecodable(exc)


def undecodable(exc: Exception) -> str:
    return f"undecodable image ({type(exc).__name__}: {exc})"


def load_images(paths: list[str], source: ImageSource) -> tuple[dict[str, bytes], dict[str, str]]:
    """(path -> encoded bytes, path -> why it is missing) for each path; decodability is checked."""
    from PIL import Image

    found: dict[str, bytes] = {}
    missing: dict[str, str] = {}
    for path in paths:
        data, reason = read_image(path, source)
        if data is None:
            missing[path] = reason
            continue
        try:
            with Image.open(io.BytesIO(data)) as image:
                # A full decode: verify() checks the structure only and passes a truncated JPEG,
                # which would then abort the evaluation when encoded instead of counting a miss.
                image.load()
        except Exception as exc:  # PIL raises many types for bad bytes; all mean "cannot decode"
            missing[path] = undecodable(exc)
        else:
            found[path] = data
    return found, missing
