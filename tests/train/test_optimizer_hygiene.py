"""Optimizer hygiene on a real DeepSpeed engine (gloo, one process): open_clip's parameter groups
(no weight decay on biases, norms, gains and the temperature) and the temperature clamped in place
after the step, in the optimizer's master copy too. References: AdamW's closed form (a zero
gradient leaves only the decay, p ← p·(1 − lr·wd)) and the clamp's bound ln 100."""

from __future__ import annotations

import math

import pytest
import torch

from sde_ray.config import ConfigError, load_config

LR, WD = 0.1, 0.5


def _engine(stage: int, *overrides: str):
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.loop import build_engine, build_train_module, seed_everything

    config = load_config(None, ["loss.name=infonce", "loss.learnable_temperature=true", f"train.lr={LR}",
                                f"train.weight_decay={WD}", "train.warmup_steps=0", "train.lr_schedule=constant",
                                "train.grad_clip=0", "train.global_batch_size=4", f"deepspeed.zero_stage={stage}",
                                *overrides])
    seed_everything(0)
    return build_engine(build_train_module(config), build_deepspeed_config(config, 1))


def _zero_gradient_step(engine) -> None:
    loss = sum((p * 0.0).sum() for p in engine.module.parameters() if p.requires_grad)
    engine.backward(loss)
    engine.step()


@pytest.mark.parametrize("stage", [0, 2])
def test_only_matrices_decay_and_the_temperature_is_clamped_in_place(stage, process_group):
    from sde_ray.train.loop import clamp_temperatures

    engine = _engine(stage)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    factor = 1.0
    for _ in range(4):  # DeepSpeed clamps the warm-up to >= 2 steps, starting at lr 0
        factor *= 1 - engine.optimizer.param_groups[0]["lr"] * WD
        _zero_gradient_step(engine)
    assert factor < 1.0
    for name, parameter in engine.module.named_parameters():
        decayed = before[name] * factor
        if before[name].dim() >= 2:
            torch.testing.assert_close(parameter.detach(), decayed, msg=name)
        else:  # biases, norm gains, the log-temperature (shape (1,)): untouched by the decay
            torch.testing.assert_close(parameter.detach(), before[name], msg=name)

    log_scale = engine.module.objective.scale.log_scale
    bound = math.log(100.0)
    with torch.no_grad():
        log_scale.data.fill_(bound + 0.5)
    if stage > 0:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(log_scale, torch.full_like(log_scale, bound + 0.5))
    clamp_temperatures(engine)
    assert float(log_scale.detach()) == pytest.approx(bound)
    _zero_gradient_step(engine)  # the next step starts from the clamped master copy
    assert float(log_scale.detach()) == pytest.approx(bound)


