"""`sde-ray search`: top-k cosine search over a corpus embedded by `sde-ray embed`.

Two ways, same answer format (scores [Q, k] descending, row indices [Q, k]; -1 pads when the
corpus has fewer than k rows):
- `exact_topk`: the exact top-k, the corpus scored in chunks of `embed.search_chunk_rows` rows so
  memory holds one [Q, chunk] score block (for small and medium corpora, and as the reference);
- `HnswIndex`: an approximate index, faiss's HNSW graph over inner products of L2-normalised
  vectors (cosine), built once and saved beside the embeddings (`hnsw.faiss`; rebuilt when the
  embedding files or the HNSW settings change).

Why faiss-cpu: it is the reference library for vector search (Meta, MIT licence, releases every few
months), one abi3 wheel for every CPython >= 3.10 with no dependency beyond numpy (installed here on
Python 3.11 with pip in seconds), exact and approximate indexes under one API (so the benchmark
compares flat and HNSW search in the same library), and it reads and writes its indexes itself.
usearch also installs here and is smaller, but faiss's HNSW and flat indexes are what users and
papers measure against. `sde-ray bench search` measures its recall@10 against `exact_topk`.

Vectors are L2-normalised here (the embeddings are stored raw, as the evaluator's), so scores are
cosines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

INDEX_FILE = "hnsw.faiss"
INDEX_META = "hnsw.json"


def normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def load_embeddings(folder: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids, L2-normalised float32 [N, D] embeddings, modalities) of an `sde-ray embed` output folder."""
    files = sorted(Path(folder).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no part-*.parquet: run `sde-ray embed` first")
    table = pq.read_table(files)
    column = table["embedding"].combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return table["id"].to_pylist(), normalize(vectors), table["modality"].to_pylist()


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int, chunk_rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product, the corpus in chunks (a running top-k merged chunk by chunk)."""
    if k < 1 or chunk_rows < 1:
        raise ValueError(f"k and chunk_rows must be >= 1, got {k}, {chunk_rows}")
    queries = np.asarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_index = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(corpus), chunk_rows):
        scores = queries @ np.asarray(corpus[start:start + chunk_rows], dtype=np.float32).T
        take = min(k, scores.shape[1])
        part = np.argpartition(-scores, take - 1, axis=1)[:, :take]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, part, axis=1)], axis=1)
        merged_index = np.concatenate([best_index, part + start], axis=1)
        # Ties: the lower corpus row first, so the order does not depend on the chunking.
        order = np.lexsort((merged_index, -merged_scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(merged_scores, order, axis=1)
        best_index = np.take_along_axis(merged_index, order, axis=1)
    best_index[~np.isfinite(best_scores)] = -1
    return best_scores, best_index


class HnswIndex:
    """faiss `IndexHNSWFlat` over inner products (cosine on normalised vectors)."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, corpus: np.ndarray, m: int = 32, ef_construction: int = 80) -> HnswIndex:
        import faiss

        corpus = np.ascontiguousarray(corpus, dtype=np.float32)
        index = faiss.IndexHNSWFlat(corpus.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(corpus)
        return cls(index)

    def search(self, queries: np.ndarray, k: int, ef_search: int = 64) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        params = faiss.SearchParametersHNSW(efSearch=max(ef_search, k))
        scores, index = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=params)
        return scores, index.astype(np.int64)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> HnswIndex:
        import faiss

        return cls(faiss.read_index(str(path)))


def _files_digest(folder: Path, settings: dict) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(folder.glob("part-*.parquet")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def corpus_index(folder: str | Path, corpus: np.ndarray, m: int, ef_construction: int) -> HnswIndex:
    """The saved HNSW index of an embedded corpus, built (and saved) when missing or stale."""
    folder = Path(folder)
    digest = _files_digest(folder, {"m": m, "ef_construction": ef_construction})
    meta = folder / INDEX_META
    if (folder / INDEX_FILE).exists() and meta.exists() and json.loads(meta.read_text()).get("digest") == digest:
        return HnswIndex.load(folder / INDEX_FILE)
    index = HnswIndex.build(corpus, m, ef_construction)
    index.save(folder / INDEX_FILE)
    meta.write_text(json.dumps({"digest": digest, "rows": len(corpus), "m": m, "ef_construction": ef_construction}))
    return index


def encode_queries(model_dir: str | Path, texts: list[str], images: list[bytes | None], instruction: str,
                   batch_size: int) -> np.ndarray:
    """Query-side embeddings of (text, image) queries with the model, in this process."""
    from sde_ray.embed.items import encode_items, prepare_item
    from sde_ray.eval.encode import load_encoder

    encoder = load_encoder(model_dir, batch_size)
    items = [prepare_item(t, i, instruction, where=f"query[{n}]") for n, (t, i) in enumerate(zip(texts, images))]
    parts = [encoder.encode_arrays("query", encode_items(encoder.processor, "qry", items[s:s + batch_size]))
             for s in range(0, len(items), batch_size)]
    return np.concatenate(parts)


def run_search(config, embeddings_dir: str, texts: list[str], images: list[str], k: int, method: str,
               instruction: str = "", checkpoint: str = "") -> list[dict]:
    """Searches the embedded corpus for each query; returns one {query, hits: [{id, score}]} per query."""
    from sde_ray.embed.batch import MANIFEST

    folder = Path(embeddings_dir).expanduser().resolve()
    ids, corpus, _ = load_embeddings(folder)
    model_dir = checkpoint or json.loads((folder / MANIFEST).read_text())["model_dir"]
    queries_text = list(texts) + [""] * len(images)
    queries_image = [None] * len(texts) + [Path(p).expanduser().read_bytes() for p in images]
    vectors = normalize(encode_queries(model_dir, queries_text, queries_image, instruction, config.embed.batch_size))
    e = config.embed
    if method == "exact":
        scores, index = exact_topk(vectors, corpus, k, e.search_chunk_rows)
    elif method == "hnsw":
        scores, index = corpus_index(folder, corpus, e.hnsw_m, e.hnsw_ef_construction).search(vectors, k, e.hnsw_ef_search)
    else:
        raise ValueError(f"search method must be exact or hnsw, got {method!r}")
    names = list(texts) + list(images)
    return [{"query": name, "hits": [{"id": ids[j], "score": float(s)} for s, j in zip(row_s, row_i) if j >= 0]}
            for name, row_s, row_i in zip(names, scores, index)]
