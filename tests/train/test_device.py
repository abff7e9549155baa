"""One GradCache step of the training loop on a real DeepSpeed engine (gloo, one process) while
torch's default device is `meta` (tests/conftest.py `meta_default_device`): the loop's batch →
model inputs → `train_step` (chunked encode, SDE with its spectral stage, replay, optimizer step)
→ the logged spectral diagnostics. A tensor made without an explicit device lands on `meta` and
fails, as a CPU-made tensor fails beside the engine's CUDA tensors on a GPU (the model's pixel and
token inputs and the partition's quantiles did). Reference: the same step on a fresh engine
outside the mode (same loss, same weights after the step)."""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import load_config

ROWS = 8


def _step_in(engine, config, batch, state, chunk):
    from sde_ray.train.checkpoint import consolidated_state_dict
    from sde_ray.train.loop import step_context, to_model_inputs
    from sde_ray.train.meter import StepMeter
    from sde_ray.train.step import train_step

    inputs = to_model_inputs(batch, engine.device, torch.float32)
    result = train_step(engine, inputs, step_context(config, state, 0, 1, inputs), chunk, 1)
    assert result.finite
    meter = StepMeter(config.spectral, config.train.global_batch_size, 0, 1)
    meter.step(result)
    logged = {k: v for k, v in meter.window_metrics().items() if k not in ("samples_per_s", "steps_per_s")}
    return result.loss, logged, consolidated_state_dict(engine)


@pytest.mark.parametrize("stage", [2, 3])
def test_a_gradcache_step_runs_with_meta_as_the_default_device(meta_default_device, process_group,
                                                                data_cache, stage):
    from sde_ray.bench.train import fixed_batch
    from sde_ray.train.checkpoint import TrainState
    from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size
    from sde_ray.train.loop import build_engine, build_train_module, seed_everything

    config = load_config(None, [
        "data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64",
        f"data.cache_dir={data_cache}", "logging.wandb=false", "loss.name=sde", "loss.learnable_temperature=true",
        f"train.global_batch_size={ROWS}", f"train.micro_batch_size={ROWS // 2}", f"deepspeed.zero_stage={stage}",
        "spectral.noise_estimator=iqr"])
    batch = fixed_batch(config, ROWS)  # CPU tensors, as the stream yields them
    engines = []
    for _ in range(2):
        seed_everything(0)
        engines.append(build_engine(build_train_module(config), build_deepspeed_config(config, 1)))
    want = _step_in(engines[0], config, batch, TrainState(), chunk_size(config, 1))
    with meta_default_device():
        got = _step_in(engines[1], config, batch, TrainState(), chunk_size(config, 1))
    assert got[0] == want[0] and got[1] == want[1]
    assert set(got[2]) == set(want[2])
    for name, value in want[2].items():
        torch.testing.assert_close(got[2][name], value, rtol=0, atol=0, msg=name)
