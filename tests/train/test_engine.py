"""The engine builder on DeepSpeed's CPU accelerator (sde_ray/train/engine.py): a real engine, and no
JIT build of DeepSpeed's shared-memory all-reduce kernel on the way (a C++ compile of 60-80 s on 2
cores that the first run in every environment paid, for a kernel only inference uses)."""

from __future__ import annotations

import torch

from sde_ray.config import load_config


def test_cpu_engine_reduces_through_torch_distributed_without_the_shm_kernel(process_group):
    import deepspeed.comm.comm as ds_comm

    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine, build_train_module, seed_everything

    config = load_config(None, ["loss.name=infonce", "train.global_batch_size=4", "deepspeed.zero_stage=2"])
    seed_everything(0)
    engine = build_engine(build_train_module(config), build_deepspeed_config(config, 1))
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    # The backend still reduces: an all-reduce through DeepSpeed's comm API on the gloo group.
    value = torch.ones(3, device="cpu")
    ds_comm.all_reduce(value)
    torch.testing.assert_close(value, torch.ones(3))
    assert engine.zero_optimization_stage() == 2
