"""Curriculum curves α(t), λ(t) on training progress t = step / total_steps ∈ [0, 1].

A `ScheduleConfig` holds `start` until t = warmup, then moves monotonically to `end` at t = 1 along
the chosen shape g(u), u = (t − warmup)/(1 − warmup), with g(0) = 0 and g(1) = 1:
linear u; cosine (1 − cos πu)/2; sigmoid a logistic of slope `sigmoid_steepness` rescaled to hit 0
and 1 exactly; step `num_steps` equal plateaus (the last one at `end`); constant jumps to `end` right
after the warm-up. Values stay in [min(start, end), max(start, end)] ⊆ [0, 1].
"""

from __future__ import annotations

import math
from typing import Protocol

SCHEDULE_KINDS = ("linear", "cosine", "sigmoid", "step", "constant")


def _shape(kind: str, u: float, steepness: float, num_steps: int) -> float:
    if kind == "linear":
        return u
    if kind == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * u))
    if kind == "sigmoid":

        def logistic(x: float) -> float:
            return 1.0 / (1.0 + math.exp(-x))

        low, high = logistic(-steepness / 2), logistic(steepness / 2)
        return (logistic(steepness * (u - 0.5)) - low) / (high - low)
    if kind == "step":
        if num_steps == 1:
            return 1.0 if u > 0 else 0.0
        return min(math.floor(u * num_steps), num_steps - 1) / (num_steps - 1)
    if kind == "constant":
        return 1.0 if u > 0 else 0.0
    raise ValueError(f"unknown schedule kind {kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")


class Schedule(Protocol):
    """What `schedule_value` reads: `sde_ray.config.ScheduleConfig` is one (the library does not
    import the config)."""

    kind: str
    warmup: float
    start: float
    end: float
    sigmoid_steepness: float
    num_steps: int


def schedule_value(schedule: Schedule, progress: float) -> float:
    """The value of `schedule` (a `ScheduleConfig`) at progress t (clamped to [0, 1])."""
    if not math.isfinite(progress):
        raise ValueError(f"progress must be finite, got {progress}")
    if not 0.0 <= schedule.warmup < 1.0:
        raise ValueError(f"schedule warmup must be in [0, 1), got {schedule.warmup}")
    if schedule.kind == "sigmoid" and schedule.sigmoid_steepness <= 0:
        raise ValueError(f"sigmoid_steepness must be > 0, got {schedule.sigmoid_steepness}")
    if schedule.kind == "step" and schedule.num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {schedule.num_steps}")
    t = min(max(progress, 0.0), 1.0)
    u = max(t - schedule.warmup, 0.0) / (1.0 - schedule.warmup)
    g = _shape(schedule.kind, min(u, 1.0), schedule.sigmoid_steepness, schedule.num_steps)
    g = min(max(g, 0.0), 1.0)
    return schedule.start + (schedule.end - schedule.start) * g
