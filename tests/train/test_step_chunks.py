"""How `train_step` cuts a local batch into GradCache chunks (`sde_ray.train.step`): fixed rows, or a
token budget (`train.chunk_tokens`), against counts worked out by hand. That such chunks give the
full-batch step on 2 ranks under ZeRO 0-3 is tests/train/test_gradcache.py (f)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sde_ray.config import ConfigError, load_config
from sde_ray.train.deepspeed_config import build_deepspeed_config
from sde_ray.train.step import chunk_sizes, padded_tokens, row_spans, split_rows, split_to_count, token_budget_sizes


def right_padded(lengths: list[int]) -> np.ndarray:
    """Spans [rows, 1, 2] of right-padded rows of these lengths."""
    return np.array([[[0, n]] for n in lengths], dtype=np.int64)


def test_padded_tokens_is_sequences_times_the_trimmed_width():
    queries = np.array([[[2, 5]], [[0, 5]]])  # left padding: the width runs from column 0 to 5
    negatives = np.array([[[0, 3], [0, 0]], [[0, 4], [0, 1]]])  # 2 per row; an empty one still counts
    assert padded_tokens([queries]) == 2 * 5
    assert padded_tokens([queries, negatives]) == 2 * 5 + 4 * 4
    assert padded_tokens([np.zeros((3, 1, 2), dtype=np.int64)]) == 0


def test_token_budget_chunks_by_hand():
    spans = [right_padded([3, 5, 2, 8, 1])]
    # 10: rows 0-1 cost 2 × 5 = 10; adding row 2 would cost 15; row 2 + row 3 would cost 16; ...
    assert token_budget_sizes(spans, 10, max_rows=8) == [2, 1, 1, 1]
    assert token_budget_sizes(spans, 16, max_rows=8) == [3, 2]  # 3 × 5 = 15, then 2 × 8 = 16
    assert token_budget_sizes(spans, 16, max_rows=2) == [2, 2, 1]  # the row cap binds first
    assert token_budget_sizes(spans, 4, max_rows=8) == [1, 1, 1, 1, 1]  # rows over the budget stand alone
    # Both sides count: targets of 6 tokens make every pair cost 2 × (5 + 6) = 22 > 16.
    assert token_budget_sizes([spans[0][:2], right_padded([6, 6])], 16, max_rows=8) == [1, 1]


def test_split_to_count_halves_the_costliest_chunk():
    spans = [right_padded([1, 1, 9, 9])]
    assert split_to_count([4], spans, 2) == [2, 2]
    assert split_to_count([2, 2], spans, 3) == [2, 1, 1]  # rows 2-3 cost 18, rows 0-1 cost 2
    assert split_to_count([2, 1, 1], spans, 4) == [1, 1, 1, 1]
    assert split_to_count([3, 1], spans, 2) == [3, 1]


def test_chunk_sizes_and_split_rows_on_one_rank():
    batch = {"qry_token_span": torch.as_tensor(right_padded([3, 5, 2, 8])[:, 0]),
             "pos_token_span": torch.as_tensor(right_padded([1, 1, 1, 1])[:, 0]),
             "target_id": torch.arange(4)}
    assert [s.shape[1] for s in row_spans(batch)] == [1, 1]
    assert chunk_sizes(batch, 2, 0, 1) == [2, 2]
    assert chunk_sizes(batch, 4, 12, 1) == [2, 1, 1]  # 2 × (5 + 1) = 12; 2 × (8 + 1) > 12
    pieces = split_rows(batch, [2, 1, 1])
    assert [p["target_id"].tolist() for p in pieces] == [[0, 1], [2], [3]]
    with pytest.raises(ValueError, match="does not split"):
        chunk_sizes(batch, 3, 0, 1)
    with pytest.raises(ValueError, match="does not split"):
        split_rows(batch, [2, 1])


def test_a_token_budget_hands_deepspeed_the_accumulation_boundary():
    fixed = build_deepspeed_config(load_config(None, ["train.micro_batch_size=8"]), 1)
    budget = build_deepspeed_config(load_config(None, ["train.chunk_tokens=4096"]), 1)
    assert fixed["managed_gradient_accumulation"] and not budget["managed_gradient_accumulation"]
    with pytest.raises(ConfigError, match="train.chunk_tokens"):
        load_config(None, ["train.chunk_tokens=-1"])
