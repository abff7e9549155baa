"""Fixtures of the training tests: a small synthetic MMEB prepared once per session, configs sized
for 2 busy CPU cores (tiny-clip, batch 32, a handful of steps, one eval dataset), and a one-process
gloo group for DeepSpeed engines built in the test process itself."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from sde_ray.config import load_config

SMALL = [
    "data.synth.train_per_subset=32",
    "data.synth.eval_per_dataset=16",
    "data.samples_per_shard=64",
    "train.global_batch_size=32",
    "train.warmup_steps=2",
    "train.lr=3e-3",
    "train.log_every=2",
    "train.checkpoint_every=5",
    "eval.datasets=[SynColour]",
    "eval.val_queries=16",
    "logging.wandb=false",
    "logging.console_every=2",
]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """The synthetic MMEB and its shards, generated and converted once for the whole session."""
    from sde_ray.data.cache import prepare_data

    cache = tmp_path_factory.mktemp("sde_ray_cache")
    prepare_data(load_config(None, SMALL + [f"data.cache_dir={cache}"]))
    return cache


@pytest.fixture
def small_config(data_cache, tmp_path):
    """`small_config(*overrides)`: a validated config writing into this test's tmp_path."""

    def make(*overrides: str):
        return load_config(None, SMALL + [f"data.cache_dir={data_cache}", f"train.output_dir={tmp_path / 'run'}",
                                          *overrides])

    return make


@pytest.fixture
def read_metrics():
    """`read_metrics(output_dir)`: the rows of `<output_dir>/metrics.jsonl`."""

    def read(output_dir: str | Path) -> list[dict]:
        path = Path(output_dir) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    return read


@pytest.fixture(scope="session")
def process_group():
    """A gloo process group of world size 1 in this process, so `deepspeed.initialize` runs here
    (no Ray): the cheapest real engine. One per session: DeepSpeed keeps the first group it saw."""
    import os

    import torch.distributed as dist

    with socket.socket() as probe:  # a free port, not a fixed one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()

