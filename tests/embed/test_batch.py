"""`sde-ray embed`: the embeddings equal the evaluator's for the same items (its prompt format, its
encoder), bad rows are skipped and counted, and a rerun recomputes only the missing files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sde_ray.config import Config, with_values
from sde_ray.data.mmeb import eval_image_source
from sde_ray.embed.batch import EmbedActor, prepare_piece, run_embed
from sde_ray.embed.corpus import Columns, plan_files
from sde_ray.eval.encode import ModelEncoder
from sde_ray.eval.roots import select_datasets
from sde_ray.eval.scoring import encode_dataset, prepare_dataset
from sde_ray.models import export_config


def evaluator_candidates(eval_root: Path, name: str, model, processor):
    """(candidate items, the evaluator's embeddings of them) of one synthetic eval dataset."""
    (info,) = select_datasets(eval_root, [name])
    source = eval_image_source(eval_root)
    try:
        prepared = prepare_dataset(eval_root, info, source)
    finally:
        source.close()
    encoded = encode_dataset(prepared, ModelEncoder(model, processor, batch_size=7))
    items = [(item.text, prepared.images.get(item.image) if item.image else None) for item in prepared.table.candidates]
    return items, encoded.candidate_embeddings


def read_output(out: Path) -> tuple[list[str], np.ndarray, list[str]]:
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    return (table["id"].to_pylist(), np.asarray(table["embedding"].to_pylist(), dtype=np.float32),
            table["modality"].to_pylist())


def test_text_items_equal_the_evaluator_in_process(tmp_path, tiny_export, synthetic_mmeb):
    """The two pipeline stages run in this process on a parquet of text candidates (no instruction:
    the eval's texts as they are) give the evaluator's embeddings."""
    folder, model, processor = tiny_export
    items, reference = evaluator_candidates(Path(synthetic_mmeb["eval_dir"]), "SynObject", model, processor)
    assert all(image is None for _, image in items)
    pq.write_table(pa.table({"id": [f"c{i}" for i in range(len(items))], "text": [t for t, _ in items]}),
                   tmp_path / "corpus.parquet")
    kind, files = plan_files(tmp_path / "corpus.parquet", rows_per_file=1000, piece_rows=1000)
    assert kind == "parquet" and len(files) == 1
    from dataclasses import asdict

    batch = prepare_piece({"piece": [asdict(files[0].pieces[0])], "file": [0]}, columns=Columns(),
                          model_config=export_config(folder), instruction="", prefix="pos")
    out = EmbedActor(str(folder), 8, False, "fp32", "target")(batch)
    np.testing.assert_allclose(out["embedding"], reference, rtol=1e-5, atol=1e-5)
    assert list(out["modality"]) == ["text"] * len(items)


@pytest.mark.ray
@pytest.mark.slow  # ~65 s under load: a local Ray cluster runs the pipeline twice
def test_embed_equals_evaluator_skips_bad_rows_and_resumes(tmp_path, tiny_export, synthetic_mmeb, ray_cluster):
    folder, model, processor = tiny_export
    items, reference = evaluator_candidates(Path(synthetic_mmeb["eval_dir"]), "SynCaption_t2i", model, processor)
    # The eval's image candidates are MMEB prompts; the corpus holds the bare images and the
    # instruction is applied by embed.
    assert {text for text, _ in items} == {"<|image_1|>\nRepresent the given image.\n"}
    images = [image for _, image in items]
    ids = [f"img{i}" for i in range(len(images))] + ["corrupt", "empty"]
    pq.write_table(pa.table({"id": ids, "image": images + [b"not an image", None]}), tmp_path / "corpus.parquet")
    config = with_values(Config(), {"embed.instruction": "Represent the given image.", "embed.rows_per_file": 8,
                                    "embed.batch_size": 4, "logging.wandb": False})
    out = tmp_path / "out"
    summary = run_embed(config, str(folder), str(tmp_path / "corpus.parquet"), str(out), progress=False)

    got_ids, embeddings, modality = read_output(out)
    assert got_ids == ids[:-2] and modality == ["image"] * len(images)
    np.testing.assert_allclose(embeddings, reference, rtol=1e-5, atol=1e-5)
    assert summary["skipped"] == 2 and summary["rejected_now"] == {"undecodable_image": 1, "empty": 1}
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert summary["files_computed"] == files and len(files) == -(-len(ids) // 8)
    last = json.loads((out / files[-1].replace(".parquet", ".rejects.json")).read_text())
    assert [r["id"] for r in last] == ["corrupt", "empty"]

    # A rerun after deleting one file recomputes that file only; the others are not rewritten.
    before = {name: (out / name).stat().st_mtime_ns for name in files}
    (out / files[1]).unlink()
    again = run_embed(config, str(folder), str(tmp_path / "corpus.parquet"), str(out), progress=False)
    assert again["files_computed"] == [files[1]]
    assert all((out / name).stat().st_mtime_ns == before[name] for name in files if name != files[1])
    np.testing.assert_array_equal(read_output(out)[1], embeddings)

    # Another instruction into the same folder is refused before anything runs.
    other = with_values(config, {"embed.instruction": "Represent the given cropped image of the object"})
    with pytest.raises(ValueError, match="instruction"):
        run_embed(other, str(folder), str(tmp_path / "corpus.parquet"), str(out), progress=False)
