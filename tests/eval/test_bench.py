"""`sde-ray bench eval --quick`: both modes measured in one run, fewer items encoded, same P@1."""

from __future__ import annotations

import json

import pytest

from sde_ray.bench.eval import main
from sde_ray.config import load_config


@pytest.mark.slow
def test_quick_benchmark_reports_both_modes(tmp_path):
    config = load_config(None, ["eval.datasets=[SynObject,SynCaption_t2i]", "eval.batch_size=32"])
    result = main(json_path=str(tmp_path / "bench.json"), config=config, quick=True)
    assert json.loads((tmp_path / "bench.json").read_text()) == result
    assert result["queries"] == 16 and result["datasets"] == 2
    assert result["dedup"]["encoded_items"] < result["naive"]["encoded_items"]
    assert result["identical_p_at_1"] is True
    assert result["speedup_dedup_over_naive"] == pytest.approx(
        result["dedup"]["queries_per_s"] / result["naive"]["queries_per_s"]
    )
