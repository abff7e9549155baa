"""`sde-ray bench train --quick` runs every variant side by side and reports consistent numbers
(speed itself is not asserted: it is measured, see docs/training.md)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_quick_train_bench_reports_all_variants_and_ratios(ray_cluster, small_config, tmp_path):
    from sde_ray.bench.train import main

    path = tmp_path / "bench.json"
    results = main(json_path=str(path), config=small_config(), quick=True)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    for name in ("plain", "plain_infonce", "ray_1", "ray_2"):
        row = results[name]
        assert row["step_ms"] > 0
        assert row["samples_per_s"] == pytest.approx(results["global_batch_size"] * row["steps_per_s"])
    ratios = results["ratios"]
    assert ratios["ray_1_over_plain_step_time"] == pytest.approx(results["ray_1"]["step_ms"] / results["plain"]["step_ms"])
    assert ratios["sde_over_infonce_step_time"] == pytest.approx(
        results["plain"]["step_ms"] / results["plain_infonce"]["step_ms"])
    assert set(results["targets"]) == {"framework_overhead", "sde_overhead", "gradcache_whole_over_today",
                                       "gradcache_chunked_over_whole", "gradcache_whole_over_today_cpu",
                                       "gradcache_chunked_over_whole_cpu"}
    assert [row["global_batch_size"] for row in results["gradcache"]] == [64]
    for row in results["gradcache"]:
        assert row["chunked_over_whole"] == pytest.approx(row["chunked_step_ms"] / row["whole_step_ms"])
        assert row["whole_over_today"] == pytest.approx(row["whole_step_ms"] / row["today_step_ms"])
        assert row["chunked_over_whole_cpu"] == pytest.approx(row["chunked_cpu_ms"] / row["whole_cpu_ms"])
        assert row["whole_peak_mib"] >= 0 and row["chunked_peak_mib"] >= 0  # measured RSS high-water marks
        assert row["chunked_over_whole_plus_forward_cpu"] == pytest.approx(
            row["chunked_cpu_ms"] / (row["whole_cpu_ms"] + row["forward_cpu_ms"]))
        # A forward without a graph is a fraction of a forward + backward + optimizer step.
        assert 0 < row["forward_cpu_ms"] < row["whole_cpu_ms"]
    # Activation memory: at 64 rows the whole-batch step holds 4x the activations of a 16-row chunk.
    assert results["gradcache"][0]["chunked_peak_mib"] < results["gradcache"][0]["whole_peak_mib"]


def test_checkpoint_bench_classifies_steps_by_their_distance_to_a_checkpoint(tmp_path):
    """`sde-ray bench upload`'s arithmetic on hand-made stamps: every 4th step saves, the step
    after it runs during the upload; steps up to the warm-up are left out."""
    import json

    from sde_ray.bench.upload import step_times, summarize

    clock, stamps = 0.0, []
    durations = {1: 9.0, 2: 1.0, 3: 1.0, 4: 5.0, 5: 2.0, 6: 1.0, 7: 1.2, 8: 4.0, 9: 3.0}
    for step in range(0, 10):
        clock += durations.get(step, 0.0)
        stamps.append(json.dumps([step, clock]))
    path = tmp_path / "stamps.jsonl"
    path.write_text("\n".join(stamps) + "\n")
    times = step_times(path)
    assert times == pytest.approx({s: durations[s] for s in range(1, 10)})
    summary = summarize(times, every=4, warmup=2)  # steps 3..9: plain 3, 6, 7; at 4, 8; after 5, 9
    assert summary["plain_s"] == pytest.approx(1.0) and summary["checkpoint_step_s"] == pytest.approx(4.5)
    assert summary["after_checkpoint_s"] == pytest.approx(2.5)
    assert summary["checkpoint_step_over_plain"] == pytest.approx(4.5)
    assert summary["steps"] == {"plain": 3, "checkpoint": 2, "after": 2}
