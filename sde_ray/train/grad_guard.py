"""The non-finite guards: no optimizer step on a loss or gradient that is not finite on every rank,
and the run's policy for such steps (`NonFiniteGuard`: skip and count, or stop).

The loss check in `sde_ray.train.step` cannot see a NaN born in a backward (a replayed GradCache
chunk's, say) under a finite loss, and DeepSpeed checks gradients for overflow only under fp16: with
bf16 or fp32 such a gradient would go straight into AdamW and corrupt the weights and both moments
for good. The guard owns that policy:

- it observes every gradient the backward passes produce for the engine's trainable parameters (a
  tensor hook per parameter, so it sees each chunk's contribution before ZeRO-2/3 reduce-scatter and
  free it), folding "was any element non-finite" into one flag on the device (no host sync);
- before the optimizer step, every rank agrees (one all-reduce, `all_ranks_finite`): the reduced
  gradient is finite iff every rank's contributions were (a NaN or Inf anywhere survives the sum);
- a non-finite step is skipped whole (`skipped_update`): DeepSpeed's boundary `step()` still runs,
  so its micro-step accounting, gradient buffers and ZeRO bookkeeping advance and clear as usual,
  but the inner torch optimizer's update is a no-op (weights, Adam moments and Adam's step count stay),
  and the learning-rate schedule and DeepSpeed's step and sample counters are put back, so the run
  continues as one that never saw the batch. `skipped` counts these steps.

One guard per engine (`GradientGuard.of(engine)`); `begin()` at the start of every optimizer step.

`NonFiniteGuard` applies `train.nan_policy` to the steps `train_step` skipped (a non-finite loss, or
a non-finite gradient seen by the `GradientGuard`): `skip` continues without the batch, counting it
in the run state, until more than `train.max_nan_skips` consecutive steps were skipped; `raise`
stops at the first. Every rank sees the same step results, so every rank decides the same.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from sde_ray.distributed import all_ranks_true

_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that updates the weights: DeepSpeed's ZeRO and bf16 wrappers hold it as
    `.optimizer` (ZeRO-0 in fp32 hands the torch optimizer itself to the engine)."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside the engine's {type(engine.optimizer).__name__}")
    return optimizer


class GradientGuard:
    """Watches the gradients of `engine.module`'s trainable parameters for NaN/Inf (see the module doc)."""

    def __init__(self, engine):
        self.engine = engine
        self.skipped = 0  # optimizer steps skipped for a non-finite gradient
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=engine.device)
        self._handles = [p.register_hook(self._observe) for p in engine.module.parameters() if p.requires_grad]

    @classmethod
    def of(cls, engine) -> GradientGuard:
        """The engine's guard, made on first use."""
        if engine not in _GUARDS:
            _GUARDS[engine] = cls(engine)
        return _GUARDS[engine]

    def _observe(self, grad: torch.Tensor) -> None:
        bad = ~torch.isfinite(grad).all()
        self._nonfinite.logical_or_(bad.to(self._nonfinite.device))

    def begin(self) -> None:
        """Forget what earlier steps produced (call before the step's first backward)."""
        self._nonfinite.zero_()

    def all_ranks_finite(self, world_size: int) -> bool:
        """Whether every gradient seen since `begin()` was finite on every rank (one all-reduce;
        every rank calls it at the same point)."""
        return all_ranks_true(not bool(self._nonfinite), world_size)

    @contextlib.contextmanager
    def skipped_update(self):
        """Runs DeepSpeed's boundary `engine.step()` inside without changing the weights, the
        optimizer state, the learning-rate schedule or DeepSpeed's step counters; counts the skip."""
        engine, optimizer = self.engine, inner_optimizer(self.engine)
        scheduler = engine.lr_scheduler
        schedule = scheduler.state_dict() if scheduler is not None else None
        counters = {name: getattr(engine, name) for name in ("global_steps", "global_samples")}
        lrs = [group["lr"] for group in optimizer.param_groups]
        optimizer.step = lambda *args, **kwargs: None  # an instance attribute shadows the method
        try:
            yield
        finally:
            del optimizer.step
            if scheduler is not None:
                scheduler.load_state_dict(schedule)
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr
            for name, value in counters.items():
                setattr(engine, name, value)
            self.skipped += 1

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NonFiniteGuard:
    """The loss and gradient policy of the loop (see the module doc); owns the consecutive count."""

    def __init__(self, policy: str, max_skips: int):
        self.policy, self.max_skips = policy, max_skips
        self.consecutive = 0

    def check(self, result, state) -> str | None:
        """None for a finite step; for a skipped one, counts it in `state` (`nan_skips`, and
        `grad_skips` for a gradient) and returns the notice to print, or raises FloatingPointError
        under `raise` or past `max_skips` consecutive skips. `state.step` is the last finished step."""
        if result.finite:
            self.consecutive = 0
            return None
        self.consecutive += 1
        state.nan_skips += 1
        state.grad_skips += result.skipped == "gradient"
        message = f"non-finite {result.skipped} at step {state.step + 1} on at least one rank"
        if self.policy == "raise" or self.consecutive > self.max_skips:
            raise FloatingPointError(f"{message}; train.nan_policy={self.policy}, {self.consecutive} consecutive "
                                     f"(train.max_nan_skips={self.max_skips})")
        return f"[sde_ray] {message}: skipped ({self.consecutive}/{self.max_skips})"
