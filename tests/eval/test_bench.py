"""`sde-ray bench eval --quick`: both modes measured in one run, fewer items encoded, same P@1, on
the synthetic sets and on MMEB-shaped ones (a shared label set; candidates drawn from a pool); and
the eval actors fed before and after (`feed`): same P@1, both rates and input waits reported."""

from __future__ import annotations

import json

import pytest

from sde_ray.bench.eval import FEED_QUICK_SHAPE, QUICK_SHAPE, main
from sde_ray.config import load_config


@pytest.mark.slow
@pytest.mark.ray
def test_quick_benchmark_reports_both_modes(ray_cluster, tmp_path):
    config = load_config(None, ["eval.datasets=[SynObject,SynCaption_t2i]", "eval.batch_size=32"])
    result = main(json_path=str(tmp_path / "bench.json"), config=config, quick=True)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["queries"] == 16 and result["datasets"] == 2
    assert result["dedup"]["encoded_items"] < result["naive"]["encoded_items"]
    assert result["identical_p_at_1"] is True
    assert result["speedup_dedup_over_naive"] == pytest.approx(
        result["dedup"]["queries_per_s"] / result["naive"]["queries_per_s"]
    )
    shaped, shape = result["mmeb_shaped"], QUICK_SHAPE
    assert shaped["identical_p_at_1"] is True
    # Naive: every row encodes its query and all its candidates. Dedup: each set's distinct items —
    # the queries, the one label set, and at most the whole image pool.
    assert shaped["naive"]["encoded_items"] == 2 * shape["naive_rows"] * (1 + shape["candidates"])
    assert shaped["dedup"]["queries"] == 2 * shape["queries"]
    assert shaped["dedup"]["encoded_items"] <= 2 * shape["queries"] + shape["labels"] + shape["pool"]
    assert shaped["speedup_dedup_over_naive"] > 1.0
    fed = result["feed"]
    assert fed["identical_p_at_1"] is True  # fp32: the fed actors score as the old ones
    for mode in ("before", "after"):
        assert fed[mode]["queries"] == 2 * FEED_QUICK_SHAPE["queries"] and set(fed[mode]["p_at_1"]) == set(fed["sets"])
        assert 0.0 <= fed[mode]["encoder_input_wait"] < 1.0
        assert 0 < fed[mode]["seconds_since_actors_ready"] < fed[mode]["seconds"]
    assert fed["after_over_before_queries_per_s"] == pytest.approx(
        fed["after"]["queries_per_s"] / fed["before"]["queries_per_s"])
