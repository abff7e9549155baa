"""A dataset whose rows all have an empty `tgt_text` is reported by name as having no scorable row;
the other datasets are still scored, exactly as when evaluated without it (the reference)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sde_ray.eval.evaluation import evaluate_model


def test_a_dataset_with_no_scorable_row_is_reported_and_the_rest_scored(synthetic_mmeb, tiny_export, tmp_path):
    _, model, processor = tiny_export
    root = tmp_path / "eval"
    shutil.copytree(synthetic_mmeb["eval_dir"], root)
    for path in sorted((root / "SynObject").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for row in rows:
            row["tgt_text"], row["tgt_img_path"] = [], []
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)

    results = evaluate_model(model, processor, root, datasets=["SynObject", "SynColour", "SynCaption_t2i"],
                             batch_size=16)
    reference = evaluate_model(model, processor, Path(synthetic_mmeb["eval_dir"]),
                               datasets=["SynColour", "SynCaption_t2i"], batch_size=16)
    assert set(results["unscorable"]) == {"SynObject"}
    assert "no scorable row" in results["unscorable"]["SynObject"]
    assert "tgt_text" in results["unscorable"]["SynObject"]
    assert results["datasets"] == reference["datasets"] and results["overall"] == reference["overall"]
