"""Hard negatives: shard reading, top-k mining with a false-negative filter, the sidecar (no Ray).

`sde-ray mine` (sde_ray/mine.py) encodes the corpus with a teacher and calls `mine_negatives`; the
result is a *sidecar*: parquet parts under `DIR/parts/` with one row per training sample,

    key: str                 the sample key of the WebDataset shards (`__key__`)
    negative_keys: [str]     up to `top_k` keys of other samples whose *targets* are hard negatives
    negative_scores: [f32]   the teacher's cosine of the query to each negative's target
    positive_score: f32      the teacher's cosine of the query to its own target
    cluster: int64           teacher cluster of the target (−1 without clustering)

and `DIR/sidecar.json` (teacher, embed size, settings, shard sample counts, drop counts). The
pipeline joins a sidecar by sample key (`load_sidecar`, `check_sidecar`): a key missing on either
side is an error before training starts.

The filter drops, in score order, before taking the top k (counts per reason in `MineCounts`):
- `positive`: the query's own target;
- `same_content`: a target with the positive's content id (`target_hash`: same text and image
  bytes, e.g. the repeated labels of classification subsets) — a false negative by construction;
- `within_margin`: a target scoring above `positive_score − margin` (NV-Retriever's
  "TopK-MarginPos"): at least as close as the positive is, so probably a correct answer;
- `duplicate_candidate`: a second candidate with the content id of one already kept (it would
  add the same negative twice).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

SIDECAR_META = "sidecar.json"
PARTS = "parts"
REASONS = ("positive", "same_content", "within_margin", "duplicate_candidate")


# ---------------------------------------------------------------------------------------------
# The corpus: shards read back sample by sample


def read_shard(path: str | os.PathLike) -> dict[str, list]:
    """A converted WebDataset shard as columns: key, subset, target_hash, qry_text, pos_text,
    qry_image, pos_image (encoded bytes or None), in the shard's order."""
    samples: dict[str, dict] = {}
    with tarfile.open(path, mode="r:") as archive:
        for member in archive:
            if not member.isreg() or "." not in member.name:
                continue
            key, suffix = member.name.split("/")[-1].split(".", 1)
            samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    columns: dict[str, list] = {name: [] for name in
                                ("key", "subset", "target_hash", "qry_text", "pos_text", "qry_image", "pos_image")}
    for key, sample in samples.items():
        if "json" not in sample:
            raise ValueError(f"{path}: sample {key!r} has no json member")
        meta = json.loads(sample["json"])
        columns["key"].append(key)
        for name in ("subset", "target_hash", "qry_text", "pos_text"):
            columns[name].append(meta[name])
        columns["qry_image"].append(sample.get("qry.img"))
        columns["pos_image"].append(sample.get("pos.img"))
    return columns


# ---------------------------------------------------------------------------------------------
# Mining


