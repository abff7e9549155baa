"""When an optimizer step's aftermath happens: log, validate, checkpoint, report, print a console line.

One rule for the whole run, owned by one object (torchtitan's `should_validate(step)` shape), so the
loop asks `cadence.at(step)` instead of testing step numbers itself:

- log (window means to metrics.jsonl / wandb / the driver's progress bar) every `train.log_every`
  steps and at the last step; the console line every `logging.console_every` steps and at the last;
- validate every `train.eval_every` steps when a validation split exists;
- checkpoint every `train.checkpoint_every` steps; the last step's checkpoint is `finish`'s, which
  reports the run summary with it;
- report to Ray (a barrier: every rank reports at the same steps) whenever anything above happened,
  except at the last step (again `finish`'s report).

A wall-clock checkpoint rule belongs in `checkpoint_due` (its answer must be the same on every rank:
rank 0's clock, agreed by one collective, like the preemption flag).
"""

from __future__ import annotations

from dataclasses import dataclass

from sde_ray.config import Config


@dataclass(frozen=True)
class Due:
    """What happens after one step."""

    log: bool = False  # window metrics computed, averaged over ranks and logged (rank 0)
    validate: bool = False
    checkpoint: bool = False  # a mid-run checkpoint (never at the last step: `finish` writes that one)
    console: bool = False  # a console line for the logged metrics
    last: bool = False

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

    @classmethod
    def of(cls, config: Config, validating: bool) -> Cadence:
        train = config.train
        return cls(max_steps=train.max_steps, log_every=train.log_every, eval_every=train.eval_every,
                   checkpoint_every=train.checkpoint_every, console_every=max(1, config.logging.console_every),
                   validating=validating)

    def checkpoint_due(self, step: int) -> bool:
        """A mid-run checkpoint after `step` (the place for a wall-clock rule too)."""
        return step % self.checkpoint_every == 0 and step != self.max_steps

    def at(self, step: int) -> Due:
        last = step == self.max_steps
        validate = self.validating and self.eval_every > 0 and step % self.eval_every == 0
        checkpoint = self.checkpoint_due(step)
        # Validated and checkpointed steps are logged too: their metrics go with the report.
        log = step % self.log_every == 0 or last or validate or step % self.checkpoint_every == 0
        return Due(log=log, validate=validate, checkpoint=checkpoint,
                   console=log and (step % self.console_every == 0 or last), last=last)
