"""When an optimizer step's aftermath happens: log, validate, checkpoint, report, print a console line.

One rule for the whole run, owned by one object (torchtitan's `should_validate(step)` shape), so the
loop asks `cadence.at(step)` instead of testing step numbers itself:

- log (window means to metrics.jsonl / wandb / the driver's progress bar) every `train.log_every`
  steps and at the last step; the console line every `logging.console_every` steps and at the last;
- validate every `train.eval_every` steps when a validation split exists;
- checkpoint every `train.checkpoint_every` steps, and after a step that ends
  `train.checkpoint_every_minutes` of wall-clock time since the last checkpoint (a lost spot node
  sends no SIGTERM: this bounds what it costs); the last step's checkpoint is `finish`'s, which
  reports the run summary with it;
- report to Ray (a barrier: every rank reports at the same steps) whenever anything above happened,
  except at the last step (again `finish`'s report);
- read the driver's stop flag (`train.session.Session.stop_requested`: rank 0's Ray actor call and
  an all-reduce, a host sync) every `train.stop_check_every` steps and at every logged step, not
  at every step.

The wall-clock rule's answer must be the same on every rank although their clocks differ: it reads
`distributed.SlowestClock` (the slowest rank's time, one all-reduce per step, none when the option is
0), so every rank calls `at` at every step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sde_ray.config import Config
from sde_ray.distributed import SlowestClock


@dataclass(frozen=True)
class Due:
    """What happens after one step."""

    log: bool = False  # window metrics computed, averaged over ranks and logged (rank 0)
    validate: bool = False
    checkpoint: bool = False  # a mid-run checkpoint (never at the last step: `finish` writes that one)
    console: bool = False  # a console line for the logged metrics
    last: bool = False
    stop_check: bool = False  # the driver's stop flag is read (never at the last step: nothing left to stop)

    @property
    def report(self) -> bool:
        """A `ray.train.report` of the logged metrics (at the last step `finish` reports instead)."""
        return self.log and not self.last


@dataclass(frozen=True)
class Cadence:
    max_steps: int
    log_every: int
    eval_every: int  # 0: never
    checkpoint_every: int
    console_every: int
    validating: bool  # a validation split exists
    stop_check_every: int = 1
    checkpoint_seconds: float = 0.0  # train.checkpoint_every_minutes in seconds; 0: by step only
    world_size: int = 1  # the ranks that agree on the wall-clock rule
    clock: SlowestClock | None = None  # since the last checkpoint (None: no wall-clock rule)

    @classmethod
    def of(cls, config: Config, validating: bool, world_size: int = 1,
           now: Callable[[], float] = time.monotonic) -> Cadence:
        """`now`: the wall clock (a fake one in tests); it starts counting here."""
        train = config.train
        seconds = train.checkpoint_every_minutes * 60.0
        return cls(max_steps=train.max_steps, log_every=train.log_every, eval_every=train.eval_every,
                   checkpoint_every=train.checkpoint_every, console_every=max(1, config.logging.console_every),
                   stop_check_every=train.stop_check_every,
                   validating=validating, checkpoint_seconds=seconds, world_size=world_size,
                   clock=SlowestClock(now) if seconds > 0 else None)

    def checkpoint_due(self, step: int) -> bool:
        """A mid-run checkpoint after `step`: on the step schedule, or the wall-clock period is over
        (a collective when the clock is on; every rank asks at the same steps)."""
        if step == self.max_steps:
            return False
        if step % self.checkpoint_every == 0:
            return True
        return self.clock is not None and self.clock.elapsed(self.world_size) >= self.checkpoint_seconds

    def checkpointed(self) -> None:
        """A checkpoint was written: the wall-clock period starts again."""
        if self.clock is not None:
            self.clock.reset()

    def at(self, step: int) -> Due:
        last = step == self.max_steps
        validate = self.validating and self.eval_every > 0 and step % self.eval_every == 0
        checkpoint = self.checkpoint_due(step)
        # Validated and checkpointed steps are logged too: their metrics go with the report.
        log = step % self.log_every == 0 or last or validate or checkpoint
        return Due(log=log, validate=validate, checkpoint=checkpoint,
                   console=log and (step % self.console_every == 0 or last), last=last,
                   stop_check=not last and (log or step % self.stop_check_every == 0))
