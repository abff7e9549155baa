"""From a trained model to embeddings people use (the application side: Ray Data, Ray Serve, faiss).

- `batch`: `sde-ray embed`, Ray Data batch inference of a corpus into parquet files (resumable);
- `corpus`: the corpora it reads (parquet table, image folder, WebDataset shards), planned as files;
- `items`: one item (text, image) → the model's inputs, shared by `embed` and `serve`;
- `search`: `sde-ray search`, exact top-k in chunks and a faiss HNSW index over an embedded corpus;
- `serve`: `sde-ray serve`, a Ray Serve deployment answering OpenAI-style `/v1/embeddings`;
- `export`: files that make an export load with sentence-transformers, and its model card.

See docs/use.md.
"""
