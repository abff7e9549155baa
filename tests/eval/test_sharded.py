"""Validation spread over 2 gloo ranks scores exactly like one process encoding everything, and
each rank encodes only its share of the distinct items and reads only their images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "spectral"))
import eval_workers  # noqa: E402
import gloo_workers  # noqa: E402

from sde_ray.eval.sharded import rank_slice  # noqa: E402

from .conftest import E2E_DATASETS  # noqa: E402


def test_rank_slices_cover_every_item_once():
    for count in (0, 1, 5, 8, 11):
        for world in (1, 2, 3):
            parts = [rank_slice(count, r, world) for r in range(world)]
            assert [i for p in parts for i in range(count)[p]] == list(range(count))
            assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1


def test_two_gloo_ranks_match_single_process_validation(synthetic_mmeb, tiny_export, tmp_path):
    from sde_ray.eval.validation import _validation_slice, validation_p_at_1

    _, model, processor = tiny_export
    root = synthetic_mmeb["eval_dir"]
    ranks = gloo_workers.launch(eval_workers.validation_worker, tmp_path, root, E2E_DATASETS, 20)
    single = validation_p_at_1(model, processor, root, max_queries=20, batch_size=4, datasets=E2E_DATASETS)
    assert [r["p_at_1"] for r in ranks] == [single, single]
    prepared = _validation_slice(str(Path(root).resolve()), tuple(E2E_DATASETS), 20)
    distinct = sum(len(p.table.queries) + len(p.table.candidates) for p in prepared)
    assert sum(r["items"] for r in ranks) == distinct
    assert all(abs(r["items"] - distinct / 2) <= 2 * len(prepared) for r in ranks)
    # Each rank read only the images of its share: together every image of the slice.
    every_image = sorted({f"{p.info.name}/{path}" for p in prepared for path in p.table.image_paths()})
    assert all(0 < len(r["images"]) < len(every_image) for r in ranks)
    assert sorted(set(ranks[0]["images"]) | set(ranks[1]["images"])) == every_image
