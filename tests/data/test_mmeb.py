"""The built-in MMEB catalog and the path guards of ImageSource."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path

import pytest

from sde_ray.data.mmeb import MMEB_DATASETS, ImageSource, UnsafePathError, meta_task_of_subset, subset_index


def test_catalog_matches_the_paper_counts() -> None:
    assert len(MMEB_DATASETS) == 36
    counts = Counter((i.meta_task, i.split) for i in MMEB_DATASETS.values())
    assert counts == {("classification", "IND"): 5, ("classification", "OOD"): 5, ("vqa", "IND"): 6,
                      ("vqa", "OOD"): 4, ("retrieval", "IND"): 8, ("retrieval", "OOD"): 4,
                      ("grounding", "IND"): 1, ("grounding", "OOD"): 3}
    subsets = subset_index(MMEB_DATASETS)
    assert len(subsets) == 20 and all(MMEB_DATASETS[i.name].split == "IND" for i in subsets.values())
    assert subsets["ImageNet_1K"].name == "ImageNet-1K"  # train underscore, eval hyphen
    assert meta_task_of_subset("MSCOCO") == "grounding" and meta_task_of_subset("MSCOCO_t2i") == "retrieval"
    assert MMEB_DATASETS["HatefulMemes"].num_candidates == 2


@pytest.mark.parametrize("path, reason", [("/etc/passwd", "absolute_path"), ("C:/x.jpg", "absolute_path"),
                                          ("images/../../x.jpg", "parent_path"), ("..", "parent_path")])
def test_unsafe_paths_are_refused(tmp_path: Path, path: str, reason: str) -> None:
    with pytest.raises(UnsafePathError) as info:
        ImageSource(folders=[tmp_path]).read(path)
    assert info.value.reason == reason


def test_folder_then_zip_and_zip_slip(tmp_path: Path) -> None:
    (tmp_path / "images" / "S").mkdir(parents=True)
    (tmp_path / "images" / "S" / "a.jpg").write_bytes(b"folder")
    with zipfile.ZipFile(tmp_path / "S.zip", "w") as archive:
        archive.writestr("S/a.jpg", b"zip-a")
        archive.writestr("S/b.jpg", b"zip-b")
        archive.writestr(zipfile.ZipInfo("/images/S/evil.jpg"), b"evil")
    source = ImageSource(folders=[tmp_path], zips=[tmp_path / "S.zip"], zip_strip_prefixes=("images/",))
    assert source.read("images/S/a.jpg") == b"folder"
    assert source.read("images/S/b.jpg") == b"zip-b"
    with pytest.raises(UnsafePathError) as info:
        source.read("images/S/evil.jpg")
    assert info.value.reason == "zip_member_escapes"
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        source.read("images/S/c.jpg")
