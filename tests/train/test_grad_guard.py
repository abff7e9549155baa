"""A non-finite gradient under a finite loss skips the optimizer step whole (`train.grad_guard`),
on real DeepSpeed engines (gloo, one process) at ZeRO 0, 2 and 3.

The NaN is born in the backward of a replayed GradCache chunk only (an identity whose backward
returns NaN, applied to that chunk's features in its graph-recording replay), so the objective's
loss, computed from the cached features, stays finite and the loss check cannot see it. Reference:
a second engine that trains the same first and last batch without the poisoned one in between;
after the skip and one more step, the weights, the optimizer's fp32 master copy and its state (both
Adam moments, its step count) equal the reference's exactly, and right after the skip they equal
those before it."""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import load_config

ROWS = 8


class NaNGradient(torch.autograd.Function):
    """The identity forward; NaN gradients backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison_the_replay(engine):
    """A forward hook that poisons the second graph-recording model call of a step: with 2 chunks,
    the replay of chunk 1 (chunk 0 is encoded live inside the objective's forward)."""
    calls = [0]

    def hook(_module, _inputs, output):
        if not torch.is_grad_enabled():
            return output
        calls[0] += 1
        return (NaNGradient.apply(output[0]), output[1]) if calls[0] == 2 else output

    return engine.module.model.register_forward_hook(hook)


def _state(engine) -> dict[str, torch.Tensor]:
    """The full weights, the fp32 master weights and both Adam moments (and under ZeRO 0-2, where
    the torch optimizer holds whole tensors at world size 1, its step count too)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sde_ray.train.checkpoint import consolidated_state_dict
    from sde_ray.train.grad_guard import inner_optimizer

    out = {f"weight/{name}": value.clone() for name, value in consolidated_state_dict(engine).items()}
    if engine.zero_optimization_stage() == 3:  # the partitions' state, gathered per parameter
        for name, parameter in engine.module.named_parameters():
            if parameter.requires_grad:
                out[f"master/{name}"] = safe_get_full_fp32_param(parameter).clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    out[f"{key}/{name}"] = safe_get_full_optimizer_state(parameter, key).clone()
    else:  # DeepSpeed 0.19.8 links ZeRO-1/2 state lazily and misses the second group: read it directly
        optimizer = inner_optimizer(engine)
        for g, group in enumerate(optimizer.param_groups):
            for i, master in enumerate(group["params"]):
                out[f"master/{g}/{i}"] = master.detach().clone()
                for key, value in optimizer.state[master].items():
                    out[f"{key}/{g}/{i}"] = (value.clone() if isinstance(value, torch.Tensor)
                                             else torch.tensor(value, device="cpu"))
    assert any(key.startswith("exp_avg_sq/") for key in out)  # the moments are compared
    return out


@pytest.mark.parametrize("stage", [0, 2, pytest.param(3, marks=pytest.mark.slow)])  # ZeRO-3: ~3 min under load
def test_a_nan_gradient_in_a_replayed_chunk_skips_the_step_whole(process_group, data_cache, stage):
    from sde_ray.bench.train import fixed_batch
    from sde_ray.losses import StepContext
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.grad_guard import GradientGuard
    from sde_ray.train.loop import build_engine, build_train_module, seed_everything
    from sde_ray.train.step import train_step

    config = load_config(None, [
        "data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64",
        f"data.cache_dir={data_cache}", "logging.wandb=false", "loss.name=infonce", "loss.learnable_temperature=true",
        f"train.global_batch_size={ROWS}", f"train.micro_batch_size={ROWS // 2}", f"deepspeed.zero_stage={stage}",
        "train.warmup_steps=0", "train.lr_schedule=cosine", "train.max_steps=10", "train.lr=1e-3"])
    rows = fixed_batch(config, 3 * ROWS)
    batches = [{k: v[i * ROWS:(i + 1) * ROWS] for k, v in rows.items()} for i in range(3)]

    def engine():
        seed_everything(0)
        return build_engine(build_train_module(config), build_deepspeed_config(config, 1))

    def step(engine, batch):
        context = StepContext(progress=0.3, target_ids=batch["target_id"], generator=torch.Generator().manual_seed(1))
        return train_step(engine, batch, context, ROWS // 2, 1)

    poisoned, clean = engine(), engine()
    assert step(poisoned, batches[0]).finite and step(clean, batches[0]).finite
    before, lr = _state(poisoned), poisoned.get_lr()[0]
    handle = _poison_the_replay(poisoned)
    result = step(poisoned, batches[1])
    handle.remove()
    assert not result.finite and result.skipped == "gradient" and torch.isfinite(torch.tensor(result.loss))
    assert GradientGuard.of(poisoned).skipped == 1 and poisoned.global_steps == 1 and poisoned.get_lr()[0] == lr
    after = _state(poisoned)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    # The next step continues as if the poisoned batch had never come (no gradient left behind).
    assert step(poisoned, batches[2]).finite and step(clean, batches[2]).finite
    want, got = _state(clean), _state(poisoned)
    assert any(not torch.equal(want[name], before[name]) for name in want)  # it did train
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)


def test_the_non_finite_guard_counts_gradient_skips_and_resets_on_a_finite_step():
    """The policy alone on step results: two skips, a finite step, two more: never more than 2 in
    a row, so `skip` with max 2 continues; a third in a row raises, naming the count."""
    from sde_ray.train.checkpoint import TrainState
    from sde_ray.train.grad_guard import NonFiniteGuard
    from sde_ray.train.step import StepResult

    guard, state = NonFiniteGuard("skip", 2), TrainState(step=4)
    loss, gradient = StepResult(False, float("nan"), skipped="loss"), StepResult(False, 1.0, skipped="gradient")
    assert guard.check(loss, state) == "[sde_ray] non-finite loss at step 5 on at least one rank: skipped (1/2)"
    assert "gradient at step 5" in guard.check(gradient, state)
    assert guard.check(StepResult(True, 1.0), state) is None
    guard.check(gradient, state), guard.check(gradient, state)
    with pytest.raises(FloatingPointError, match="3 consecutive"):
        guard.check(loss, state)
    assert (state.nan_skips, state.grad_skips) == (5, 3)
