"""No host sync in the encoders' forward, nor in a training step's objective and metrics: on a GPU
each `.item()`, `int()`, `float()`, `torch.equal` or `nonzero` on a device tensor makes Python wait
for every queued kernel, and with 8-row micro-batches the GPU then waits on Python.

Recorded with tests/conftest.py `host_syncs` (every op that would read device memory into the host,
with the caller that ran it) on the real tiny models and the BatchProcessor's batches, as the
training loop feeds them (`sde_ray.models.to_model_inputs`: the per-row facts stay on the host).
What transformers itself reads (its mask and M-RoPE code) is counted, not asserted: not ours to change.
Reference for the values: the same forward with the per-row facts taken from the device tensors
(the path of a batch built by hand), and the transformers model itself (tests/models/test_models.py).
"""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import ModelConfig, load_config
from sde_ray.models import BatchProcessor, build_model, to_model_inputs

MODELS = {"tiny-clip": ModelConfig(kind="dual_encoder", name_or_path="tiny-clip"),
          "tiny-qwen2-vl": ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl")}


def ours(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(op, where) for op, where in found if "/sde_ray/" in where]


def model_inputs(config: ModelConfig, raw: dict) -> dict:
    return to_model_inputs(BatchProcessor(config)(raw), torch.device("cpu"), torch.float32)


def on_device(module: torch.nn.Module, batch: dict) -> list[torch.Tensor]:
    """What a GPU run holds on the GPU: the parameters and buffers, and the batch but its host facts."""
    from sde_ray.models import is_host_fact

    return [*module.parameters(), *module.buffers(), *(v for k, v in batch.items() if not is_host_fact(k))]


@pytest.mark.parametrize("name", list(MODELS))
def test_the_encoder_forward_reads_nothing_back_from_the_device(name, raw, host_syncs):
    model = build_model(MODELS[name], seed=0).eval()
    batch = model_inputs(MODELS[name], raw)
    with torch.no_grad():
        first = model(batch)  # the first forward runs the batch checks once (they need reads)
        with host_syncs(on_device(model, batch)) as found:
            query, target = model(batch)
    assert ours(found) == [], f"host syncs in sde_ray: {ours(found)} (transformers' own: {len(found)})"
    # Same values as the first forward and as a batch without the host-side facts (built by hand,
    # every value a device tensor: its facts are read from the device, one sync each).
    for got, want in zip((query, target), first):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    by_hand = {k: v for k, v in batch.items() if not k.endswith("_length")}
    with torch.no_grad():
        for got, want in zip(model(by_hand), (query, target)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_training_step_objective_and_its_metrics_read_nothing_back(raw, host_syncs):
    """The engine's forward (encoder + InfoNCE objective) and the meter's per-step accounting; the
    window's metrics come back to the host in one transfer at the log step, equal to the floats
    the objective's tensors hold."""
    from sde_ray.losses import StepContext
    from sde_ray.train.engine import build_train_module
    from sde_ray.train.meter import StepMeter
    from sde_ray.train.step import StepResult

    config = load_config(None, ["model.name_or_path=tiny-clip", "loss.name=infonce", "train.global_batch_size=6",
                                "logging.wandb=false"])
    module = build_train_module(config)
    batch = model_inputs(config.model, raw)
    meter = StepMeter(config.spectral, 6, 0, 1)
    module(batch, StepContext())  # the batch checks, once
    losses = []
    for _ in range(2):
        with host_syncs(on_device(module, batch)) as found:
            loss, metrics, query, target = module(batch, StepContext())
            meter.step(StepResult(True, loss.detach(), metrics, query, target))
        assert ours(found) == [], f"host syncs in sde_ray: {ours(found)}"
        losses.append(float(loss.detach()))
    logged = meter.window_metrics()
    assert logged["loss"] == sum(losses) / 2 and logged["loss_instance"] == logged["loss"]
