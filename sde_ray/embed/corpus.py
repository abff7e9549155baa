"""The corpora `sde-ray embed` reads, planned as output files made of pieces (Ray-free).

A corpus is one of:
- a parquet table (a `.parquet` file, or a folder of them): columns `embed.text_column`,
  `embed.image_column` (encoded bytes, a Hugging Face image struct `{bytes, path}`, or a path
  relative to the table's folder) and `embed.id_column` (absent: `<file stem>:<row>`);
- a folder of images (`.jpg .jpeg .png .webp .bmp .gif`, found recursively, sorted): id = the path
  relative to the folder, no text;
- WebDataset shards (a `.tar` file, or a folder of them): id = the sample key, text = the member
  `embed.text_column` (else `txt`), image = the member `embed.image_column` (else the first of
  `jpg jpeg png webp img`).

`plan_files` cuts the corpus, in its order, into output files of `rows_per_file` rows (a file never
spans two sources, so adding a source never renumbers the others' files) and every file into
pieces of at most `piece_rows` rows: a piece is what one Ray Data read task reads. `read_piece`
returns a piece's columns `id`, `text`, `image` (encoded bytes or None).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
WDS_TEXT_MEMBERS = ("txt",)
WDS_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "img")


@dataclasses.dataclass(frozen=True)
class Columns:
    """Where an item's fields are (the `embed.*_column` settings)."""

    text: str = "text"
    image: str = "image"
    id: str = "id"


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one source: a parquet file, a shard, or an image folder's sorted list."""

    kind: str  # "parquet" | "wds" | "images"
    source: str
    start: int
    stop: int
    names: tuple[str, ...] = ()  # images: the files of these rows, relative to `source`


@dataclasses.dataclass(frozen=True)
class OutputFile:
    name: str  # part-00000.parquet
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)


def _sources(corpus: Path) -> tuple[str, list[tuple[str, int, tuple[str, ...]]]]:
    """(kind, [(source path, rows, image names)]) of a corpus path."""
    if corpus.is_file():
        files = [corpus]
    elif corpus.is_dir():
        files = sorted(p for p in corpus.iterdir() if p.suffix in (".parquet", ".tar") and p.is_file())
    else:
        raise FileNotFoundError(f"corpus not found: {corpus}")
    kinds = {p.suffix for p in files}
    if kinds == {".parquet"}:
        return "parquet", [(str(p), pq.ParquetFile(p).metadata.num_rows, ()) for p in files]
    if kinds == {".tar"}:
        from sde_ray.data.shards import tar_sample_count

        return "wds", [(str(p), tar_sample_count(str(p)), ()) for p in files]
    if kinds:
        raise ValueError(f"{corpus} mixes parquet tables and .tar shards; embed one kind at a time")
    if corpus.is_dir():
        names = sorted(str(p.relative_to(corpus)) for p in corpus.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if names:
            return "images", [(str(corpus), len(names), tuple(names))]
    raise ValueError(f"{corpus} is neither a parquet table, WebDataset shards (.tar) nor a folder of images "
                     f"({' '.join(IMAGE_SUFFIXES)})")


def plan_files(corpus: str | os.PathLike, rows_per_file: int, piece_rows: int) -> tuple[str, list[OutputFile]]:
    """(corpus kind, output files in corpus order); see the module docstring."""
    if rows_per_file < 1 or piece_rows < 1:
        raise ValueError(f"rows_per_file and piece_rows must be >= 1, got {rows_per_file}, {piece_rows}")
    kind, sources = _sources(Path(corpus).expanduser().resolve())
    files: list[OutputFile] = []
    for source, rows, names in sources:
        for file_start in range(0, rows, rows_per_file):
            file_stop = min(file_start + rows_per_file, rows)
            pieces = tuple(
                Piece(kind, source, start, min(start + piece_rows, file_stop),
                      names[start:min(start + piece_rows, file_stop)])
                for start in range(file_start, file_stop, piece_rows)
            )
            files.append(OutputFile(f"part-{len(files):05d}.parquet", pieces))
    return kind, files


def read_piece(piece: Piece, columns: Columns) -> dict[str, list]:
    """A piece's `id`, `text` (str, '' when none) and `image` (encoded bytes or None) columns."""
    if piece.kind == "parquet":
        return _read_parquet(piece, columns)
    if piece.kind == "wds":
        return _read_wds(piece, columns)
    if piece.kind == "images":
        root = Path(piece.source)
        return {"id": list(piece.names), "text": [""] * len(piece.names),
                "image": [(root / name).read_bytes() for name in piece.names]}
    raise ValueError(f"unknown corpus kind {piece.kind!r}")


def _read_parquet(piece: Piece, columns: Columns) -> dict[str, list]:
    handle = pq.ParquetFile(piece.source)
    meta = handle.metadata
    offsets = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    groups = [i for i in range(meta.num_row_groups) if offsets[i] < piece.stop and offsets[i + 1] > piece.start]
    present = set(handle.schema_arrow.names)
    wanted = [c for c in (columns.id, columns.text, columns.image) if c in present]
    if columns.text not in present and columns.image not in present:
        raise ValueError(f"{piece.source} has neither a '{columns.text}' nor an '{columns.image}' column "
                         f"(embed.text_column / embed.image_column); its columns: {sorted(present)}")
    table = handle.read_row_groups(groups, columns=wanted).slice(piece.start - int(offsets[groups[0]]),
                                                                 piece.stop - piece.start)
    rows = piece.stop - piece.start
    data = table.to_pydict()
    ids = ([str(v) for v in data[columns.id]] if columns.id in data
           else [f"{Path(piece.source).stem}:{row}" for row in range(piece.start, piece.stop)])
    texts = [v or "" for v in data.get(columns.text, [""] * rows)]
    folder = Path(piece.source).parent
    images = [_parquet_image(v, folder) for v in data.get(columns.image, [None] * rows)]
    return {"id": ids, "text": texts, "image": images}


def _parquet_image(value, folder: Path) -> bytes | None:
    if isinstance(value, dict):  # a Hugging Face Image feature: {bytes, path}
        value = value.get("bytes") or value.get("path")
    if value is None or isinstance(value, bytes):
        return value or None
    if isinstance(value, str):
        return (folder / value).read_bytes() if value else None
    raise TypeError(f"image column value of type {type(value).__name__}: expected bytes, a path or None")


def _read_wds(piece: Piece, columns: Columns) -> dict[str, list]:
    from sde_ray.data.shards import read_samples

    samples = read_samples(piece.source, range(piece.start, piece.stop))
    rows = len(samples["__key__"])

    def member(preferred: str, fallbacks: tuple[str, ...]) -> list:
        """Per sample, the first of these members it has (samples may mix jpg and png)."""
        found = [samples[name] for name in (preferred, *fallbacks) if name in samples]
        return [next((column[row] for column in found if column[row]), None) for row in range(rows)]

    texts = [v.decode("utf-8") if v else "" for v in member(columns.text, WDS_TEXT_MEMBERS)]
    return {"id": list(samples["__key__"]), "text": texts, "image": member(columns.image, WDS_IMAGE_MEMBERS)}
