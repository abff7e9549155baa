"""The synthetic MMEB: MMEB's exact layout and schema, determinism, OOD split, noisy-correspondence rate,
and a validation split that shares no query with the evaluation split."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sde_ray.data.mmeb import META_TASKS, MMEB_DATASETS, load_dataset_catalog
from sde_ray.data.synthetic import HELD_OUT, write_synthetic_mmeb

SMALL = {"train_per_subset": 24, "eval_per_dataset": 6}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_mmeb(out, seed=3, **SMALL)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(synth: Path, tmp_path: Path) -> None:
    write_synthetic_mmeb(tmp_path / "again", seed=3, **SMALL)
    again = files(tmp_path / "again")
    reference = files(synth)
    reference.pop("synthetic.json"), again.pop("synthetic.json")  # records its own absolute paths
    assert again == reference
    write_synthetic_mmeb(tmp_path / "other", seed=4, **SMALL)
    other = files(tmp_path / "other")
    assert other.keys() >= {k for k in reference if k.endswith(".parquet")}
    assert other["MMEB-train/SynObject/original-00000-of-00001.parquet"] != \
        reference["MMEB-train/SynObject/original-00000-of-00001.parquet"]


def test_train_layout_and_schema_match_mmeb(synth: Path) -> None:
    root = synth / "MMEB-train"
    catalog = load_dataset_catalog(root)
    subsets = sorted(info.train_subset for info in catalog.values() if info.split == "IND")
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "images") == subsets
    with_negatives = 0
    for subset in subsets:
        assert [p.name for p in (root / subset).iterdir()] == ["original-00000-of-00001.parquet"]
        table = pq.read_table(root / subset / "original-00000-of-00001.parquet")
        names = table.schema.names
        assert names[:4] == ["qry", "qry_image_path", "pos_text", "pos_image_path"]
        assert names[4:] in ([], ["neg_text", "neg_image_path"])
        with_negatives += bool(names[4:])
        assert all(field.type == pa.string() for field in table.schema)
        assert table.num_rows == SMALL["train_per_subset"]
        for row in table.to_pylist():
            for column in ("qry_image_path", "pos_image_path"):
                path = row[column]
                if path:
                    assert path.startswith(f"images/{subset}/Train/") and path.endswith(".jpg")
                    assert (root / path).is_file()
            # MMEB prompts: the image token leads exactly when the side has an image.
            assert row["qry"].startswith("<|image_1|>\n") == bool(row["qry_image_path"])
            assert row["qry"].endswith("\n")
            if row["pos_image_path"]:
                assert row["pos_text"].startswith("<|image_1|>\n")
    assert 0 < with_negatives < len(subsets)  # like MMEB: some subsets carry negatives, some not


def test_eval_layout_schema_and_catalog(synth: Path) -> None:
    root = synth / "MMEB-eval"
    catalog = load_dataset_catalog(root)
    assert sorted(catalog) == sorted(p.name for p in root.iterdir() if p.is_dir())
    archive = zipfile.ZipFile(root / "images.zip")
    members = set(archive.namelist())
    for name, info in catalog.items():
        table = pq.read_table(root / name / "test-00000-of-00001.parquet")
        assert table.schema.names == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
        assert [f.type for f in table.schema] == [pa.string(), pa.string(), pa.list_(pa.string()), pa.list_(pa.string())]
        for row in table.to_pylist():
            assert len(row["tgt_text"]) == len(row["tgt_img_path"]) == info.num_candidates
            targets = list(zip(row["tgt_text"], row["tgt_img_path"]))
            assert len(set(targets)) == len(targets), f"{name}: duplicate candidates make P@1 ambiguous"
            for path in [row["qry_img_path"], *row["tgt_img_path"]]:
                assert not path or (path.startswith(f"{name}/") and path in members)
    tasks = {task: [i for i in catalog.values() if i.meta_task == task] for task in META_TASKS}
    for task, infos in tasks.items():
        assert len(infos) >= 2, task
        assert {"IND", "OOD"} <= {i.split for i in infos}, task
    # The real catalog is what a root without mmeb_datasets.json gets.
    assert load_dataset_catalog(synth) == MMEB_DATASETS


def _eval_rows(root: Path, name: str) -> list[tuple]:
    """Each query of `root/name` as its content: query text and image bytes, candidate texts and image bytes."""
    archive = zipfile.ZipFile(root / "images.zip")
    image = lambda path: archive.read(path) if path else b""  # noqa: E731
    return [(row["qry_text"], image(row["qry_img_path"]), tuple(row["tgt_text"]),
             tuple(image(path) for path in row["tgt_img_path"]))
            for row in pq.read_table(root / name / "test-00000-of-00001.parquet").to_pylist()]


def test_validation_split_is_the_eval_datasets_with_no_shared_query(synth: Path) -> None:
    eval_root, val_root = synth / "MMEB-eval", synth / "MMEB-val"
    assert load_dataset_catalog(val_root) == load_dataset_catalog(eval_root)
    for name in load_dataset_catalog(eval_root):
        evaluated, validated = _eval_rows(eval_root, name), _eval_rows(val_root, name)
        assert len(validated) == len(evaluated) == SMALL["eval_per_dataset"]
        assert not set(validated) & set(evaluated), name  # no query (with its candidates) in both
        query_images = {row[1] for row in evaluated if row[1]}
        assert not query_images & {row[1] for row in validated if row[1]}, name  # not even a query image


def test_ood_is_made_of_held_out_combinations(synth: Path) -> None:
    held_out = {f"{c} {s}" for c, s in HELD_OUT}
    train = pq.read_table(synth / "MMEB-train" / "SynObject" / "original-00000-of-00001.parquet").to_pylist()
    labels = [row["pos_text"] for row in train]
    assert not held_out & set(labels)
    assert len(set(labels)) < len(labels)  # classification targets repeat (duplicate targets exist)
    novel = pq.read_table(synth / "MMEB-eval" / "SynObject-Novel" / "test-00000-of-00001.parquet").to_pylist()
    assert all(row["tgt_text"][0] in held_out for row in novel)


def test_noisy_correspondence_rate_is_honoured(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    noisy = tmp_path / "noisy"
    write_synthetic_mmeb(clean, seed=1, train_per_subset=40, eval_per_dataset=2)
    write_synthetic_mmeb(noisy, seed=1, train_per_subset=40, eval_per_dataset=2, noisy_correspondence=0.25)
    declared = json.loads((noisy / "MMEB-train" / "synthetic_noise.json").read_text())["rows"]
    for subset, rows in declared.items():
        a = pq.read_table(clean / "MMEB-train" / subset / "original-00000-of-00001.parquet").to_pylist()
        b = pq.read_table(noisy / "MMEB-train" / subset / "original-00000-of-00001.parquet").to_pylist()
        assert [r["qry"] for r in a] == [r["qry"] for r in b]
        changed = [i for i, (x, y) in enumerate(zip(a, b))
                   if (x["pos_text"], x["pos_image_path"]) != (y["pos_text"], y["pos_image_path"])]
        assert changed == rows
        assert len(changed) == 10  # round(0.25 * 40)
    with pytest.raises(ValueError, match="noisy_correspondence"):
        write_synthetic_mmeb(tmp_path / "bad", noisy_correspondence=1.5)
