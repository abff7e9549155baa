"""A user's own MMEB-layout eval set is scored, not refused: datasets no catalog describes are
scored like catalogued ones, reported in their own group (no meta-task, outside IND / OOD /
overall) with a one-line notice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sde_ray.eval.evaluation import evaluate_model

from sde_ray.eval.roots import select_datasets


@pytest.fixture
def user_root(synthetic_mmeb, tmp_path):
    """ImageNet-1K (a catalogued name) and MyCats (none) in MMEB-eval layout, without a catalog file."""
    source = Path(synthetic_mmeb["eval_dir"])
    root = tmp_path / "user-eval"
    root.mkdir()
    shutil.copytree(source / "SynObject", root / "ImageNet-1K")
    shutil.copytree(source / "SynColour", root / "MyCats")
    shutil.copy(source / "images.zip", root / "images.zip")
    return root


def test_user_datasets_are_scored_in_their_own_group(user_root, synthetic_mmeb, tiny_export, capsys):
    _, model, processor = tiny_export
    infos = select_datasets(user_root)
    assert [(i.name, i.meta_task, i.split) for i in infos] == [
        ("ImageNet-1K", "classification", "IND"), ("MyCats", "outside_catalog", "outside_catalog")]
    notice = capsys.readouterr().out.strip().splitlines()
    assert len(notice) == 1 and "MyCats" in notice[0] and "not in the MMEB catalog" in notice[0]

    results = evaluate_model(model, processor, user_root)
    reference = evaluate_model(model, processor, synthetic_mmeb["eval_dir"], datasets=["SynObject", "SynColour"])
    assert results["datasets"]["MyCats"]["p_at_1"] == reference["datasets"]["SynColour"]["p_at_1"]
    assert results["datasets"]["ImageNet-1K"]["p_at_1"] == reference["datasets"]["SynObject"]["p_at_1"]
    # MMEB's aggregates count only the catalogued set; the user set has its own mean.
    assert results["overall"] == results["ind"] == results["datasets"]["ImageNet-1K"]["p_at_1"]
    assert results["ood"] is None and list(results["meta_tasks"]) == ["classification"]
    assert results["outside_catalog"] == results["datasets"]["MyCats"]["p_at_1"]

