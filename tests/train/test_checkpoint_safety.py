"""Nothing in a checkpoint is unpickled by our code, and nothing planted in one is loaded.

A real run writes a real checkpoint (DeepSpeed shards, consolidated weights, RNG state, manifests);
then a pickle whose `__reduce__` would write a marker file is planted as `rng/rank_0.pt` — what a
writer of the shared checkpoint store could do. The relaunch must refuse the checkpoint, naming the
file, and the marker must never appear; with the manifest forged too, `weights_only=True` still
refuses to run it."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_ray.train.checkpoint import (
    CheckpointError,
    is_complete,
    restore_rng,
    rng_state,
    set_rng_state,
    verify_checkpoint,
)


class _Planted:
    """Unpickling this writes `path`: the proof that code from storage ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("pwned",))


def _plant(target: Path, marker: Path) -> None:
    target.write_bytes(pickle.dumps({"torch": _Planted(str(marker))}))


def _zero_images(path: Path, every: int) -> set[int]:
    """Zeroes the image bytes of every `every`-th sample that has one, in place; their stable ids."""
    import tarfile

    from sde_ray.data.mmeb import stable_id

    data = bytearray(path.read_bytes())
    with tarfile.open(path) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".img")]
    keys = sorted({m.name.split(".", 1)[0] for m in members})[::every]
    for member in members:
        if member.name.split(".", 1)[0] in keys:
            data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    path.write_bytes(bytes(data))
    return {stable_id(key) for key in keys}


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.gauss(0, 1), np.random.randn()  # both keep a cached gaussian in their state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


@pytest.mark.gpu
def test_cuda_rng_state_is_saved_and_restored(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.init()
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = torch.rand(4, device="cuda").cpu()
    torch.cuda.manual_seed_all(123)
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    assert "cuda" in state
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), expected)


@pytest.mark.ray
@pytest.mark.slow
def test_planted_pickle_in_a_checkpoint_is_refused_and_never_runs(ray_cluster, small_config, data_cache, tmp_path):
    import ray.train

    from sde_ray.train.driver import build_trainer
    from sde_ray.train.loop import TrainModule  # noqa: F401  (the run's module, imported here as on a worker)

    # The run reads a copy of the shards with one truncated: skipped, and counted in every metrics row.
    # In the others every fourth image is zeroed in place (the tar stays valid): the processor
    # rejects those rows while training reads them, and each one's place goes to another row.
    (manifest,) = data_cache.glob("*/shards-*/manifest.json")
    shards = tmp_path / "shards"
    shutil.copytree(manifest.parent, shards)
    *intact, victim = sorted(shards.glob("*.tar"))
    victim.write_bytes(victim.read_bytes()[:1000])
    corrupted = set()
    for path in intact:
        corrupted |= _zero_images(path, every=4)
    log = tmp_path / "ids.jsonl"

    def record_ids(sample_ids):
        with open(log, "a") as handle:
            handle.write(json.dumps(sample_ids) + "\n")

    config = small_config("train.max_steps=2", "scaling.num_workers=1", "scaling.max_failures=0",
                          "data.source=mmeb", f"data.shards=[{shards}/*.tar]", "train.log_every=1")
    result = build_trainer(config, step_hook=record_ids).fit()
    assert result.metrics["data_skipped_shards"] == 1
    assert result.metrics["data_rejected_rows"] == json.loads(manifest.read_text())["rejected"]
    # Reference: the ids trained. Each step has 32 slots; a row trains once per epoch, so every
    # replacement (a copy of another row of its batch) is one distinct id fewer.
    trained = [i for line in log.read_text().splitlines() for i in json.loads(line)]
    assert len(trained) == 2 * 32 and not corrupted & set(trained)
    replaced = len(trained) - len(set(trained))
    assert replaced > 0
    assert result.metrics["data_rows_replaced"] == replaced
    rows = [json.loads(line) for line in (Path(config.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["data_rows_replaced"] == replaced and rows[0]["data_rows_replaced"] <= replaced
    checkpoint = Path(result.checkpoint.path)
    verify_checkpoint(checkpoint)  # everything Ray stored was written (and listed) by a rank
    assert is_complete(checkpoint)

    marker = tmp_path / "marker"
    planted = checkpoint / "rng" / "rank_0.pt"
    _plant(planted, marker)
    with pytest.raises(CheckpointError, match="checksum differs"):
        verify_checkpoint(checkpoint)
    with pytest.raises(ray.train.TrainingFailedError) as info:
        build_trainer(config).fit()
    assert str(planted) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()

    # A new file no rank wrote is refused too, even where nothing would read it.
    planted.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verify_checkpoint(checkpoint)
    (checkpoint / "extra.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not written by any rank"):
        verify_checkpoint(checkpoint)

    # A writer who also forges the manifest gets past the checksum, not past weights_only=True.
    (checkpoint / "extra.pt").unlink()
    _plant(planted, marker)
    manifest = checkpoint / "manifest" / "rank_0.json"
    listing = json.loads(manifest.read_text())
    listing["rng/rank_0.pt"] = hashlib.sha256(planted.read_bytes()).hexdigest()
    manifest.write_text(json.dumps(listing))
    verify_checkpoint(checkpoint)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        restore_rng(checkpoint, rank=0)  # what the worker's resume calls
    assert not marker.exists()
