"""Exact vs approximate search, side by side: `sde-ray bench search [--quick] [--json PATH]`.

A clustered set of L2-normalised vectors (100k × 256 by default; 5k with --quick): 1000 Gaussian
clusters with unit-norm centres and noise of std 1/√d per coordinate (norm ≈ 1, as large as
the centre) around them, a structure real embeddings
have and uniform random vectors lack (on those every ANN index degrades, and no embedder makes
them). Queries are 1000 other draws from the same mixture. Measured in one run, one thread each:
- exact top-10 (`sde_ray.embed.search.exact_topk`, numpy in 65536-row chunks), the reference;
- faiss `IndexFlatIP` (exact, BLAS) as a second exact baseline;
- faiss HNSW (`M = embed.hnsw_m`, efConstruction = `embed.hnsw_ef_construction`) at several efSearch:
  recall@10 against the exact top-10, and queries per second.
Build time of the HNSW index is reported too. Times are process CPU time of one thread (numpy's BLAS
and faiss's OpenMP pinned to one); ratios are query throughputs against exact_topk.
"""

from __future__ import annotations

import json
import time

import numpy as np

from sde_ray.embed.search import HnswIndex, exact_topk, normalize

EF_SEARCH = (16, 32, 64, 128)


def clustered_vectors(rows: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((clusters, dim)))
    labels = rng.integers(0, clusters, rows)
    return normalize(centres[labels] + rng.standard_normal((rows, dim)).astype(np.float32) * (1.0 / np.sqrt(dim)))


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def _timed(fn):
    """(result, process CPU seconds): with one thread, what the call costs on a dedicated core, even on
    a shared, oversubscribed machine (wall time there measures the neighbours)."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main(json_path: str | None = None, config=None, quick: bool = False, k: int = 10) -> dict:
    import faiss
    from threadpoolctl import threadpool_limits

    from sde_ray.config import Config

    config = config or Config()
    e = config.embed
    faiss.omp_set_num_threads(1)
    rows, dim, queries = (5_000, 64, 200) if quick else (100_000, 256, 1_000)
    clusters = 50 if quick else 1000
    data = clustered_vectors(rows + queries, dim, clusters, seed=0)
    corpus, query = data[:rows], data[rows:]

    with threadpool_limits(limits=1):  # numpy's BLAS: one thread, as faiss
        results = _measure(corpus, query, k, e)
    results.update(rows=rows, dim=dim, clusters=clusters)
    base = results["exact_topk"]["qps"]
    print(f"{rows} vectors × {dim} ({clusters} clusters), {queries} queries, top-{k}, 1 thread (CPU time); "
          f"HNSW M={e.hnsw_m} efConstruction={e.hnsw_ef_construction} built in {results['hnsw_build_s']:.1f} s")
    print(f"{'method':<22}{'recall@10':>10}{'queries/s':>12}{'× exact_topk':>14}")
    lines = [("exact_topk (numpy)", results["exact_topk"]), ("faiss IndexFlatIP", results["faiss_flat"])]
    lines += [(f"faiss HNSW ef={r['ef_search']}", r) for r in results["hnsw"]]
    for name, row in lines:
        row["speedup"] = round(row["qps"] / base, 2)
        print(f"{name:<22}{row['recall']:>10.4f}{row['qps']:>12.1f}{row['speedup']:>14.2f}")
    if json_path:
        with open(json_path, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


def _measure(corpus: np.ndarray, query: np.ndarray, k: int, e) -> dict:
    import faiss

    queries, dim = query.shape
    (_, truth), exact_s = _timed(lambda: exact_topk(query, corpus, k, e.search_chunk_rows))
    flat = faiss.IndexFlatIP(dim)
    flat.add(corpus)
    (_, flat_index), flat_s = _timed(lambda: flat.search(query, k))
    index, build_s = _timed(lambda: HnswIndex.build(corpus, e.hnsw_m, e.hnsw_ef_construction))
    results = {
        "queries": queries, "k": k, "threads": 1,
        "hnsw_m": e.hnsw_m, "hnsw_ef_construction": e.hnsw_ef_construction, "hnsw_build_s": round(build_s, 2),
        "exact_topk": {"qps": round(queries / exact_s, 1), "recall": 1.0},
        "faiss_flat": {"qps": round(queries / flat_s, 1), "recall": round(recall_at_k(flat_index, truth), 4)},
        "hnsw": [],
    }
    for ef in EF_SEARCH:
        (_, found), seconds = _timed(lambda ef=ef: index.search(query, k, ef))
        results["hnsw"].append({"ef_search": ef, "qps": round(queries / seconds, 1),
                                "recall": round(recall_at_k(found, truth), 4)})
    return results


if __name__ == "__main__":
    main()
