"""Tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL end to end on images of mixed sizes and aspects: 2 Ray
Train workers, GradCache chunks, ZeRO-2 or ZeRO-3, validation during training and the final MMEB
evaluation of the export, which must score as the export evaluated in this process does."""

from __future__ import annotations

import pytest

from sde_ray.config import load_config

from .conftest import SMALL

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory):
    """The small synthetic MMEB with images of five shapes (square, wide, tall, larger, 3:2)."""
    from sde_ray.data.cache import prepare_data

    cache = tmp_path_factory.mktemp("mixed_cache")
    prepare_data(load_config(None, SMALL + [f"data.cache_dir={cache}", "data.synth.mixed_sizes=true"]))
    return cache


@pytest.mark.parametrize("name,stage,chunk_tokens", [("tiny-qwen2-vl", 3, 0), ("tiny-qwen2.5-vl", 2, 0),
                                                     ("tiny-qwen3-vl", 3, 400)])
def test_vlm_family_trains_validates_and_evaluates_at_mixed_resolutions(name, stage, chunk_tokens, ray_cluster,
                                                                         mixed_cache, tmp_path, capsys):
    """Qwen3-VL's chunks are bounded by a token budget as well (`train.chunk_tokens`): more chunks than
    the row cap's 2, their count agreed between the ranks each step, under ZeRO-3."""
    from sde_ray.data.batches import raw_batch_from_rows
    from sde_ray.data.shards import iter_samples
    from sde_ray.eval.evaluation import evaluate_model
    from sde_ray.models import BatchProcessor, load_pretrained
    from sde_ray.train.driver import run_train

    config = load_config(None, SMALL + [
        f"data.cache_dir={mixed_cache}", "data.synth.mixed_sizes=true", f"train.output_dir={tmp_path / 'run'}",
        "model.kind=vlm", f"model.name_or_path={name}", "model.min_pixels=256", "model.max_pixels=2304",
        "train.micro_batch_size=8",  # 16 rows per worker in 2 GradCache chunks
        f"train.chunk_tokens={chunk_tokens}",
        f"deepspeed.zero_stage={stage}", "train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
        "eval.num_workers=1"])
    result = run_train(config)

    # The driver said what the tower sees: 16×16-pixel cells, at most 48² pixels -> 1..9 tokens.
    assert "visual tokens per image: 1..9" in capsys.readouterr().out
    train = result["train"]
    assert train["step"] == 2 and 0.0 <= train["val_p_at_1"] <= 1.0 and train["loss"] == train["loss"]
    assert train["chunks"] == 2 if not chunk_tokens else train["chunks"] > 2

    # The training images really are of mixed sizes: their grids differ (the processor's own).
    model, model_config = load_pretrained(result["model_dir"])
    processor = BatchProcessor(model_config)
    shard = sorted(mixed_cache.rglob("*.tar"))[0]
    raw = raw_batch_from_rows(next(iter_samples(str(shard), list(range(32)), 32)))
    images = [image for image in raw["qry_image"] + raw["pos_image"] if image]
    grids = processor.encode_inputs(["<|image_1|>"] * len(images), images, "qry")["qry_image_grid_thw"]
    assert len({tuple(grid) for grid in grids.tolist()}) >= 3

    # The final evaluation (Ray actors) scores the export as this process does.
    local = evaluate_model(model, processor, result["eval"]["data_dir"], datasets=list(config.eval.datasets))
    assert {n: r["p_at_1"] for n, r in result["eval"]["datasets"].items()} == {
        n: r["p_at_1"] for n, r in local["datasets"].items()}
