"""From an MMEB-eval root and an encoder to per-dataset P@1 (the part shared by every entry point).

`prepare_dataset` reads and indexes one dataset and loads its images once; `encode_dataset` sends
its distinct queries and candidates to the encoder in one call (so a parallel encoder sees all the
work at once) and keeps only the embeddings; `score_dataset` turns them into a `DatasetScore`.
Datasets are processed one at a time, so memory holds one dataset's images at most.

An encoder is anything with `encode(requests) -> list[np.ndarray]`, where each request is
`(side, texts, images)`: side "query" or "target", texts a list of str, images a list of encoded
image bytes or None. `sde_ray.eval.encode` has the in-process and the Ray implementations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from sde_ray.data.mmeb import DatasetInfo, ImageSource
from sde_ray.eval.dataset import EvalTable, Item, load_images, load_table
from sde_ray.eval.metrics import DatasetScore, candidate_scores, hits_at_1

Request = tuple[str, list[str], list["bytes | None"]]


class Encoder(Protocol):
    def encode(self, requests: Sequence[Request]) -> list[np.ndarray]: ...


@dataclass
class PreparedDataset:
    """One dataset, indexed, with its images loaded (or listed as missing)."""

    info: DatasetInfo
    table: EvalTable
    images: dict[str, bytes]
    missing_images: dict[str, str]
    scorable: np.ndarray  # bool [R]

    def requests(self) -> list[Request]:
        return [self._request("query", self.table.queries), self._request("target", self.table.candidates)]

    def _request(self, side: str, items: list[Item]) -> Request:
        # Items whose image is missing are never scored; sending them imageless keeps indices aligned.
        return side, [i.text for i in items], [self.images.get(i.image) if i.image else None for i in items]


@dataclass
class EncodedDataset:
    """A dataset's index and its embeddings (raw features) — the images are no longer needed."""

    info: DatasetInfo
    table: EvalTable
    missing_images: dict[str, str]
    scorable: np.ndarray
    query_embeddings: np.ndarray  # [Q, D]
    candidate_embeddings: np.ndarray  # [C, D]

    def positive_pairs(self, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(query, positive) embeddings of the scorable rows (within the bool mask `rows`)."""
        keep = self.scorable if rows is None else self.scorable & rows
        index = np.flatnonzero(keep)
        return (
            self.query_embeddings[self.table.query_index[index]],
            self.candidate_embeddings[self.table.candidate_index[index, 0]],
        )


def unscorable_reason(p: PreparedDataset) -> str | None:
    """Why no row of a prepared dataset can be scored (None when some can): it is then reported
    by name instead of scored, and the other datasets are still evaluated."""
    if p.scorable.any():
        return None
    table = p.table
    malformed = int(table.malformed.sum())
    example = f"; e.g. {table.malformed_reasons[0]}" if table.malformed_reasons else ""
    return (f"no scorable row: {table.num_rows} rows, {malformed} malformed, {table.num_rows - malformed} "
            f"with a missing image{example}")


def prepare_dataset(
    eval_root: str | os.PathLike,
    info: DatasetInfo,
    source: ImageSource,
    dedup: bool = True,
    max_rows: int | None = None,
) -> PreparedDataset:
    table = load_table(eval_root, info.name, dedup=dedup, max_rows=max_rows)
    images, missing = load_images(table.image_paths(), source)
    return PreparedDataset(info, table, images, missing, table.scorable(set(missing)))


def encode_dataset(p: PreparedDataset, encoder: Encoder) -> EncodedDataset:
    queries, candidates = encoder.encode(p.requests())
    return EncodedDataset(p.info, p.table, p.missing_images, p.scorable, queries, candidates)


def dataset_hits(e: EncodedDataset, query_map=None, candidate_map=None) -> np.ndarray:
    """bool [R] hits of an encoded dataset (optionally after a gap remedy's maps)."""
    queries, candidates = e.query_embeddings, e.candidate_embeddings
    if query_map is not None:
        queries, candidates = query_map(queries), candidate_map(candidates)
    scores = candidate_scores(queries, candidates, e.table.query_index, e.table.candidate_index)
    return hits_at_1(scores, e.scorable)


def score_dataset(
    e: EncodedDataset, rows: np.ndarray | None = None, hits: np.ndarray | None = None
) -> DatasetScore:
    """P@1 of the dataset, or of the rows selected by the bool mask `rows`."""
    hits = dataset_hits(e) if hits is None else hits
    selected = np.ones(e.table.num_rows, dtype=bool) if rows is None else rows
    return DatasetScore(
        name=e.info.name,
        meta_task=e.info.meta_task,
        split=e.info.split,
        num_queries=int(selected.sum()),
        num_correct=int(hits[selected].sum()),
        num_missing=int((~e.scorable & ~e.table.malformed)[selected].sum()),
        num_malformed=int(e.table.malformed[selected].sum()),
        missing_images=sorted(e.missing_images),
    )
