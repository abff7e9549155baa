"""The DeepSpeed JSON derived from the config tree: batch identity, precision, optimizer, schedule,
ZeRO stage and overrides; checked against DeepSpeed's own config parser."""

from __future__ import annotations

import pytest

from sde_ray.config import ConfigError, load_config
from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size, deep_merge, local_batch_size


def _config(*overrides: str):
    return load_config(None, list(overrides))


@pytest.mark.parametrize("world, chunk, micro, chunks", [(1, 0, 64, 1), (2, 0, 32, 1), (4, 8, 8, 2), (2, 8, 8, 4)])
def test_batch_sizes_multiply_to_the_global_batch(world, chunk, micro, chunks):
    """Each chunk is a DeepSpeed micro-step; chunk × chunks × world is the global (contrastive) batch."""
    config = _config("train.global_batch_size=64", f"train.micro_batch_size={chunk}", "scaling.num_workers=1")
    ds = build_deepspeed_config(config, world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == chunks
    assert ds["train_batch_size"] == micro * world * chunks == 64


def test_indivisible_world_size_names_the_keys():
    config = _config("train.global_batch_size=64", "scaling.num_workers=1")
    with pytest.raises(ConfigError, match="global_batch_size.*world size"):
        local_batch_size(config, 3)
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        chunk_size(_config("train.global_batch_size=64", "train.micro_batch_size=16", "scaling.num_workers=1"), 8)


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_removed_grad_accumulation_names_its_replacement(where, tmp_path):
    if where == "override":
        with pytest.raises(ConfigError, match="train.grad_accumulation was removed.*train.micro_batch_size"):
            _config("train.grad_accumulation=2")
    else:
        path = tmp_path / "old.yaml"
        path.write_text("train:\n  grad_accumulation: 2\n")
        with pytest.raises(ConfigError, match="train.grad_accumulation was removed.*train.micro_batch_size"):
            load_config(path)


def test_micro_batch_size_must_divide_the_local_batch_for_every_worker_count():
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        _config("train.global_batch_size=64", "train.micro_batch_size=12", "scaling.num_workers=2")
    with pytest.raises(ConfigError, match="train.micro_batch_size.*elastic"):
        _config("train.global_batch_size=48", "train.micro_batch_size=16", "scaling.min_workers=1",
                "scaling.max_workers=2", "scaling.num_workers=1")


def test_optimizer_precision_zero_and_clipping_follow_the_config():
    config = _config("train.lr=3e-4", "train.weight_decay=0.05", "train.grad_clip=0.5",
                     "deepspeed.zero_stage=3", "deepspeed.precision=bf16")
    ds = build_deepspeed_config(config, 2)
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}


def test_offload_uses_deepspeed_cpu_adam():
    ds = build_deepspeed_config(_config("deepspeed.offload_optimizer=true"), 2)
    assert "torch_adam" not in ds["optimizer"]["params"]
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}


@pytest.mark.parametrize("schedule, kind", [("cosine", "WarmupCosineLR"), ("linear", "WarmupDecayLR"),
                                            ("constant", "WarmupLR")])
def test_schedules(schedule, kind):
    ds = build_deepspeed_config(_config(f"train.lr_schedule={schedule}", "train.max_steps=50",
                                        "train.warmup_steps=5"), 2)
    assert ds["scheduler"]["type"] == kind
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 5
    if schedule != "constant":
        assert ds["scheduler"]["params"]["total_num_steps"] == 50


def test_fp16_on_cpu_is_rejected():
    config = _config()
    config.deepspeed.precision = "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        build_deepspeed_config(config, 2)


def test_overrides_are_deep_merged_last():
    config = _config("deepspeed.overrides={zero_optimization: {overlap_comm: true}, gradient_clipping: 2.0, "
                     "optimizer: {params: {betas: [0.8, 0.9]}}}")
    ds = build_deepspeed_config(config, 2)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 2.0
    assert ds["optimizer"]["params"]["betas"] == [0.8, 0.9]
    assert ds["optimizer"]["params"]["lr"] == config.train.lr


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1}}
    out = deep_merge(base, {"a": {"c": 2}})
    assert base == {"a": {"b": 1}} and out == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_accepts_the_json(stage, precision):
    """DeepSpeed's own parser checks the batch identity and every block we emit (outside a process
    group it parses as world size 1; the 2-worker runs in test_training.py cover world size 2)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = build_deepspeed_config(_config(f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                                        "train.micro_batch_size=32"), 1)
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == 64
    assert parsed.train_micro_batch_size_per_gpu == 32
    assert parsed.gradient_accumulation_steps == 2
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert parsed.scheduler_name == "WarmupCosineLR"
