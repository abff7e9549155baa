"""Trainable-only checkpoints with a LoRA tiny VLM (tiny-qwen2-vl), on a real DeepSpeed engine in this
process (ZeRO-2, the LoRA recipes' stage, GradCache chunks, LoRA dropout on).

Reference: the same 4 steps run without interruption. The "killed" run is a fresh module and engine
(the frozen base rebuilt from the config, as a relaunched worker does) resumed from the step-2
checkpoint, which holds no frozen weight: its steps 3-4 must give the uninterrupted losses and
weights. The checkpoint itself must hold the trainable weights only (a fraction of the model's
bytes), and the base it names must be the one rebuilt, or the resume and the export refuse it.
"""

from __future__ import annotations

import json

import pytest
import torch

STEPS, SAVE_AT, ROWS, CHUNK = 4, 2, 8, 4


@pytest.fixture(scope="module")
def lora_vlm(data_cache):
    from sde_ray.bench.train import fixed_batch
    from sde_ray.config import load_config

    from .conftest import SMALL

    config = load_config(None, SMALL + [
        f"data.cache_dir={data_cache}", "model.kind=vlm", "model.name_or_path=tiny-qwen2-vl",
        "model.lora.enabled=true", "deepspeed.zero_stage=2", f"train.global_batch_size={ROWS}",
        f"train.micro_batch_size={CHUNK}", f"train.max_steps={STEPS}", "scaling.num_workers=1"])
    batch = fixed_batch(config, ROWS * STEPS)
    return config, [{k: v[i * ROWS:(i + 1) * ROWS] for k, v in batch.items()} for i in range(STEPS)]


def _engine(config):
    from sde_ray.train.checkpoint import base_identity
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_train_module, seed_everything

    seed_everything(config.train.seed)
    module = build_train_module(config)
    base = base_identity(config, module.model)
    return module, base, build_deepspeed_config(config, 1)


def _steps(engine, config, batches, state) -> list[float]:
    from sde_ray.train.loop import clamp_temperatures, step_context, to_model_inputs
    from sde_ray.train.step import train_step

    losses = []
    for batch in batches:
        batch = to_model_inputs(batch, engine.device, torch.float32)
        result = train_step(engine, batch, step_context(config, state, 0, 1, batch), CHUNK, 1)
        assert result.finite
        clamp_temperatures(engine)
        state.step += 1
        losses.append(result.loss)
    return losses


def _trainable(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}


def test_lora_vlm_resumed_from_a_trainable_only_checkpoint_equals_the_uninterrupted_run(
        process_group, lora_vlm, tmp_path):
    from sde_ray.config import with_values
    from sde_ray.eval.checkpoints import export_ray_checkpoint
    from sde_ray.models import load_pretrained, load_trained_weights
    from sde_ray.runs import CONSOLIDATED
    from sde_ray.train.checkpoint import (
        TrainState, check_resume_base, load_consolidated, restore_engine, resume_plan, save_checkpoint)
    from sde_ray.train.engine import build_engine

    config, batches = lora_vlm
    checkpoint = tmp_path / "checkpoint"

    # Uninterrupted, with the step-2 checkpoint written on the way.
    module, base, ds_config = _engine(config)
    engine = build_engine(module, ds_config)
    state = TrainState(world_size=1, zero_stage=2, base=base)
    losses = _steps(engine, config, batches[:SAVE_AT], state)
    save_checkpoint(checkpoint, engine, state, config, rank=0)
    whole = with_values(config, {"train.checkpoint_frozen": True})
    save_checkpoint(tmp_path / "whole", engine, TrainState(**state.__dict__), whole, rank=0)
    at_save = _trainable(engine)
    losses += _steps(engine, config, batches[SAVE_AT:], state)
    want = _trainable(engine)

    # What the checkpoint holds: the trainable weights (+ buffers), none of the frozen base.
    saved = torch.load(checkpoint / CONSOLIDATED, weights_only=True)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(saved) and set(at_save) <= set(saved)
    recorded = json.loads((checkpoint / "state.json").read_text())
    assert recorded["trainable_only"] and recorded["base"]["name_or_path"] == "tiny-qwen2-vl"
    states = torch.load(next((checkpoint / "deepspeed").rglob("mp_rank_00_model_states.pt")), weights_only=False)
    assert set(at_save) <= set(states["module"]) and not frozen & set(states["module"])
    # Against the whole checkpoint of the same engine (train.checkpoint_frozen): the frozen weights'
    # bytes are gone (from consolidated.pt and DeepSpeed's model states); the rest is the same.
    frozen_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if not p.requires_grad)
    written, whole_written = (sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                              for d in (checkpoint, tmp_path / "whole"))
    assert whole_written - written >= frozen_bytes and written < whole_written / 3, (written, whole_written)

    # "Killed": a fresh module (its frozen part rebuilt from the base), resumed exactly.
    module2, base2, ds_config = _engine(config)
    plan = resume_plan(checkpoint, world_size=1, zero_stage=2)
    assert plan.exact
    check_resume_base(plan, base2, rank=0, world_size=1)
    engine2 = build_engine(module2, ds_config)
    restore_engine(engine2, plan, rank=0)
    state2 = TrainState(**{**plan.state.__dict__})
    resumed = _steps(engine2, config, batches[SAVE_AT:], state2)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses[SAVE_AT:]), rtol=1e-6, atol=0.0)
    got = _trainable(engine2)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0.0, msg=name)
    assert engine2.global_steps == STEPS

    # A resized resume loads the same trainable weights into a fresh module.
    module3, _, _ = _engine(config)
    load_consolidated(module3, plan)
    for name, value in at_save.items():
        torch.testing.assert_close(dict(module3.named_parameters())[name].detach(), value, atol=0.0, rtol=0.0)

    # The export of the checkpoint (eval's path) is the base rebuilt + the adapters, merged: the same
    # embedding weights as the module that trained, merged on a copy.
    export = load_pretrained(export_ray_checkpoint(checkpoint, tmp_path / "export"))[0].state_dict()
    reference = module3.model
    reference.backbone = reference.backbone.merge_and_unload()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(export[name], value, atol=1e-6, rtol=0.0, msg=name)

    # Another base (other initial weights) is refused, by the resume and by the loader.
    other = with_values(config, {"train.seed": config.train.seed + 1})
    _, other_base, _ = _engine(other)
    with pytest.raises(ValueError, match="differ from the ones the checkpoint was trained on"):
        check_resume_base(plan, other_base, rank=0, world_size=1)
    module4, _, _ = _engine(other)
    with pytest.raises(ValueError, match="tiny-qwen2-vl"):
        load_trained_weights(module4.model, {k.removeprefix("model."): v for k, v in saved.items()
                                             if k.startswith("model.")}, recorded["base"])
