"""Eval-time modality-gap remedies: fitted on even rows, measured on odd rows, effect on P@1."""

from __future__ import annotations

import numpy as np
import pytest

from sde_ray.data.mmeb import DatasetInfo
from sde_ray.eval.dataset import build_table
from sde_ray.eval.gap import fit_remedy, fit_rows
from sde_ray.eval.evaluation import gap_remedy_effect
from sde_ray.eval.scoring import EncodedDataset

ROWS, CANDIDATES, DIM = 120, 6, 16


def _encoded(name, query, target, rng):
    """Row r: query r, candidates = its own target first, then 5 other rows' targets."""
    rows, index = [], []
    for r in range(ROWS):
        others = rng.choice([i for i in range(ROWS) if i != r], CANDIDATES - 1, replace=False)
        index.append([r, *others])
        rows.append(
            {
                "qry_text": f"q{r}",
                "qry_img_path": "",
                "tgt_text": [f"t{i}" for i in index[-1]],
                "tgt_img_path": [""] * CANDIDATES,
            }
        )
    table = build_table(name, rows)
    order = [int(c.text[1:]) for c in table.candidates]
    info = DatasetInfo(name, "retrieval", "IND", "T->T")
    return EncodedDataset(
        info, table, {}, ~table.malformed, query.astype(np.float32), target[order].astype(np.float32)
    )


def test_procrustes_undoes_a_rotation_between_modalities():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    encoded = []
    for name in ("one", "two"):
        query = rng.normal(size=(ROWS, DIM))
        target = query @ rotation + 0.05 * rng.normal(size=(ROWS, DIM))
        encoded.append(_encoded(name, query, target, rng))
    effect = gap_remedy_effect(encoded, "procrustes", k=8)
    assert effect["overall_before"] < 0.5
    assert effect["overall_after"] == pytest.approx(1.0)
    assert effect["datasets"]["one"]["num_queries"] == ROWS // 2  # measured on the odd rows only
    assert (
        "240 query-positive pairs" not in effect["fit_on"] and "120 query-positive pairs" in effect["fit_on"]
    )


def test_shared_projection_removes_the_gap_offset_and_private_noise():
    """Shared 4-dim signal; each modality adds its own constant offset (the gap) and private noise."""
    rng = np.random.default_rng(1)
    shared = rng.normal(size=(ROWS, 4))
    offset_q, offset_t = np.eye(6)[0] * 6.0, np.eye(6)[1] * 6.0
    query = np.concatenate([shared, 0.3 * rng.normal(size=(ROWS, 6)) + offset_q, np.zeros((ROWS, 6))], axis=1)
    target = np.concatenate(
        [shared, np.zeros((ROWS, 6)), 0.3 * rng.normal(size=(ROWS, 6)) + offset_t], axis=1
    )
    effect = gap_remedy_effect([_encoded("mixed", query, target, rng)], "shared_projection", k=4)
    assert effect["overall_before"] < 0.85
    assert effect["overall_after"] == pytest.approx(1.0)


def test_fit_rows_alternate_and_bad_remedy_is_named():
    assert fit_rows(5).tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="rotate"):
        fit_remedy("rotate", np.ones((4, 2)), np.ones((4, 2)))
