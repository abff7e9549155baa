"""The MMEB converter on a small MMEB-train fixture with every kind of bad row, from a folder and a zip."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sde_ray.data.convert import convert_mmeb

PROMPT = "<|image_1|>\nRepresent the given image for classification\n"
TARGET_PROMPT = "<|image_1|>\nRepresent the given image.\n"


def jpeg(colour: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_parquet(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({c: [r.get(c, "") for r in rows] for c in columns},
                     schema=pa.schema([(c, pa.string()) for c in columns]))
    pq.write_table(table, path)


# Expected outcome per (subset, row): None = kept, else the reject reason.
FOLDER_ROWS = [
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/a.jpg", "pos_text": "cat"}, None),
    ({"qry": "Find me an everyday image that matches the given caption: a dog\n", "pos_text": TARGET_PROMPT,
      "pos_image_path": "images/Folder/Train/b.jpg"}, None),
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/missing.jpg", "pos_text": "cat"}, "missing_image"),
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/broken.jpg", "pos_text": "cat"}, "undecodable_image"),
    ({"qry": "", "qry_image_path": "", "pos_text": "cat"}, "empty_query"),
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/a.jpg", "pos_text": "  "}, "empty_positive"),
    ({"qry": PROMPT, "qry_image_path": "/etc/hostname", "pos_text": "cat"}, "absolute_path"),
    ({"qry": PROMPT, "qry_image_path": "images/../../outside.jpg", "pos_text": "cat"}, "parent_path"),
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/b.jpg", "pos_text": "cat"}, None),  # duplicate target
    ({"qry": PROMPT, "qry_image_path": "images/Folder/Train/a.jpg", "pos_text": "dog"}, None),
]
ZIP_ROWS = [
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/c.jpg", "pos_text": "bird", "neg_text": "fish",
      "neg_image_path": ""}, None),
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/c.jpg", "pos_text": TARGET_PROMPT,
      "pos_image_path": "images/Zipped/Train/d.jpg", "neg_text": TARGET_PROMPT,
      "neg_image_path": "images/Zipped/Train/c.jpg"}, None),
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/evil.jpg", "pos_text": "bird"}, "zip_member_escapes"),
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/truncated.jpg", "pos_text": "bird"}, "undecodable_image"),
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/absent.jpg", "pos_text": "bird"}, "missing_image"),
    ({"qry": PROMPT, "qry_image_path": "images/Zipped/Train/d.jpg", "pos_text": ""}, "empty_positive"),
]
IMAGES = {"a.jpg": jpeg((200, 30, 30)), "b.jpg": jpeg((30, 200, 30)), "c.jpg": jpeg((30, 30, 200)),
          "d.jpg": jpeg((200, 200, 30))}


@pytest.fixture
def mmeb_train(tmp_path: Path) -> Path:
    """MMEB-train layout: `Folder` with unpacked images, `Zipped` with images_zip/Zipped.zip + neg columns."""
    src = tmp_path / "MMEB-train"
    base = ["qry", "qry_image_path", "pos_text", "pos_image_path"]
    write_parquet(src / "Folder" / "original-00000-of-00001.parquet", [r for r, _ in FOLDER_ROWS], base)
    write_parquet(src / "Zipped" / "original-00000-of-00001.parquet", [r for r, _ in ZIP_ROWS],
                  base + ["neg_text", "neg_image_path"])
    folder = src / "images" / "Folder" / "Train"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(IMAGES["a.jpg"])
    (folder / "b.jpg").write_bytes(IMAGES["b.jpg"])
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    (tmp_path / "outside.jpg").write_bytes(IMAGES["a.jpg"])  # what the `..` row points at
    (src / "images_zip").mkdir()
    with zipfile.ZipFile(src / "images_zip" / "Zipped.zip", "w") as archive:
        archive.writestr("Zipped/Train/c.jpg", IMAGES["c.jpg"])  # members without the images/ prefix
        archive.writestr("images/Zipped/Train/d.jpg", IMAGES["d.jpg"])  # and with it
        archive.writestr("images/Zipped/Train/truncated.jpg", IMAGES["d.jpg"][: len(IMAGES["d.jpg"]) // 2])
        archive.writestr(zipfile.ZipInfo("/images/Zipped/Train/evil.jpg"), IMAGES["c.jpg"])  # zip-slip
    return src


def snapshot(root: Path, exclude: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and exclude not in p.parents}


def read_shards(out: Path, manifest: dict) -> dict[str, dict[str, bytes]]:
    """Independent reader (tarfile): key -> {member suffix: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as archive:
            for member in archive.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = archive.extractfile(member).read()
    return samples


def expected_rejects() -> dict[tuple[str, int], str]:
    out = {("Folder", i): reason for i, (_, reason) in enumerate(FOLDER_ROWS) if reason}
    out.update({("Zipped", i): reason for i, (_, reason) in enumerate(ZIP_ROWS) if reason})
    return out


def image_bytes(path: str) -> bytes | None:
    return IMAGES[Path(path).name] if path else None


def test_round_trip_counts_rejects_checksums(mmeb_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    before = snapshot(tmp_path, out)
    manifest = convert_mmeb(mmeb_train, out, samples_per_shard=3, progress=False)
    assert snapshot(tmp_path, out) == before, "the converter wrote or touched something outside --out"

    rejects = expected_rejects()
    kept = len(FOLDER_ROWS) + len(ZIP_ROWS) - len(rejects)
    assert manifest["num_samples"] == kept
    assert manifest["rejected"] == len(rejects)
    assert manifest["num_shards"] == -(-(len(FOLDER_ROWS) + len(ZIP_ROWS)) // 3)
    assert manifest["subsets"]["Folder"] == {"rows": 10, "samples": 4, "rejected": 6, "meta_task": "unknown"}
    by_reason = {r: list(rejects.values()).count(r) for r in set(rejects.values())}
    assert {k: v for k, v in manifest["rejected_by_reason"].items() if v} == by_reason

    lines = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {(r["subset"], r["source_row"]): r["reason"] for r in lines} == rejects
    assert all(r["detail"] for r in lines)

    for entry in manifest["shards"]:
        data = (out / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]
    assert sum(e["num_samples"] for e in manifest["shards"]) == kept

    samples = read_shards(out, manifest)
    sources = {"Folder": FOLDER_ROWS, "Zipped": ZIP_ROWS}
    expected_keys = {f"{s}-{i:08d}" for s, rows in sources.items() for i, (_, r) in enumerate(rows) if r is None}
    assert set(samples) == expected_keys
    hashes = {}
    for key, members in samples.items():
        meta = json.loads(members["json"])
        row = sources[meta["subset"]][meta["source_row"]][0]
        assert key == f"{meta['subset']}-{meta['source_row']:08d}"
        assert meta["qry_text"] == row["qry"] and meta["pos_text"] == row["pos_text"]
        assert meta["neg_text"] == row.get("neg_text", "")
        assert meta["split"] == "original"
        for side, column in (("qry", "qry_image_path"), ("pos", "pos_image_path"), ("neg", "neg_image_path")):
            assert members.get(f"{side}.img") == image_bytes(row.get(column, ""))
        pos_image = image_bytes(row.get("pos_image_path", "")) or b""
        assert meta["target_hash"] == hashlib.sha1(row["pos_text"].encode() + b"\0" + pos_image).hexdigest()
        hashes[key] = meta["target_hash"]
    # Rows 0 and 8 of Folder share the target "cat" (different query images): one content id.
    assert hashes["Folder-00000000"] == hashes["Folder-00000008"] != hashes["Folder-00000009"]


def test_resume_redoes_only_the_half_written_shard(mmeb_train: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = convert_mmeb(mmeb_train, out, samples_per_shard=3, progress=False)
    names = [e["name"] for e in first["shards"]]
    victim = out / names[1]
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a shard cut off mid-write
    (out / f"{names[2]}.tmp-99999").write_bytes(b"partial")  # an interrupted run's temp file
    untouched = {n: (out / n).stat().st_mtime_ns for n in names if n != names[1]}

    second = convert_mmeb(mmeb_train, out, samples_per_shard=3, progress=False)
    assert victim.read_bytes() == original  # redone, byte-identical (deterministic shards)
    assert {n: (out / n).stat().st_mtime_ns for n in untouched} == untouched
    assert not list(out.glob("*.tmp-*"))
    assert second == first


@pytest.mark.ray
def test_processes_and_ray_tasks_write_the_single_process_bytes(mmeb_train: Path, tmp_path: Path,
                                                                ray_cluster) -> None:
    from sde_ray.ray_cluster import conversion_executor

    one = convert_mmeb(mmeb_train, tmp_path / "one", samples_per_shard=2, workers=1, progress=False)
    parallel = {"two": {"workers": 2}, "ray": conversion_executor()}
    assert parallel["ray"]["workers"] == 4  # every CPU of the session's cluster: 8 groups of 1-2 shards
    for name, executor in parallel.items():
        manifest = convert_mmeb(mmeb_train, tmp_path / name, samples_per_shard=2, progress=False, **executor)
        assert manifest == one, name  # same shards, counts, checksums and rejects, in the same order
        for entry in one["shards"]:
            assert (tmp_path / name / entry["name"]).read_bytes() == (tmp_path / "one" / entry["name"]).read_bytes()
        assert (tmp_path / name / "rejects.jsonl").read_text() == (tmp_path / "one" / "rejects.jsonl").read_text()


def test_shard_checks_by_depth_and_data_verify(mmeb_train: Path, tmp_path: Path, capsys) -> None:
    from sde_ray.cli import main
    from sde_ray.data.shards import check_shards

    out = tmp_path / "shards"
    manifest = convert_mmeb(mmeb_train, out, samples_per_shard=2, progress=False)
    paths = [str(out / entry["name"]) for entry in manifest["shards"]]
    counts = {}  # the independent reference: tarfile's members, by key
    for key in read_shards(out, manifest):
        counts[key] = counts.get(key, 0) + 1
    for depth in ("manifest", "headers", "sha256"):
        check = check_shards(paths, manifest, depth=depth)
        assert check.paths == [p for p, e in zip(paths, manifest["shards"]) if e["num_samples"]] and not check.skipped
        assert check.num_samples == len(counts) == manifest["num_samples"]

    truncated, flipped, headerless, deleted = [p for p, e in zip(paths, manifest["shards"]) if e["num_samples"]][:4]
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[:-512])
    data = bytearray(Path(flipped).read_bytes())
    data[600] ^= 0xFF  # inside the first member's data: same size, same tar structure
    Path(flipped).write_bytes(bytes(data))
    data = Path(headerless).read_bytes()
    Path(headerless).write_bytes(bytes(512) + data[512:])  # the first header zeroed: an empty archive
    os.remove(deleted)
    reasons = {depth: check_shards(paths, manifest, depth=depth).skipped for depth in ("manifest", "headers", "sha256")}
    # A launch (manifest) stats each shard: it catches what changes a shard's size or removes it;
    # the header parse also catches the broken structure; only the hash sees a changed byte.
    assert set(reasons["manifest"]) == {truncated, deleted}
    assert set(reasons["headers"]) == {truncated, deleted, headerless}
    assert set(reasons["sha256"]) == {truncated, deleted, headerless, flipped}
    assert "!= manifest" in reasons["manifest"][truncated] and reasons["manifest"][deleted] == "file not found"
    assert "samples != manifest" in reasons["headers"][headerless]
    assert "sha256" in reasons["sha256"][flipped]

    assert main(["data", "verify", str(out)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["listed"] == len(paths) and set(report["skipped"]) == set(reasons["sha256"])
    with pytest.raises(ValueError, match="not one of"):
        check_shards(paths, manifest, depth="md5")


def test_subset_selection_and_clear_errors(mmeb_train: Path, tmp_path: Path) -> None:
    manifest = convert_mmeb(mmeb_train, tmp_path / "zip-only", subsets=["Zipped"], progress=False)
    assert list(manifest["subsets"]) == ["Zipped"]
    with pytest.raises(ValueError, match="Nope"):
        convert_mmeb(mmeb_train, tmp_path / "x", subsets=["Nope"], progress=False)
    with pytest.raises(ValueError, match="must not be the MMEB source"):
        convert_mmeb(mmeb_train, mmeb_train.parent, progress=False)
    write_parquet(mmeb_train / "Bad" / "original-00000-of-00001.parquet", [{"qry": "q"}], ["qry"])
    with pytest.raises(ValueError, match="missing MMEB-train column"):
        convert_mmeb(mmeb_train, tmp_path / "y", subsets=["Bad"], progress=False)
    assert not os.path.exists(tmp_path / "y" / "manifest.json")
