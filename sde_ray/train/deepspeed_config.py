"""The DeepSpeed JSON, derived from the one config tree (a pure function; no DeepSpeed import).

Batch sizes: `train.global_batch_size` samples per optimizer step across all workers, the contrastive
and spectral batch. Each worker holds `global / world_size` rows (the local batch) and encodes them in
chunks of `train.micro_batch_size` rows (GradCache, `sde_ray.train.step`); every chunk is one DeepSpeed
micro-step, so `train_micro_batch_size_per_gpu` = chunk, `gradient_accumulation_steps` = chunks and
`train_batch_size` = chunk × chunks × world = global (DeepSpeed checks this identity at `initialize`).
The chunks accumulate into one optimizer step; no gradient is divided by the chunk count
(`sde_ray.train.step.backward`: the cached feature gradients are already the gradients of the
global loss).
The optimizer is AdamW (torch's, so nothing is JIT-compiled on CPU; DeepSpeed's CPU Adam when the
optimizer state is offloaded), the schedule a linear warm-up then cosine / linear decay or a
constant learning rate, all stepped by the engine once per optimizer step. `deepspeed.overrides`
is deep-merged last, so any raw DeepSpeed key can be set from YAML or the command line.
"""

from __future__ import annotations

import copy
from typing import Any

from sde_ray.config import Config, check_precision, chunk_size, local_batch_size

# DeepSpeed prints its own step/lr line every `steps_per_print` steps; our console line replaces it.
_QUIET_STEPS = 10**9


def scheduler_config(config: Config) -> dict[str, Any]:
    """DeepSpeed scheduler block: linear warm-up, then `train.lr_schedule` until `train.max_steps`."""
    train = config.train
    # DeepSpeed's warm-ups need >= 1 step (they clamp to 2); 0 means "as short as DeepSpeed allows".
    warmup = max(1, train.warmup_steps)
    if train.lr_schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": train.max_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": 0.0,
            },
        }
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr, "warmup_num_steps": warmup, "warmup_type": "linear"}
    if train.lr_schedule == "linear":
        return {"type": "WarmupDecayLR", "params": {**params, "total_num_steps": train.max_steps}}
    return {"type": "WarmupLR", "params": params}


def deep_merge(base: dict, update: dict) -> dict:
    """`update` merged into a copy of `base`; nested dicts merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_deepspeed_config(config: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for a run of `world_size` workers, overrides applied last."""
    train, ds = config.train, config.deepspeed
    check_precision(config)  # also in validate(); repeated for a config changed after loading
    optimizer_params: dict[str, Any] = {
        "lr": train.lr,
        "weight_decay": train.weight_decay,
        "betas": [train.adam_beta1, train.adam_beta2],
        "eps": train.adam_eps,
    }
    if not ds.offload_optimizer:
        # torch.optim.AdamW: no FusedAdam/CPUAdam build step, identical maths.
        optimizer_params["torch_adam"] = True
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    result: dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": chunk_size(config, world_size),
        "gradient_accumulation_steps": local_batch_size(config, world_size) // chunk_size(config, world_size),
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "scheduler": scheduler_config(config),
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": _QUIET_STEPS,
        # A token budget changes the chunk count from step to step: the step, not DeepSpeed's fixed
        # micro-step count, says when the optimizer steps (`sde_ray.train.step`).
        "managed_gradient_accumulation": not train.chunk_tokens,
        "wall_clock_breakdown": False,
    }
    return deep_merge(result, ds.overrides)


def per_group_schedule(ds_config: dict[str, Any], lr_scales: list[float]) -> dict[str, Any]:
    """The DeepSpeed config for optimizer parameter groups whose learning rates are `lr_scales` times
    the configured one (per-tower learning rates, `train.vision_lr_scale` / `train.text_lr_scale`).

    WarmupCosineLR multiplies each group's own initial lr by its ratio, so it needs nothing. WarmupLR
    and WarmupDecayLR set every group to `warmup_min_lr` .. `warmup_max_lr`, which would erase the
    groups' differences: those become per-group lists (DeepSpeed accepts one value per group)."""
    scheduler = ds_config.get("scheduler", {})
    if all(scale == 1.0 for scale in lr_scales) or scheduler.get("type") not in ("WarmupLR", "WarmupDecayLR"):
        return ds_config
    out = copy.deepcopy(ds_config)
    params = out["scheduler"].setdefault("params", {})
    for key, default in (("warmup_min_lr", 0.0), ("warmup_max_lr", 0.001)):  # DeepSpeed's defaults
        value = params.get(key, default)
        params[key] = [value * scale for scale in lr_scales]
    return out