@dataclass
class MineCounts:
    """Candidates examined, in score order, and those dropped per reason."""

    queries: int = 0
    kept: int = 0
    short: int = 0  # queries that found fewer than top_k negatives
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))

    def add(self, other: "MineCounts") -> None:
        self.queries += other.queries
        self.kept += other.kept
        self.short += other.short
        for reason, count in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def as_dict(self) -> dict:
        return asdict(self)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _ranked(similarity: np.ndarray, head: int) -> np.ndarray:
    """Per row, the column indices of the `head` best scores, best first (ties: lower index first).
    `argpartition` first, so only `head` columns per row are sorted, not the whole corpus."""
    n = similarity.shape[1]
    if head < n:
        top = np.sort(np.argpartition(-similarity, head - 1, axis=1)[:, :head], axis=1)
    else:
        top = np.broadcast_to(np.arange(n), similarity.shape)
    # A stable sort of index-ordered columns breaks ties by the lower index.
    order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _filter(similarity: np.ndarray, rows: np.ndarray, limit: np.ndarray, hash_ids: np.ndarray, top_k: int,
            head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The false-negative filter on a block of queries, vectorised over (query, candidate).

    For each query (target row `rows[j]`, margin limit `limit[j]`) the candidates are walked in
    score order (`_ranked`, the first `head`): each gets the first reason of `REASONS` that applies,
    or is kept; a candidate whose content id was already kept is a `duplicate_candidate`, which is
    the same as "not the first candidate of its content id among the candidates no other reason
    dropped". The walk stops at the `top_k`-th kept candidate or at the first score of −inf (outside
    the query's group); drops after the stop are not counted.

    Returns (kept candidates [b, top_k] −1-padded, per-reason drop counts [b, 4], whether each
    query's walk ended inside the head: False where it ran out of the head with fewer than `top_k`
    kept while finite candidates may follow).
    """
    ranked = _ranked(similarity, head)
    scores = np.take_along_axis(similarity, ranked, axis=1)
    finite = np.isfinite(scores)
    positive = ranked == rows[:, None]
    same = ~positive & (hash_ids[ranked] == hash_ids[rows][:, None])
    margin = ~positive & ~same & (scores > limit[:, None])
    eligible = finite & ~positive & ~same & ~margin
    # First candidate of each content id among the eligible ones, per query: `np.unique` gives the
    # first occurrence of each (query, id) pair in row-major, i.e. rank, order.
    b, h = ranked.shape
    pair = (np.arange(b, dtype=np.int64)[:, None] * (int(hash_ids.max(initial=0)) + 1) + hash_ids[ranked])[eligible]
    first = np.zeros(len(pair), dtype=bool)
    first[np.unique(pair, return_index=True)[1]] = True
    kept = np.zeros_like(eligible)
    kept[eligible] = first
    duplicate = eligible & ~kept
    # The walk's end: the top_k-th kept candidate, else the first −inf, else the end of the head.
    taken = np.cumsum(kept, axis=1)
    stop = np.where(taken[:, -1] >= top_k, np.argmax(taken >= top_k, axis=1) + 1, h)
    stop = np.minimum(stop, np.where(finite.all(axis=1), h, np.argmin(finite, axis=1)))
    walked = np.arange(h)[None, :] < stop[:, None]
    counts = np.stack([(reason & walked).sum(axis=1) for reason in (positive, same, margin, duplicate)], axis=1)
    chosen = np.full((b, top_k), -1, dtype=np.int64)
    slot = taken - 1
    where = kept & walked
    chosen[np.nonzero(where)[0], slot[where]] = ranked[where]
    complete = (taken[:, -1] >= top_k) | ~finite.all(axis=1) | (h == similarity.shape[1])
    return chosen, counts, complete


def mine_negatives(
    queries: np.ndarray,
    targets: np.ndarray,
    target_hashes: list[str],
    rows: Iterable[int],
    top_k: int,
    margin: float,
    groups: list | None = None,
    block: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, MineCounts]:
    """Top-k hard negatives for the corpus rows `rows` (query `queries[j]` of row `rows[j]`, whose
    positive is `targets[rows[j]]`) among all `targets` by cosine, after the false-negative filter.

    `groups`: optional per-target group ids (subsets): a query searches only its own group.
    Returns `(negatives [n, top_k] int64 target rows, −1 where fewer survive; their scores
    [n, top_k] float32, NaN-padded; positive scores [n]; counts)`. The filter runs on a block of
    queries at once (`_filter`) over the best `8·top_k + 32` candidates of each; a query that needs
    more (a weak teacher scores many targets within the margin of the positive) is filtered again
    over 8× as many.
    """
    rows = np.asarray(list(rows), dtype=np.int64)
    q, t = _normalise(queries), _normalise(targets)
    if q.shape[1] != t.shape[1] or len(q) != len(rows):
        raise ValueError(f"queries {q.shape} / targets {t.shape} / rows {rows.shape} do not match")
    hash_ids = np.unique(np.asarray(target_hashes), return_inverse=True)[1].reshape(-1)
    group_ids = None if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    negatives = np.full((len(rows), top_k), -1, dtype=np.int64)
    scores = np.full((len(rows), top_k), np.nan, dtype=np.float32)
    positive = np.einsum("nd,nd->n", q, t[rows])
    limit = positive - margin
    dropped = np.zeros(len(REASONS), dtype=np.int64)
    head = min(len(t), 8 * top_k + 32)
    for start in range(0, len(rows), block):
        part = slice(start, start + block)
        sims = q[part] @ t.T
        if group_ids is not None:
            sims = np.where(group_ids[None, :] == group_ids[rows[part]][:, None], sims, -np.inf)
        # Most queries end their walk in the head; the others are filtered again over 8× more
        # candidates, until every walk has ended (at worst over the whole corpus).
        chosen = np.empty((len(sims), top_k), dtype=np.int64)
        counts = np.empty((len(sims), len(REASONS)), dtype=np.int64)
        pending, width = np.arange(len(sims)), head
        while len(pending):
            chosen[pending], counts[pending], complete = _filter(
                sims[pending], rows[part][pending], limit[part][pending], hash_ids, top_k, width)
            pending, width = pending[~complete], min(len(t), 8 * width)
        negatives[part] = chosen
        found = chosen >= 0
        scores[part][found] = np.take_along_axis(sims, np.maximum(chosen, 0), axis=1)[found]
        dropped += counts.sum(axis=0)
    taken = (negatives >= 0).sum(axis=1)
    counts = MineCounts(queries=len(rows), kept=int(taken.sum()), short=int((taken < top_k).sum()),
                        dropped={reason: int(n) for reason, n in zip(REASONS, dropped)})
    return negatives, scores, positive.astype(np.float32), counts


# ---------------------------------------------------------------------------------------------
# The sidecar


def write_part(path: Path, keys: list[str], negative_keys: list[list[str]], negative_scores: list[list[float]],
               positive_scores: np.ndarray, clusters: np.ndarray) -> None:
    """One parquet part, written to a temporary name and renamed (a part on disk is complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "key": pa.array(keys, pa.string()),
        "negative_keys": pa.array(negative_keys, pa.list_(pa.string())),
        "negative_scores": pa.array(negative_scores, pa.list_(pa.float32())),
        "positive_score": pa.array(np.asarray(positive_scores, np.float32)),
        "cluster": pa.array(np.asarray(clusters, np.int64)),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, staging)
    os.replace(staging, path)


@dataclass
class Sidecar:
    """A loaded sidecar: per-key negatives and scores, cluster ids, and its metadata."""

    negatives: dict[str, list[str]]
    scores: dict[str, list[float]]
    clusters: dict[str, int]
    meta: dict

    def __len__(self) -> int:
        return len(self.negatives)


def load_sidecar(directory: str | os.PathLike) -> Sidecar:
    """Reads `DIR/sidecar.json` and every part; refuses an incomplete sidecar."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    meta_path = directory / SIDECAR_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"data.negatives_sidecar={directory}: no {SIDECAR_META} (not a `sde-ray mine` output)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise ValueError(f"data.negatives_sidecar={directory}: mining did not finish (rerun `sde-ray mine` to resume)")
    negatives, scores, clusters = {}, {}, {}
    for part in sorted((directory / PARTS).glob("*.parquet")):
        table = pq.read_table(part).to_pydict()
        for key, keys, values, cluster in zip(table["key"], table["negative_keys"], table["negative_scores"],
                                              table["cluster"]):
            if key in negatives:
                raise ValueError(f"{part}: sample key {key!r} appears twice in the sidecar")
            negatives[key], scores[key], clusters[key] = keys, values, cluster
    return Sidecar(negatives, scores, clusters, meta)


def check_sidecar(sidecar: Sidecar, shard_keys: Iterable[str], where: str = "data.negatives_sidecar",
                  negatives_per_query: int = 0) -> int:
    """Raises ValueError unless the sidecar's keys are exactly the shards' sample keys and every
    negative names a sample of the shards. Returns how many samples have fewer than
    `negatives_per_query` mined negatives (the filter can leave a query none; the processor pads
    those with in-batch positives) and logs it."""
    shard_keys = set(shard_keys)
    side_keys = set(sidecar.negatives)
    missing, extra = sorted(shard_keys - side_keys), sorted(side_keys - shard_keys)
    if missing or extra:
        raise ValueError(
            f"{where}: the sidecar's sample keys do not match the shards': {len(missing)} shard keys have no "
            f"sidecar row (e.g. {missing[:3]}), {len(extra)} sidecar keys are in no shard (e.g. {extra[:3]}); "
            "mine again on these shards (`sde-ray mine`)"
        )
    unknown = sorted({k for keys in sidecar.negatives.values() for k in keys} - shard_keys)
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} negative keys are in no shard (e.g. {unknown[:3]})")
    short = sum(len(keys) < negatives_per_query for keys in sidecar.negatives.values())
    if short:
        logger.warning("%s: %d of %d samples have fewer than loss.negatives_per_query=%d mined negatives; "
                       "they are padded with in-batch positives", where, short, len(sidecar), negatives_per_query)
    return short


def shard_keys(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Every sample key of the given local shards, reading tar headers only."""
    keys: list[str] = []
    for path in paths:
        with tarfile.open(path, mode="r:") as archive:
            seen = dict.fromkeys(
                m.name.split("/")[-1].split(".", 1)[0] for m in archive if m.isreg() and "." in m.name
            )
        keys.extend(seen)
    return keys


# ---------------------------------------------------------------------------------------------
# The join: mined negatives' targets looked up by key in the shards


class CorpusIndex:
    """Sample key -> where its json and `pos.img` members lie in the local shards (tar headers
    only), so a negative's target is read with one seek instead of a pass over its shard."""

    def __init__(self, paths: Iterable[str | os.PathLike]):
        self.members: dict[str, dict[str, tuple[str, int, int]]] = {}
        for path in paths:
            with tarfile.open(path, mode="r:") as archive:
                for member in archive:
                    if member.isreg() and "." in member.name:
                        key, suffix = member.name.split("/")[-1].split(".", 1)
                        if suffix in ("json", "pos.img"):
                            self.members.setdefault(key, {})[suffix] = (str(path), member.offset_data, member.size)
        self._files: dict[str, object] = {}

    def _read(self, where: tuple[str, int, int]) -> bytes:
        path, offset, size = where
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open for later reads
        handle.seek(offset)
        return handle.read(size)

    def target(self, key: str) -> tuple[str, bytes | None, str]:
        """(pos_text, pos image bytes or None, target_hash) of sample `key`."""
        if key not in self.members:
            raise KeyError(f"sample key {key!r} is in no shard")
        members = self.members[key]
        meta = json.loads(self._read(members["json"]))
        image = self._read(members["pos.img"]) if "pos.img" in members else None
        return meta["pos_text"], image, meta["target_hash"]


class MinedNegatives:
    """A batch processor that first replaces each row's negatives by its mined ones (the sidecar's
    first `negatives_per_query` keys, their targets read from the shards), then runs `processor`.

    Built inside the Ray Data worker processes (by the train driver's processor factory), where
    `sde_ray.train.data`'s processor cache keeps it: the sidecar is loaded and the shard index
    built once per process.
    """

    def __init__(self, processor, sidecar_dir: str, shards: list[str], negatives_per_query: int):
        self.processor, self.negatives_per_query = processor, negatives_per_query
        self.negatives = load_sidecar(sidecar_dir).negatives
        self.index = CorpusIndex(shards)

    def __call__(self, raw: dict) -> dict:
        texts, images, hashes = [], [], []
        for key in raw["key"]:
            if key not in self.negatives:
                raise KeyError(f"sample {key!r} has no row in the negatives sidecar")
            found = [self.index.target(k) for k in self.negatives[key][: self.negatives_per_query]]
            texts.append([f[0] for f in found])
            images.append([f[1] for f in found])
            hashes.append([f[2] for f in found])
        return self.processor({**raw, "neg_text": texts, "neg_image": images, "neg_target_hash": hashes})
