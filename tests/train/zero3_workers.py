"""Two-process gloo ranks with a real DeepSpeed engine each (no Ray), for the ZeRO-3 tests.

A plain module, not a test file, so spawned children can import it (the tests put this folder and
tests/spectral, whose `gloo_workers.launch` spawns and times out the ranks, on sys.path).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

COLLECTIVE_TIMEOUT_S = 300


def gradcache_step(rank: int, world_size: int, rendezvous: str, out_dir: str, config_dict: dict,
                   batch: dict) -> None:
    """One `train_step` on this rank's rows of `batch` (a ZeRO engine per rank, dropout off); saves
    the loss, the trainable weights before, the consolidated weights after, the engine's steps, and
    how many weights this rank held after building the module (`held`) of the model's `total`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    from gloo_workers import finish, start

    start(rank, world_size, rendezvous, timeout_s=COLLECTIVE_TIMEOUT_S)  # a hung collective raises
    from sde_ray.config import from_dict
    from sde_ray.losses import StepContext
    from sde_ray.train.checkpoint import consolidated_state_dict
    from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size, local_batch_size
    from sde_ray.train.loop import build_engine, build_train_module, gathered, seed_everything
    from sde_ray.train.step import train_step

    config = from_dict(config_dict)
    seed_everything(config.train.seed)
    ds_config = build_deepspeed_config(config, world_size)
    module = build_train_module(config, ds_config=ds_config).train()  # partitioned under deepspeed.zero_init
    # What this rank holds of the weights before DeepSpeed's engine exists, and the whole model's size.
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    for child in module.modules():  # dropout off: the reference is one plain forward
        if isinstance(child, torch.nn.Dropout):
            child.p = 0.0
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(child, name, None), float):
                setattr(child, name, 0.0)
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with gathered([p for _, p in trainable]):
        before = {name: p.detach().clone() for name, p in trainable}
    engine = build_engine(module, ds_config)
    local = local_batch_size(config, world_size)
    mine = {key: value[rank * local:(rank + 1) * local] for key, value in batch.items()}
    context = StepContext(progress=0.3, rank=rank, world_size=world_size, training=True,
                          target_ids=mine.get("target_id"), generator=torch.Generator().manual_seed(11))
    result = train_step(engine, mine, context, chunk_size(config, world_size), world_size)
    weights = consolidated_state_dict(engine)
    torch.save({"finite": result.finite, "loss": result.loss, "before": before, "weights": weights,
                "global_steps": engine.global_steps, "held": held, "total": total}, Path(out_dir) / f"rank{rank}.pt")
    finish()


def zero3_validation(rank: int, world_size: int, rendezvous: str, out_dir: str, config_dict: dict,
                     eval_root: str) -> None:
    """The training loop's validation (`loop.validate` on `TrainedModel.for_validation`) of a fresh
    ZeRO-3 engine; saves the P@1, and the weights this rank holds afterwards (`held`, its partition)
    and materialised (`materialised`: gathered and not released) of the model's `total`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), DS_ACCELERATOR="cpu")
    from gloo_workers import finish, start

    start(rank, world_size, rendezvous, timeout_s=COLLECTIVE_TIMEOUT_S)
    from sde_ray.config import from_dict
    from sde_ray.models import BatchProcessor
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.loop import TrainedModel, build_engine, build_train_module, seed_everything, validate

    config = from_dict(config_dict)
    seed_everything(config.train.seed)
    engine = build_engine(build_train_module(config).train(), build_deepspeed_config(config, world_size))
    trained = TrainedModel(config, engine, rank)
    model = trained.for_validation()
    value = validate(model, BatchProcessor(config.model), eval_root, config, rank, world_size, trained.partitioned)
    parameters = list(model.parameters())  # what validation encoded with
    torch.save({"p_at_1": value, "partitioned": trained.partitioned,
                "held": sum(p.ds_tensor.numel() for p in parameters if hasattr(p, "ds_tensor")),
                "materialised": sum(p.data.numel() for p in parameters),
                "total": sum(getattr(p, "ds_numel", p.numel()) for p in parameters)},
               Path(out_dir) / f"rank{rank}.pt")
    finish()
