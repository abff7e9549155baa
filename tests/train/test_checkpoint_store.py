"""Which checkpoint folder a relaunch resumes from and which stay on disk, on folders laid out as
a run leaves them (state.json, files, per-rank manifests): an interrupted write (a rank's manifest
missing) is removed and never chosen even when it claims a later step; an altered one is neither
removed nor chosen; the newest complete one is offered; strays Ray does not hold are pruned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sde_ray.train.checkpoint import CheckpointError, verify_checkpoint, write_manifest
from sde_ray.train.checkpoint_store import checkpoint_dirs, newer_checkpoint, prepare_resume, prune_unregistered


def _checkpoint(run: Path, name: str, step: int, world_size: int = 2, manifests: int | None = None) -> Path:
    directory = run / name
    for rank in range(world_size):
        part = run / f".{name}-rank{rank}"  # each rank writes (and lists) only its own files
        (part / "rng").mkdir(parents=True)
        (part / "rng" / f"rank_{rank}.pt").write_bytes(os.urandom(64))
        if rank == 0:
            (part / "state.json").write_text(json.dumps({"step": step, "world_size": world_size}))
        if rank < (world_size if manifests is None else manifests):
            write_manifest(part, rank)
        for path in part.rglob("*"):  # Ray merges the ranks' folders into one
            if path.is_file():
                target = directory / path.relative_to(part)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    return directory


def test_the_newest_complete_checkpoint_is_offered_and_interrupted_ones_removed(tmp_path):
    older = _checkpoint(tmp_path, "checkpoint_000010_a", 10)
    newest = _checkpoint(tmp_path, "checkpoint_000020_b", 20)
    interrupted = _checkpoint(tmp_path, "checkpoint_000030_c", 30, manifests=1)  # rank 1 never finished
    altered = _checkpoint(tmp_path, "checkpoint_000040_d", 40)
    (altered / "rng" / "rank_1.pt").write_bytes(b"planted")
    with pytest.raises(CheckpointError, match="1 rank manifest"):
        verify_checkpoint(interrupted)

    assert prepare_resume(str(tmp_path)) == str(newest)
    assert not interrupted.exists() and altered.exists() and older.exists()
    # The workers take the later of Ray's checkpoint and the offered one.
    assert newer_checkpoint(str(older), str(newest)) == str(newest)
    assert newer_checkpoint(str(newest), str(older)) == str(newest)
    assert newer_checkpoint(None, str(newest)) == str(newest)
    assert newer_checkpoint(str(older), None) == str(older)


def test_strays_ray_does_not_hold_are_pruned(tmp_path):
    kept = [_checkpoint(tmp_path, f"checkpoint_0000{s}_x", s) for s in (30, 40)]
    stray = _checkpoint(tmp_path, "checkpoint_000035_y", 35)
    assert prune_unregistered(str(tmp_path), [str(p) for p in kept]) == [stray]
    assert checkpoint_dirs(tmp_path) == kept
    assert prune_unregistered("s3://bucket/run", []) == [] and prepare_resume("s3://bucket/run") is None
