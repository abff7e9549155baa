"""`sde-ray search`: the chunked exact top-k against a full sort, the faiss HNSW index against it,
the saved index reused, and the CLI end to end on a small embedded corpus."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sde_ray.bench.search import clustered_vectors, recall_at_k
from sde_ray.embed.search import HnswIndex, corpus_index, exact_topk, load_embeddings, normalize


def full_sort_topk(queries, corpus, k):
    scores = queries @ corpus.T
    index = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, index, axis=1), index


def test_chunked_exact_topk_equals_a_full_sort():
    data = clustered_vectors(1030, 16, 8, seed=1)
    queries, corpus = data[:30], data[30:]
    for chunk in (1, 7, 1000, 5000):
        scores, index = exact_topk(queries, corpus, 10, chunk_rows=chunk)
        ref_scores, ref_index = full_sort_topk(queries, corpus, 10)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(index, ref_index)
    scores, index = exact_topk(queries, corpus[:3], 5)  # fewer rows than k: -1 pads
    assert (index[:, 3:] == -1).all() and (index[:, :3] >= 0).all()


def test_hnsw_recall_and_saved_index(tmp_path):
    data = clustered_vectors(2100, 32, 20, seed=2)
    queries, corpus = data[:100], data[100:]
    _, truth = exact_topk(queries, corpus, 10)
    _, found = HnswIndex.build(corpus, m=16, ef_construction=64).search(queries, 10, ef_search=64)
    assert recall_at_k(found, truth) >= 0.95
    assert recall_at_k(np.roll(truth, 1, axis=0), truth) < 0.2  # the measure can fail

    table = pa.table({"id": [f"v{i}" for i in range(len(corpus))],
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array((corpus * 3).reshape(-1)), 32),
                      "modality": ["text"] * len(corpus)})
    pq.write_table(table, tmp_path / "part-00000.parquet")
    ids, loaded, _ = load_embeddings(tmp_path)
    np.testing.assert_allclose(loaded, corpus, atol=1e-6)  # stored raw, loaded normalised
    corpus_index(tmp_path, loaded, 16, 64)
    written = (tmp_path / "hnsw.faiss").stat().st_mtime_ns
    again = corpus_index(tmp_path, loaded, 16, 64)
    assert (tmp_path / "hnsw.faiss").stat().st_mtime_ns == written  # reused, not rebuilt
    assert again.index.ntotal == len(corpus)


def test_search_cli_finds_the_item_of_its_own_text(tmp_path, tiny_export, capsys):
    from sde_ray.cli import main
    from sde_ray.eval.encode import ModelEncoder

    folder, model, processor = tiny_export
    texts = ["a red circle", "a blue square", "two green triangles", "a yellow star"]
    encoder = ModelEncoder(model, processor)
    (corpus,) = encoder.encode([("target", texts, [None] * len(texts))])
    (query,) = encoder.encode([("query", ["a blue square"], [None])])
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(4)],
                             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(corpus.reshape(-1)), corpus.shape[1]),
                             "modality": ["text"] * 4}), tmp_path / "part-00000.parquet")
    (tmp_path / "embed.json").write_text(json.dumps({"model_dir": str(folder)}))
    expected = (normalize(query) @ normalize(corpus).T)[0]
    for method in ("exact", "hnsw"):
        assert main(["search", "--embeddings", str(tmp_path), "--text", "a blue square", "--k", "3",
                     "--method", method, "--config", ""]) == 0
        (line,) = capsys.readouterr().out.strip().splitlines()[-1:]
        hits = json.loads(line)["hits"]
        assert [h["id"] for h in hits] == [f"t{i}" for i in np.argsort(-expected)[:3]]
        np.testing.assert_allclose([h["score"] for h in hits], np.sort(expected)[::-1][:3], rtol=1e-5)


def test_bench_search_quick_reports_recall_and_throughput(tmp_path):
    from sde_ray.bench.search import main

    results = main(json_path=str(tmp_path / "bench.json"), quick=True)
    assert results["faiss_flat"]["recall"] == 1.0  # exact search agrees with exact_topk
    assert max(r["recall"] for r in results["hnsw"]) >= 0.95
    assert all(r["qps"] > 0 for r in results["hnsw"]) and json.loads((tmp_path / "bench.json").read_text())["rows"] == 5000
