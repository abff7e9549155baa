"""The UCI-digits real-image check: it loads through the project's own readers (the MMEB-train
converter, the batch processor, the MMEB-eval reader) and its eval sets have 10 candidates with
exactly one positive each."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")

from sde_ray.config import ModelConfig  # noqa: E402
from sde_ray.data.convert import convert_mmeb  # noqa: E402
from sde_ray.data.digits import DIGIT_WORDS, I2T, T2I, load_digits_arrays, write_digits_mmeb  # noqa: E402
from sde_ray.data.mmeb import eval_image_source, list_eval_datasets, load_dataset_catalog  # noqa: E402
from sde_ray.eval.dataset import load_images, load_table  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    write_digits_mmeb(out, seed=0, image_size=32)
    return out


def _index(path: str) -> int:
    return int(re.search(r"digit_(\d{4})\.png$", path).group(1))


def _digit_of_text(text: str) -> int:
    return DIGIT_WORDS.index(text.strip().split()[-1])


def test_split_sizes_and_deterministic_bytes(digits: Path, tmp_path: Path) -> None:
    summary = json.loads((digits / "digits.json").read_text())
    assert summary["train_rows"] == {I2T: 1347, T2I: 1347} and summary["eval_rows"] == {I2T: 450, T2I: 450}
    assert sum(summary["test_per_class"]) == 450 and min(summary["test_per_class"]) >= 43
    write_digits_mmeb(tmp_path, seed=0, image_size=32)
    for rel in ("MMEB-eval/images.zip", f"MMEB-train/{I2T}/original-00000-of-00001.parquet",
                f"MMEB-eval/{T2I}/test-00000-of-00001.parquet"):
        assert (tmp_path / rel).read_bytes() == (digits / rel).read_bytes()


def test_train_converts_to_shards_with_ten_label_targets(digits: Path, tmp_path: Path) -> None:
    manifest = convert_mmeb(digits / "MMEB-train", tmp_path / "shards", samples_per_shard=1024, progress=False)
    assert manifest["num_samples"] == 2 * 1347 and not manifest["rejected"]
    images, labels = load_digits_arrays()
    hashes = {I2T: set(), T2I: set()}
    seen = 0
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / "shards" / entry["name"]) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for name, data in members.items():
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            meta = json.loads(data)
            hashes[meta["subset"]].add(meta["target_hash"])
            image_bytes = members[f"{key}.qry.img" if meta["subset"] == I2T else f"{key}.pos.img"]
            pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("L"))
            assert pixels.shape == (32, 32)
            digit = _digit_of_text(meta["pos_text"] if meta["subset"] == I2T else meta["qry_text"])
            # The stored image is its digit's 8x8 original, upscaled exactly (nearest neighbour).
            matches = [i for i in np.flatnonzero(labels == digit) if np.array_equal(pixels[2::4, 2::4], images[i])]
            assert matches, f"{key}: image is no digit {digit} of the data set"
            seen += 1
    assert seen == 2 * 1347
    assert len(hashes[I2T]) == 10  # ten label texts: ~6 rows per label in a batch of 64
    assert len(hashes[T2I]) > 1300  # distinct images (a few UCI digits are pixel-identical)


def test_batch_processor_reads_the_converted_rows(digits: Path, tmp_path: Path) -> None:
    from sde_ray.models.processing import BatchProcessor

    manifest = convert_mmeb(digits / "MMEB-train", tmp_path / "shards", samples_per_shard=4096, progress=False)
    with tarfile.open(tmp_path / "shards" / manifest["shards"][0]["name"]) as archive:
        members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
    names = sorted(n[: -len(".json")] for n in members if n.endswith(".json"))
    # Two rows of each kind with the same label text, so that both query kinds are covered.
    label = {n: json.loads(members[f"{n}.json"]) for n in names}
    t2i_three = [n for n in names if label[n]["subset"] == T2I and label[n]["qry_text"].rstrip().endswith("three")]
    keys = t2i_three[:2] + [n for n in names if n not in t2i_three][:6]
    metas = [json.loads(members[f"{k}.json"]) for k in keys]
    batch = {"qry_text": [m["qry_text"] for m in metas], "pos_text": [m["pos_text"] for m in metas],
             "qry_image": [members.get(f"{k}.qry.img") for k in keys],
             "pos_image": [members.get(f"{k}.pos.img") for k in keys],
             "target_hash": [m["target_hash"] for m in metas], "subset": [m["subset"] for m in metas]}
    out = BatchProcessor(ModelConfig())(batch)
    assert out["qry_pixel_values"].shape == (8, 3, 32, 32) and out["qry_pixel_values"].dtype == np.uint8
    assert (out["qry_has_image"] == np.array([m["subset"] == I2T for m in metas])).all()
    assert (out["pos_has_image"] == np.array([m["subset"] == T2I for m in metas])).all()
    # query_id: the content id of the query; a label-text query repeats, an image query does not.
    for a in range(8):
        for b in range(8):
            same_query = (metas[a]["qry_text"], members.get(f"{keys[a]}.qry.img")) == \
                (metas[b]["qry_text"], members.get(f"{keys[b]}.qry.img"))
            assert (out["query_id"][a] == out["query_id"][b]) == same_query


def test_eval_sets_have_ten_candidates_and_exactly_one_positive(digits: Path) -> None:
    root = digits / "MMEB-eval"
    assert list_eval_datasets(root) == [I2T, T2I]
    catalog = load_dataset_catalog(root)
    assert {catalog[I2T].modality, catalog[T2I].modality} == {"I->T", "T->I"}
    _, labels = load_digits_arrays()
    source = eval_image_source(root)
    for name in (I2T, T2I):
        table = load_table(root, name)
        assert table.num_rows == 450 and not table.malformed.any()
        assert table.candidate_index.shape == (450, 10) and (table.candidate_index >= 0).all()
        found, missing = load_images(table.image_paths(), source)
        assert not missing and len(found) == 450
        for row in range(450):
            query = table.queries[table.query_index[row]]
            candidates = [table.candidates[c] for c in table.candidate_index[row]]
            assert len(set(candidates)) == 10  # no candidate repeats: P@1 has one right answer
            if name == I2T:
                digit = labels[_index(query.image)]
                assert sorted(_digit_of_text(c.text) for c in candidates) == list(range(10))
                assert _digit_of_text(candidates[0].text) == digit
            else:
                digit = _digit_of_text(query.text)
                shown = [labels[_index(c.image)] for c in candidates]
                assert shown[0] == digit and sorted(shown) == list(range(10))
    # T->I has ten distinct queries (one per label text); the dedup encodes each once.
    assert len(load_table(root, T2I).queries) == 10
