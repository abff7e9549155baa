"""ZeRO-3 with a VLM on 2 gloo ranks whose chunks differ in what they hold: rank 0's targets are
text only, rank 1's carry images (MMEB-train is mostly text targets, so nearly every real step
mixes them). ZeRO-3 records the order in which modules run and fetches their parameters with
collectives in that order, asserting it is the same on every rank; a side without images once ran
the language model before the vision tower (its keepalive came after), a side with images the
other way round, and the step hung or failed. It must complete, under a deadline, and equal one
plain process on the concatenated rows (tests/train/test_gradcache.py's reference, exact Adam)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROWS = 8  # per rank (test_gradcache's local batch), in 2 chunks of 4
DEADLINE_S = 1200  # a backstop: each rank's gloo collectives time out after 300 s (zero3_workers)


@pytest.fixture(scope="module")
def gradcache_helpers():
    for folder in (HERE, HERE.parent / "spectral"):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    import test_gradcache

    return test_gradcache


def _mixed_batch(helpers, data_cache) -> dict:
    """16 rows: rank 0's 8 with text-only targets, rank 1's 8 with image targets."""
    batch = helpers.local_batches(data_cache, "vlm", 1, 64)[0]
    text = torch.nonzero(~batch["pos_has_image"]).flatten()[:ROWS]
    image = torch.nonzero(batch["pos_has_image"]).flatten()[:ROWS]
    assert len(text) == len(image) == ROWS
    order = torch.cat([text, image])
    return {key: value[order] for key, value in batch.items()}


@pytest.mark.slow
def test_zero3_vlm_step_with_image_and_text_target_chunks_on_two_ranks(gradcache_helpers, data_cache, tmp_path):
    import gloo_workers
    import zero3_workers

    from sde_ray.config import to_dict

    helpers = gradcache_helpers
    batch = _mixed_batch(helpers, data_cache)
    config = helpers.case_config(data_cache, "vlm", "sde", ROWS // 2, "deepspeed.zero_stage=3", workers=2)
    ranks = gloo_workers.launch(zero3_workers.gradcache_step, tmp_path, to_dict(config), batch,
                                timeout_s=DEADLINE_S)
    assert all(r["finite"] and r["global_steps"] == 1 for r in ranks)
    _, want = helpers.reference(helpers.case_config(data_cache, "vlm", "sde", 0, workers=2), batch, 2 * ROWS,
                                0.0, rng_seed=5)
    helpers.assert_deltas(ranks[0]["before"], ranks[0]["weights"], want)


@pytest.mark.slow
def test_zero_init_loads_a_checkpoint_partitioned_and_steps_like_one_process(gradcache_helpers, data_cache,
                                                                            tmp_path):
    """`deepspeed.zero_init` (full fine-tuning of a model too large for one rank): the backbone, a
    tiny Qwen2-VL saved as a Hub-style folder, loads through from_pretrained straight into its ZeRO-3
    partitions — no rank holds more than its share of the weights before the engine exists, yet
    the initial weights are the plain load's and the step equals one plain process."""
    import gloo_workers
    import zero3_workers

    from sde_ray.config import ModelConfig, to_dict
    from sde_ray.models.tiny import save_tiny_checkpoint

    helpers = gradcache_helpers
    folder = tmp_path / "tiny-qwen2-vl-checkpoint"
    torch.manual_seed(0)
    save_tiny_checkpoint("tiny-qwen2-vl", ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl"), folder)
    batch = _mixed_batch(helpers, data_cache)
    checkpoint = f"model.name_or_path={folder}"
    config = helpers.case_config(data_cache, "vlm", "sde", ROWS // 2, "deepspeed.zero_stage=3",
                                 "deepspeed.zero_init=true", checkpoint, workers=2)
    ranks = gloo_workers.launch(zero3_workers.gradcache_step, tmp_path, to_dict(config), batch,
                                timeout_s=DEADLINE_S)
    total = ranks[0]["total"]
    assert all(r["total"] == total for r in ranks)
    # Each rank's partition: about half the model (ZeRO-3 rounds each parameter's split up; the
    # objective's temperature is built outside and partitioned by the engine). A plain build holds all.
    assert all(r["held"] < 0.6 * total for r in ranks), ([r["held"] for r in ranks], total)
    assert all(r["finite"] and r["global_steps"] == 1 for r in ranks)
    plain = helpers.case_config(data_cache, "vlm", "sde", 0, checkpoint, workers=2)
    initial = helpers.trainable(helpers.build_module(plain, 0.0))
    for name, value in initial.items():  # the partitioned load holds the plain load's weights
        torch.testing.assert_close(ranks[0]["before"][name].reshape(value.shape), value, atol=0, rtol=0)
    _, want = helpers.reference(plain, batch, 2 * ROWS, 0.0, rng_seed=5)
    helpers.assert_deltas(ranks[0]["before"], ranks[0]["weights"], want)


@pytest.mark.slow
def test_zero3_validation_runs_on_the_partitioned_model_and_equals_one_process(gradcache_helpers, data_cache,
                                                                                synthetic_mmeb, tmp_path):
    """Validation during a ZeRO-3 run encodes with the engine's partitioned module (no rank builds a
    whole copy of the model), its forwards gathering each layer's weights as training's do. Every
    forward is then a collective, so every rank must run as many: with batches of 1 and 15 queries
    over the datasets, one rank's share is longer than the other's (or empty) — the shorter shares
    are padded. P@1 equals one process validating the same weights, unpartitioned."""
    import gloo_workers
    import zero3_workers

    from sde_ray.config import to_dict
    from sde_ray.eval.validation import validation_p_at_1
    from sde_ray.models import BatchProcessor

    helpers = gradcache_helpers
    config = helpers.case_config(data_cache, "dual_encoder", "sde", 0, "deepspeed.zero_stage=3",
                                 "eval.val_queries=15", "eval.batch_size=1", workers=2)
    # Every weight partitioned: none small enough for DeepSpeed to keep whole once gathered.
    config.deepspeed.overrides["zero_optimization"] = {"stage3_param_persistence_threshold": 0}
    root = synthetic_mmeb["eval_dir"]
    ranks = gloo_workers.launch(zero3_workers.zero3_validation, tmp_path, to_dict(config), str(root),
                                timeout_s=DEADLINE_S)
    assert all(r["partitioned"] for r in ranks)
    total = ranks[0]["total"]
    assert all(r["held"] < 0.6 * total and r["materialised"] < 0.1 * total for r in ranks), ranks
    model = helpers.build_module(config, 0.0).model.eval()  # the seed's weights, whole, in this process
    single = validation_p_at_1(model, BatchProcessor(config.model), root, max_queries=15, batch_size=1)
    assert [r["p_at_1"] for r in ranks] == [single, single]
