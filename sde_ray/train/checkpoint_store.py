"""Which checkpoint of a run directory a relaunch resumes from, and which ones stay on disk.

Ray Train registers a checkpoint only after every rank has uploaded its part; an interrupt between
the uploads and the registration leaves a folder on disk that Ray never resumes from nor deletes
(seen: the rerun resumed from the checkpoint before the last one written, and `keep_checkpoints=2`
left 5 folders). Our own manifests (`checkpoint.verify_checkpoint`) say which folders are complete,
so on a local or shared file system:

- before a launch, incomplete folders (an interrupted write) are removed, and the newest complete
  one is offered to the workers, which resume from it or from Ray's checkpoint, whichever is newer;
- after a successful fit, every folder Ray does not hold in its result is removed, so the count on
  disk is `train.keep_checkpoints`.

A folder whose files were altered is neither removed nor resumed from silently: if Ray picks it,
the resume refuses it, naming the file. Remote storage (`s3://`, `gs://`) is left to Ray.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sde_ray.train.checkpoint import STATE, CheckpointError, TrainState, verify_checkpoint

PREFIX = "checkpoint_"


def _local(run_dir: str) -> Path | None:
    return None if "://" in run_dir else Path(run_dir)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir)
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []


def _order(directory: Path) -> tuple[int, float]:
    """Newest = highest step, then the latest written state (two attempts may save the same step)."""
    return TrainState.read(directory).step, (directory / STATE).stat().st_mtime


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    complete = []
    for directory in checkpoint_dirs(run_dir):
        try:
            verify_checkpoint(directory)
        except CheckpointError:
            continue
        complete.append(directory)
    return sorted(complete, key=_order)


def prepare_resume(run_dir: str) -> str | None:
    """Removes interrupted (incomplete) checkpoints; returns the newest complete one, if any."""
    root = _local(run_dir)
    if root is None:
        return None
    for directory in checkpoint_dirs(root):
        try:
            verify_checkpoint(directory)
        except CheckpointError as exc:
            if exc.incomplete:
                shutil.rmtree(directory, ignore_errors=True)
    complete = complete_checkpoints(root)
    return str(complete[-1]) if complete else None


def newer_checkpoint(ray_dir: str | None, offered: str | None) -> str | None:
    """Of Ray's checkpoint and the one offered by `prepare_resume`, the one with the later step
    (Ray's on a tie: it is registered, and after a worker restart it is this attempt's own)."""
    if not offered or not Path(offered).is_dir():
        return ray_dir
    if ray_dir is None:
        return offered
    try:
        return offered if _order(Path(offered)) > _order(Path(ray_dir)) else ray_dir
    except (OSError, ValueError, KeyError):
        return ray_dir  # Ray's is unreadable: let the resume refuse it with its path


def prune_unregistered(run_dir: str, registered: list[str]) -> list[Path]:
    """Removes checkpoint folders Ray does not hold (strays of interrupted attempts)."""
    root = _local(run_dir)
    if root is None:
        return []
    keep = {Path(p).resolve() for p in registered}
    removed = [d for d in checkpoint_dirs(root) if d.resolve() not in keep]
    for directory in removed:
        shutil.rmtree(directory, ignore_errors=True)
    return removed
