"""Bad archives and folders in MMEB-train: a CRC-corrupt zip member is one rejected row, a truncated
zip rejects the rows that need it and names its path, a symlinked `images/` folder is followed, and
a conversion that produces nothing exits non-zero with the reasons counted. Reference: the same
fixture converted intact (tests/data/test_convert.py's rows and expected reasons)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from sde_ray.cli import main
from sde_ray.data.convert import convert_mmeb

from tests.data.test_convert import IMAGES, ZIP_ROWS, expected_rejects, mmeb_train  # noqa: F401

ZIP = Path("images_zip") / "Zipped.zip"


def _rejects(out: Path) -> dict[tuple[str, int], dict]:
    rows = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return {(r["subset"], r["source_row"]): r for r in rows}


def _rows_using(member: str) -> set[int]:
    return {i for i, (row, reason) in enumerate(ZIP_ROWS) if reason is None
            and any(row.get(f, "").endswith(member) for f in ("qry_image_path", "pos_image_path", "neg_image_path"))}


def test_a_crc_corrupt_member_is_one_rejected_row(mmeb_train: Path, tmp_path: Path) -> None:
    intact = convert_mmeb(mmeb_train, tmp_path / "intact", progress=False)
    with zipfile.ZipFile(mmeb_train / ZIP) as archive:
        info = archive.getinfo("images/Zipped/Train/d.jpg")
    data = (mmeb_train / ZIP).read_bytes()
    # Stored uncompressed: the member's bytes follow its 30-byte local header, name and extra field.
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o:info.header_offset + o + 2], "little")
                           for o in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len + 100
    (mmeb_train / ZIP).write_bytes(data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1:])

    manifest = convert_mmeb(mmeb_train, tmp_path / "out", progress=False)
    hit = _rows_using("d.jpg")
    assert hit and manifest["num_samples"] == intact["num_samples"] - len(hit)
    rejects = _rejects(tmp_path / "out")
    for row in hit:
        assert rejects[("Zipped", row)]["reason"] == "corrupt_zip_member"
        assert str(mmeb_train / ZIP) in rejects[("Zipped", row)]["detail"] and "CRC" in rejects[("Zipped", row)]["detail"]
    assert manifest["rejected_by_reason"]["corrupt_zip_member"] == len(hit)


def test_a_truncated_zip_names_its_path_and_rejects_its_rows(mmeb_train: Path, tmp_path: Path) -> None:
    intact = convert_mmeb(mmeb_train, tmp_path / "intact", progress=False)
    data = (mmeb_train / ZIP).read_bytes()
    (mmeb_train / ZIP).write_bytes(data[: len(data) // 2])

    manifest = convert_mmeb(mmeb_train, tmp_path / "out", progress=False)
    rejects = _rejects(tmp_path / "out")
    zip_rows = {key for key, r in rejects.items() if r["reason"] == "unreadable_zip"}
    # every Zipped row that looks for an image (found, bad or absent before: it may be in the lost zip)
    assert zip_rows == {("Zipped", i) for i, (row, _) in enumerate(ZIP_ROWS)
                        if row.get("pos_text", "").strip() or row.get("pos_image_path")}
    assert all(str(mmeb_train / ZIP) in rejects[key]["detail"] for key in zip_rows)
    assert manifest["subsets"]["Folder"] == intact["subsets"]["Folder"]  # the rest is converted as before


def test_a_symlinked_images_folder_is_followed(mmeb_train: Path, tmp_path: Path) -> None:
    intact = convert_mmeb(mmeb_train, tmp_path / "intact", progress=False)
    moved = tmp_path / "other_disk" / "images"
    moved.parent.mkdir()
    (mmeb_train / "images").rename(moved)
    (mmeb_train / "images").symlink_to(moved, target_is_directory=True)

    manifest = convert_mmeb(mmeb_train, tmp_path / "out", progress=False)
    assert manifest["num_samples"] == intact["num_samples"] > 0
    assert manifest["rejected_by_reason"] == intact["rejected_by_reason"]
    # a symlink inside the followed folder still may not leave it
    (moved / "Folder" / "Train" / "a.jpg").unlink()
    (moved / "Folder" / "Train" / "a.jpg").symlink_to(tmp_path / "outside.jpg")
    assert convert_mmeb(mmeb_train, tmp_path / "out2", progress=False)["rejected_by_reason"]["parent_path"] > 1


def test_a_conversion_with_no_sample_exits_non_zero_with_reasons(mmeb_train: Path, tmp_path: Path, capsys) -> None:
    data = (mmeb_train / ZIP).read_bytes()
    (mmeb_train / ZIP).write_bytes(data[:100])
    out = tmp_path / "out"
    assert main(["data", "convert-mmeb", "--src", str(mmeb_train), "--out", str(out), "--subsets", "Zipped"]) == 1
    err = capsys.readouterr().err
    assert "0 samples" in err and '"unreadable_zip": 5' in err and '"empty_positive": 1' in err
