"""SIGTERM is a preemption: stop at the next step boundary, checkpoint, exit `EXIT_PREEMPTED`.

Kubernetes (pod deletion, node drain) and Slurm (`scancel`, the time limit with `--signal`) send
SIGTERM to the job's driver, the `sde-ray train` process; the Ray Train workers are actors in other
processes and never see it (and the train function runs in a worker thread, where Python cannot
install a signal handler). So the driver's handler only raises a flag held by a tiny Ray actor;
rank 0 reads it after every optimizer step and one collective (`all_reduce` MAX) gives every rank
the same answer, so all of them stop at the same step, write a checkpoint (a `ray.train.report`
barrier) and return. `fit()` then returns normally and the driver exits with `EXIT_PREEMPTED`;
rerunning the same command resumes from that checkpoint. A second SIGTERM restores the previous
handler and re-delivers the signal (a forced stop).

The stop costs one step plus one checkpoint: size Kubernetes' `terminationGracePeriodSeconds` (30 s
by default), Ray's `RAY_JOB_STOP_WAIT_TIME_S` (3 s by default; the runtime envs here set 300) or
Slurm's `--signal=B:TERM@<seconds>` to fit it. A lost spot node sends nothing at all:
`CheckpointClock` (`train.checkpoint_every_minutes`) bounds what it costs by wall-clock time.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import ray

from sde_ray.distributed import SlowestClock, all_ranks_true

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly with a checkpoint; rerun to resume


@ray.remote(num_cpus=0)
class _StopFlag:
    def __init__(self):
        self.value = False

    def set(self) -> None:
        self.value = True

    def get(self) -> bool:
        return self.value


class Preemption:
    """Driver side: while entered, SIGTERM raises the flag instead of killing the process."""

    def __init__(self):
        self.flag = _StopFlag.remote()
        self.requested = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested:  # a second SIGTERM: stop now, the way the process would have before
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.requested = True
        self.flag.set.remote()
        print("[sde_ray] SIGTERM: stopping at the next step boundary with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


def stop_requested(flag, rank: int, world_size: int) -> bool:
    """Worker side, at a step boundary: whether the driver asked to stop, the same on every rank."""
    if flag is None:
        return False
    local = bool(ray.get(flag.get.remote())) if rank == 0 else False
    return not all_ranks_true(not local, world_size)  # rank 0's answer, agreed by one all-reduce


class CheckpointClock:
    """`train.checkpoint_every_minutes`: whether that much wall-clock time has passed since the last
    checkpoint, the same answer on every rank (`SlowestClock`: the slowest rank's time; no
    collective when the option is 0). `now`: the clock (`time.monotonic`)."""

    def __init__(self, minutes: float, now=time.monotonic):
        self.seconds, self.clock = minutes * 60.0, SlowestClock(now)

    def reset(self) -> None:
        self.clock.reset()

    def due(self, world_size: int) -> bool:
        return self.seconds > 0 and self.clock.elapsed(world_size) >= self.seconds
