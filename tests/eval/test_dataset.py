"""Reading MMEB-eval as released (folder and images.zip), de-duplication, missing and malformed rows."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sde_ray.data.mmeb import DatasetInfo, eval_image_source
from sde_ray.eval.dataset import load_table, read_rows
from sde_ray.eval.scoring import encode_dataset, prepare_dataset, score_dataset

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _jpeg(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS[colour]).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("qry_text", pa.string()),
            ("qry_img_path", pa.string()),
            ("tgt_text", pa.list_(pa.string())),
            ("tgt_img_path", pa.list_(pa.string())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


ROWS = [  # I->T classification: the query image's colour name is the answer
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/red.jpg",
        "tgt_text": ["red", "green", "blue"],
        "tgt_img_path": ["", "", ""],
    },
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/green.jpg",
        "tgt_text": ["green", "red", "blue"],
        "tgt_img_path": ["", "", ""],
    },
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/blue.jpg",
        "tgt_text": ["blue", "red", "green"],
        "tgt_img_path": ["", "", ""],
    },
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/gone.jpg",  # image absent
        "tgt_text": ["red", "green", "blue"],
        "tgt_img_path": ["", "", ""],
    },
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/red.jpg",  # lists of unequal length
        "tgt_text": ["red", "green"],
        "tgt_img_path": ["", "", ""],
    },
    {
        "qry_text": "<|image_1|>\nclassify\n",
        "qry_img_path": "Colours/broken.jpg",  # undecodable bytes
        "tgt_text": ["red", "green", "blue"],
        "tgt_img_path": ["", "", ""],
    },
]


def _layout(root, images_in):
    _write_parquet(root / "Colours" / "test-00000-of-00001.parquet", ROWS)
    files = {f"Colours/{c}.jpg": _jpeg(c) for c in COLOURS}
    files["Colours/broken.jpg"] = b"\xff\xd8not a jpeg"
    if images_in == "folder":
        for name, data in files.items():
            (root / "eval_images" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "eval_images" / name).write_bytes(data)
    else:
        with zipfile.ZipFile(root / "images.zip", "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    return root


class ColourEncoder:
    """Embeds an image by its mean colour and a text by the colour it names: the true model."""

    def encode(self, requests):
        out = []
        for side, texts, images in requests:
            rows = []
            for text, image in zip(texts, images):
                if image is not None:
                    rows.append(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), float).mean((0, 1)))
                else:
                    rows.append(np.array(COLOURS.get(text, (1, 1, 1)), float))
            out.append(np.stack(rows).astype(np.float32))
        return out


@pytest.mark.parametrize("images_in", ["folder", "zip"])
def test_reads_the_released_layout_and_counts_missing_and_malformed(tmp_path, images_in):
    root = _layout(tmp_path, images_in)
    info = DatasetInfo("Colours", "classification", "IND", "I->T")
    source = eval_image_source(root)
    prepared = prepare_dataset(root, info, source)
    assert sorted(prepared.missing_images) == ["Colours/broken.jpg", "Colours/gone.jpg"]
    assert "undecodable" in prepared.missing_images["Colours/broken.jpg"]
    assert prepared.table.malformed.tolist() == [False, False, False, False, True, False]
    assert prepared.scorable.tolist() == [True, True, True, False, False, False]
    score = score_dataset(encode_dataset(prepared, ColourEncoder()))
    # three correct rows out of six: the missing, broken and malformed rows stay in the denominator
    assert (score.num_queries, score.num_correct, score.num_missing, score.num_malformed) == (6, 3, 2, 1)
    assert score.p_at_1 == pytest.approx(0.5)
    source.close()


def test_candidates_and_queries_are_deduplicated(tmp_path):
    root = _layout(tmp_path, "folder")
    table = load_table(root, "Colours")
    assert sorted(c.text for c in table.candidates) == ["blue", "green", "red"]
    assert len(table.queries) == 5  # red.jpg appears twice with the same text
    assert table.candidate_index.shape == (6, 3)
    assert table.candidate_index[4].tolist() == [-1, -1, -1]  # malformed row has no candidates
    naive = load_table(root, "Colours", dedup=False)
    assert len(naive.candidates) == 15 and len(naive.queries) == 5


def test_max_rows_and_clear_errors(tmp_path):
    root = _layout(tmp_path, "folder")
    assert len(read_rows(root / "Colours", max_rows=2)) == 2
    with pytest.raises(FileNotFoundError, match="Nope"):
        load_table(root, "Nope")
    bad = tmp_path / "Bad" / "test-00000-of-00001.parquet"
    bad.parent.mkdir()
    pq.write_table(pa.table({"qry_text": ["x"], "tgt_text": [["y"]]}), bad)
    with pytest.raises(ValueError, match="qry_img_path"):
        read_rows(tmp_path / "Bad")


def test_a_truncated_jpeg_counts_as_missing_instead_of_aborting(tmp_path):
    from sde_ray.eval.dataset import load_images

    whole = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(whole, "JPEG")
    data = whole.getvalue()
    with Image.open(io.BytesIO(data[: len(data) // 2])) as image:
        image.verify()  # the old check: structure only, the truncation passes
    (tmp_path / "eval_images").mkdir()
    (tmp_path / "eval_images" / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "eval_images" / "whole.jpg").write_bytes(data)
    source = eval_image_source(tmp_path)
    found, missing = load_images(["cut.jpg", "whole.jpg"], source)
    assert list(found) == ["whole.jpg"] and found["whole.jpg"] == data
    assert list(missing) == ["cut.jpg"] and "undecodable" in missing["cut.jpg"]
    source.close()
