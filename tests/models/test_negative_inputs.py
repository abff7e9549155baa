"""Explicit negatives through the processor and the embedder: [B, K, ...] arrays, padding with the
next rows' positives, and target features in the per-query layout (vs encoding each side alone)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sde_ray.data.mmeb import stable_id as target_id
from sde_ray.models import BatchProcessor, build_model

K = 2


def _with_negatives(raw: dict, png) -> dict:
    rows = len(raw["qry_text"])
    negatives = [["a purple star", "<|image_1|>\nan orange ring"]] + [["a grey dot"]] + [[] for _ in range(rows - 2)]
    images = [[None, png("orange")], [None]] + [[] for _ in range(rows - 2)]
    return {**raw, "neg_text": negatives, "neg_image": images}


def test_processor_emits_k_negatives_per_row_padded_with_next_positives(tiny_config, raw, make_png):
    from sde_ray.data.convert import target_hash

    config = tiny_config
    processor = BatchProcessor(config, negatives_per_query=K)
    batch = _with_negatives(raw, make_png)
    out = processor(batch)
    rows = len(raw["qry_text"])
    assert out["neg_input_ids"].shape == (rows, K, processor.seq_len)
    assert out["neg_pixel_values"].shape == (rows, K, *processor.image_shape)
    # Row 0: its own two negatives, encoded as that side alone would be.
    alone = BatchProcessor(config).encode_inputs(batch["neg_text"][0], batch["neg_image"][0], "neg")
    np.testing.assert_array_equal(out["neg_input_ids"][0], alone["neg_input_ids"])
    np.testing.assert_array_equal(out["neg_pixel_values"][0], alone["neg_pixel_values"])
    assert out["neg_target_id"][0, 1] == target_id(target_hash(batch["neg_text"][0][1], batch["neg_image"][0][1]))
    # Row 1 has one negative: the pad is row 2's positive. Row 5 (last) wraps to rows 0 and 1.
    np.testing.assert_array_equal(out["neg_input_ids"][1, 1], out["pos_input_ids"][2])
    assert out["neg_target_id"][1, 1] == out["target_id"][2]
    np.testing.assert_array_equal(out["neg_input_ids"][rows - 1], out["pos_input_ids"][[0, 1]])
    assert pickle.loads(pickle.dumps(processor)).negatives_per_query == K
    assert "neg_input_ids" not in BatchProcessor(config)(batch)  # off by default


def test_embedder_returns_targets_in_the_per_query_layout(tiny_config, raw, make_png):
    config = tiny_config
    out = BatchProcessor(config, negatives_per_query=K)(_with_negatives(raw, make_png))
    batch = {key: torch.from_numpy(value) for key, value in out.items()}
    model = build_model(tiny_config, seed=0).eval()
    with torch.no_grad():
        query, target = model(batch)
        positives = model.encode_side(batch, "pos")
        flat = {key: value.flatten(0, 1) for key, value in batch.items() if key.startswith("neg_")}
        negatives = model.encode_side(flat, "neg")
    rows = len(raw["qry_text"])
    assert query.shape[0] == rows and target.shape[0] == rows * (1 + K)
    grouped = target.view(rows, 1 + K, -1)
    torch.testing.assert_close(grouped[:, 0], positives, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grouped[:, 1:].reshape(rows * K, -1), negatives, rtol=1e-4, atol=1e-5)


def test_one_row_batch_without_negatives_is_an_error(tiny_configs, raw):
    config = next(iter(tiny_configs.values()))
    one = {key: value[:1] for key, value in raw.items()}
    with pytest.raises(ValueError, match="negatives_per_query=2"):
        BatchProcessor(config, negatives_per_query=K)({**one, "neg_text": [[]], "neg_image": [[]]})


def test_chunks_of_rows_concatenate_to_the_whole_batch_layout(tiny_configs, raw, make_png):
    """GradCache encodes a batch in chunks of rows and concatenates the features: with the per-query
    layout the concatenation is the whole batch's layout, negatives included."""
    config = next(iter(tiny_configs.values()))
    out = BatchProcessor(config, negatives_per_query=K)(_with_negatives(raw, make_png))
    batch = {key: torch.from_numpy(value) for key, value in out.items()}
    model = build_model(config, seed=0).eval()
    with torch.no_grad():
        whole = model(batch)[1]
        parts = [model({key: value[rows] for key, value in batch.items()})[1] for rows in (slice(0, 2), slice(2, None))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-4, atol=1e-5)
