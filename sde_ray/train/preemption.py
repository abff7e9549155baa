"""SIGTERM is a preemption: stop at the next step boundary, checkpoint, exit `EXIT_PREEMPTED`.

Kubernetes (pod deletion, node drain) and Slurm (`scancel`, the time limit with `--signal`) send
SIGTERM to the job's driver, the `sde-ray train` process; the Ray Train workers are actors in other
processes and never see it (and the train function runs in a worker thread, where Python cannot
install a signal handler). So the driver's handler only raises a flag held by a tiny Ray actor;
rank 0 reads it every `train.stop_check_every` optimizer steps and at every logged step
(`train.cadence`, `train.session.RaySession`; not every step: the actor call and the collective make
the host wait for the device) and one collective gives every rank the same answer, so all of them
stop at the same step, write a checkpoint (a `ray.train.report` barrier) and return. `fit()` then returns normally and the driver exits with `EXIT_PREEMPTED`;
rerunning the same command resumes from that checkpoint. A second SIGTERM restores the previous
handler and re-delivers the signal (a forced stop).

The stop costs up to `train.stop_check_every` steps plus one checkpoint: size Kubernetes' `terminationGracePeriodSeconds` (30 s
by default), Ray's `RAY_JOB_STOP_WAIT_TIME_S` (3 s by default; the runtime envs here set 300) or
Slurm's `--signal=B:TERM@<seconds>` to fit it. A lost spot node sends nothing at all:
`train.checkpoint_every_minutes` (the wall-clock rule of `train.cadence.Cadence.checkpoint_due`)
bounds what it costs.
"""

from __future__ import annotations

import os
import signal
import sys

import ray

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