@pytest.mark.parametrize("stage", [0, 2])
def test_the_engine_steps_like_torch_adamw_with_the_configured_betas_and_eps(stage, process_group):
    """train.adam_beta1/beta2/eps reach the engine: its weights after 4 steps of fixed gradients are
    torch.optim.AdamW's with the same lr, betas and eps (on copies of the weights; no decay), and not
    those of AdamW with the default betas and eps."""
    engine = _engine(stage, "train.weight_decay=0", "train.adam_beta1=0.8", "train.adam_beta2=0.9",
                     "train.adam_eps=0.05")
    start = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    names = list(start)
    copies = {hp: {n: w.clone().requires_grad_(True) for n, w in start.items()}
              for hp in ((0.8, 0.9, 0.05), (0.9, 0.98, 1e-6))}
    optimizers = {hp: torch.optim.AdamW(list(w.values()), lr=LR, betas=hp[:2], eps=hp[2], weight_decay=0.0)
                  for hp, w in copies.items()}
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        scales = {n: torch.randn(start[n].shape, generator=generator) * 0.1 * (step + 1) for n in names}
        lr = engine.optimizer.param_groups[0]["lr"]  # the engine's lr at this step (its warm-up starts at 0)
        params = dict(engine.module.named_parameters())
        engine.backward(sum((params[n] * scales[n]).sum() for n in names))
        engine.step()
        for hp, optimizer in optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            sum((copies[hp][n] * scales[n]).sum() for n in names).backward()
            optimizer.step()
    params = dict(engine.module.named_parameters())
    configured, default = copies[(0.8, 0.9, 0.05)], copies[(0.9, 0.98, 1e-6)]
    for name in names:
        torch.testing.assert_close(params[name].detach(), configured[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    gap = max(float((configured[n] - default[n]).detach().abs().max()) for n in names)
    assert gap > 1e-3  # the default hyper-parameters give other weights: the check above can fail


def test_adam_betas_out_of_range_are_a_config_error():
    with pytest.raises(ConfigError, match=r"train.adam_beta2 must be in \[0, 1\)"):
        load_config(None, ["train.adam_beta2=1.0"])
    with pytest.raises(ConfigError, match="train.adam_eps must be > 0"):
        load_config(None, ["train.adam_eps=0"])


def test_the_temperature_keeps_its_gradient_at_the_bound():
    from sde_ray.losses.objectives import Temperature

    temperature = Temperature(0.01, learnable=True)  # log(1/τ) = ln 100: at the bound
    (temperature() * 2.0).backward()
    assert float(temperature.log_scale.grad) == pytest.approx(200.0)  # d(2·e^s)/ds = 2·100


@pytest.mark.parametrize("value", ["0.005", "1.5"])
def test_a_temperature_outside_the_clamp_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"loss.temperature must be in \[0.01, 1\]"):
        load_config(None, [f"loss.temperature={value}"])


@pytest.mark.parametrize(("stage", "schedule"), [(0, "constant"), (2, "cosine"), (2, "linear")])
def test_each_tower_steps_at_its_own_learning_rate(stage, schedule, process_group):
    """train.vision_lr_scale / text_lr_scale: every matrix of a tower decays, under zero gradients,
    by AdamW's closed form Π(1 − lr_t·scale·wd), where lr_t is the schedule's learning rate (the
    first parameter group's (the temperature's, at train.lr) — through DeepSpeed's per-group scheduling,
    the warm-up and decay included."""
    from sde_ray.models import tower_of

    scales = {"vision": 0.5, "text": 0.1}
    engine = _engine(stage, f"train.lr_schedule={schedule}", "train.warmup_steps=2", "train.max_steps=6",
                     f"train.vision_lr_scale={scales['vision']}", f"train.text_lr_scale={scales['text']}")
    base_group = engine.optimizer.param_groups[0]  # train.lr's group (the temperature), logged as `lr`
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    factors = dict.fromkeys(scales, 1.0)
    for _ in range(5):
        for tower, scale in scales.items():
            factors[tower] *= 1 - base_group["lr"] * scale * WD
        _zero_gradient_step(engine)
    assert base_group["lr"] > 0
    matrices = [n for n in before if n.startswith("model.") and before[n].dim() >= 2]
    assert {tower_of(n) for n in matrices} == {"vision", "text"}
    for name in matrices:
        torch.testing.assert_close(dict(engine.module.named_parameters())[name].detach(),
                                   before[name] * factors[tower_of(name)], msg=lambda m, n=name: f"{n}: {m}")


def test_a_tower_at_scale_zero_is_frozen(process_group):
    """text_lr_scale=0: the text tower has no gradient and no optimizer state, and a real step with a
    loss through both towers moves only the vision tower (and the temperature)."""
    from sde_ray.models import tower_of

    engine = _engine(0, "train.text_lr_scale=0", "train.weight_decay=0")
    named = dict(engine.module.named_parameters())
    text = [n for n in named if n.startswith("model.") and tower_of(n) == "text"]
    assert text and not any(named[n].requires_grad for n in text)
    in_groups = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(named[n]) in in_groups for n in text)
    before = {n: p.detach().clone() for n, p in named.items()}
    for _ in range(3):
        engine.backward(sum(p.square().sum() for p in engine.module.parameters()))
        engine.step()
    moved = {n for n, p in engine.module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all(n.startswith("objective.") or tower_of(n) == "vision" for n in moved)
    assert any(tower_of(n) == "vision" for n in moved if n.startswith("model."))


@pytest.mark.parametrize("key", ["train.vision_lr_scale", "train.text_lr_scale"])
def test_a_negative_tower_lr_scale_is_a_config_error(key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [f"{key}=-0.5"])
