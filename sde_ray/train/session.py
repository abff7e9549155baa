"""Where the training loop meets Ray Train, behind one small object.

`fit` needs five things from its surroundings: this worker's rank and the world size, the checkpoint
Ray hands a restarted worker group, `report` (metrics, optionally with a checkpoint directory: a
barrier, every rank reports at the same steps), and whether the driver asked to stop (the preemption
flag, read by rank 0 and agreed by one collective, see `train.preemption`).

- `RaySession`: the production one, a Ray Train worker's context;
- `LocalSession`: the same contract in one process (world size 1, or ranks of a gloo group the caller
  set up), reports kept in a list and checkpoints copied under a directory, a stop flag the caller
  raises: the loop's policies run in seconds without a Ray cluster.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from sde_ray.distributed import all_ranks_true


class Session:
    rank: int
    world_size: int
    stoppable: bool = True  # False: no stop can be requested, so no collective is spent asking

    def resume_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """The checkpoint directory this attempt was handed (None: a fresh start), while entered."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        raise NotImplementedError

    def stop_flag(self) -> bool:
        """Rank 0's reading of the driver's stop request."""
        raise NotImplementedError

    def stop_requested(self) -> bool:
        """Whether the driver asked to stop, the same answer on every rank (one all-reduce)."""
        if not self.stoppable:
            return False
        local = self.stop_flag() if self.rank == 0 else False
        return not all_ranks_true(not local, self.world_size)  # rank 0's answer, agreed by all


class RaySession(Session):
    """A Ray Train worker: its context, `ray.train.get_checkpoint/report`, and the preemption flag
    actor the driver's SIGTERM handler raises (`train.preemption.Preemption`)."""

    def __init__(self, preemption=None):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.preemption = preemption
        self.stoppable = preemption is not None  # the same on every rank: the driver passed it to all

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield directory

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)

    def stop_flag(self) -> bool:
        import ray

        return bool(ray.get(self.preemption.get.remote()))


class LocalSession(Session):
    """One process's session (see the module doc): `reports` holds every `(metrics, checkpoint path
    or None)`, checkpoints are copied to `<storage>/<name>`; set `stop = True` to request a stop."""

    def __init__(self, storage: str | Path, rank: int = 0, world_size: int = 1, checkpoint: str | None = None):
        self.storage, self.rank, self.world_size = Path(storage), rank, world_size
        self.checkpoint = checkpoint
        self.reports: list[tuple[dict, Path | None]] = []
        self.stop = False

    @contextlib.contextmanager
    def resume_checkpoint(self) -> Iterator[str | None]:
        yield self.checkpoint

    def report(self, metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
        kept = None
        if checkpoint_dir:
            kept = self.storage / (name or f"checkpoint_{len(self.reports):06d}")
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)  # ranks merge into one folder, as in Ray
        self.reports.append((dict(metrics), kept))

    def stop_flag(self) -> bool:
        return self.stop
