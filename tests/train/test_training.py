"""2 Ray Train workers × DeepSpeed ZeRO-2 / ZeRO-3 on the synthetic MMEB: the loss falls, every
step is reported by both ranks, checkpoints hold every rank's shards, and the export reloads; a
warning raised from our own modules (on the driver or in a worker) fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]


OUR_WARNINGS_AS_ERRORS = r"sde_ray(\.|$)"  # warnings attributed to a module of the package


def loop_with_our_warnings_as_errors(loop_config: dict) -> None:
    """The training loop with every warning attributed to an sde_ray module raised as an error (a
    deprecated torch API called from our collectives, say), so the run fails on the first one."""
    import warnings

    from sde_ray.train.loop import train_loop_per_worker

    warnings.filterwarnings("error", module=OUR_WARNINGS_AS_ERRORS)
    train_loop_per_worker(loop_config)


@pytest.mark.filterwarnings(f"error::Warning:{OUR_WARNINGS_AS_ERRORS}")
@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_learn_under_zero(stage, ray_cluster, small_config, read_metrics):
    from ray.train.torch import TorchTrainer

    from sde_ray.models import load_pretrained
    from sde_ray.train.driver import build_trainer

    overrides = [f"deepspeed.zero_stage={stage}", "train.max_steps=12", "train.eval_every=6"]
    if stage == 3:  # partition every parameter, not only the large ones
        overrides.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    config = small_config(*overrides)
    trainer = build_trainer(config)
    result = TorchTrainer(loop_with_our_warnings_as_errors, train_loop_config=trainer.train_loop_config,
                          scaling_config=trainer.scaling_config, run_config=trainer.run_config).fit()

    rows = read_metrics(config.train.output_dir)
    by_step = {r["step"]: r for r in rows}
    assert list(by_step) == [2, 4, 5, 6, 8, 10, 12]  # every log_every=2 steps and at checkpoints
    assert all(r["world_size"] == 2 for r in rows)
    losses = [r["loss"] for r in rows]
    assert torch.isfinite(torch.tensor(losses)).all()
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    assert 0.0 <= by_step[6]["val_p_at_1"] <= 1.0 and 0.0 <= by_step[12]["val_p_at_1"] <= 1.0
    for key in ("alpha", "lambda", "energy_strong_q", "energy_noise_t", "effective_rank_q", "gap_centroid", "lr"):
        assert key in rows[-1], key

    assert result.metrics["step"] == 12 and result.metrics["samples"] == 12 * 32
    assert "eval" not in result.metrics  # the workers export; the driver evaluates after fit()
    checkpoint = Path(result.checkpoint.path)
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["step"] == 12 and state["world_size"] == 2 and state["zero_stage"] == stage
    shards = sorted(p.name for p in (checkpoint / "deepspeed" / "state").iterdir())
    assert any("zero_pp_rank_0" in name for name in shards) and any("zero_pp_rank_1" in name for name in shards)
    assert (checkpoint / "rng" / "rank_0.pt").exists() and (checkpoint / "rng" / "rank_1.pt").exists()

    # The export and the consolidated copy hold the same trained weights.
    model, _ = load_pretrained(Path(config.train.output_dir) / "model")
    consolidated = torch.load(checkpoint / "consolidated.pt", weights_only=True)
    exported = model.state_dict()
    trained = {k.removeprefix("model."): v for k, v in consolidated.items() if k.startswith("model.")}
    # The checkpoint holds the trainable weights; the rest (CLIP's unused logit_scale) is the base's.
    from sde_ray.train.engine import build_train_module

    frozen = {n.removeprefix("model.") for n, p in build_train_module(config).named_parameters() if not p.requires_grad}
    assert frozen and exported.keys() - trained.keys() == frozen and trained.keys() <= exported.keys()
    for key, value in trained.items():
        torch.testing.assert_close(exported[key], value.reshape(exported[key].shape), msg=key)
    assert (Path(config.train.output_dir) / "plots" / "spectrum.png").stat().st_size > 0


def test_bf16_zero3_validation_on_every_rank(ray_cluster, small_config, read_metrics):
    """bf16 under ZeRO-3: each rank validates its share with the partitioned model, through the engine;
    the reported P@1 agrees with the exported weights validated in one process under bf16 autocast
    (bf16 layer norms vs autocast's fp32 ones may flip a near-tie: one query of slack)."""
    from sde_ray.eval.validation import _validation_slice, validation_p_at_1
    from sde_ray.models import BatchProcessor, load_pretrained
    from sde_ray.train.driver import build_trainer

    config = small_config("deepspeed.zero_stage=3", "deepspeed.precision=bf16", "train.max_steps=4",
                          "train.eval_every=2", "train.checkpoint_every=4")
    build_trainer(config).fit()
    rows = {r["step"]: r for r in read_metrics(config.train.output_dir)}
    assert "val_p_at_1" in rows[2] and "val_p_at_1" in rows[4]
    model, model_config = load_pretrained(Path(config.train.output_dir) / "model")
    # Validation runs on the synthetic set's validation split (no query of the evaluation split).
    val_roots = Path(config.data.cache_dir).rglob("MMEB-val")
    root = next(p for p in val_roots if p.is_dir())
    single = validation_p_at_1(model, BatchProcessor(model_config), root,
                               max_queries=config.eval.val_queries, batch_size=config.eval.batch_size,
                               precision="bf16")
    prepared = _validation_slice(str(root.resolve()), None, config.eval.val_queries)
    one_query = 1 / (len(prepared) * max(p.table.num_rows for p in prepared))  # in the mean over datasets
    assert abs(rows[4]["val_p_at_1"] - single) <= one_query + 1e-9
