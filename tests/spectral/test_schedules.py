"""α(t)/λ(t) curves: ends, warm-up, monotone, in range, per kind; bad input."""

from __future__ import annotations

import itertools
import math

import pytest

from sde_ray.config import ScheduleConfig
from sde_ray.spectral import SCHEDULE_KINDS, schedule_value

GRID = [i / 200 for i in range(201)]


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
@pytest.mark.parametrize("start, end", [(0.0, 1.0), (0.5, 1.0), (1.0, 0.0), (0.2, 0.2)])
@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_monotone_in_range_with_the_right_ends(kind, start, end, warmup):
    schedule = ScheduleConfig(kind=kind, warmup=warmup, start=start, end=end, num_steps=4)
    values = [schedule_value(schedule, t) for t in GRID]
    low, high = min(start, end), max(start, end)
    assert all(low - 1e-12 <= v <= high + 1e-12 for v in values)
    steps = [b - a for a, b in itertools.pairwise(values)]
    assert all(s * (end - start) >= -1e-12 for s in steps)  # never moves against start → end
    assert math.isclose(values[0], start, abs_tol=1e-12) and math.isclose(values[-1], end, abs_tol=1e-12)
    assert all(math.isclose(v, start, abs_tol=1e-12) for t, v in zip(GRID, values) if t <= warmup)


def test_shapes_at_known_points():
    def at(kind, t, **kw):
        return schedule_value(ScheduleConfig(kind=kind, **kw), t)

    assert at("linear", 0.3) == pytest.approx(0.3)
    assert at("cosine", 0.5) == pytest.approx(0.5)
    assert at("cosine", 0.25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert at("sigmoid", 0.5) == pytest.approx(0.5)
    assert at("sigmoid", 0.1) < at("linear", 0.1)  # slow start, fast middle
    assert [at("step", t, num_steps=4) for t in (0.1, 0.3, 0.6, 0.9)] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert at("constant", 0.01, start=0.2, end=0.7) == pytest.approx(0.7)
    assert at("linear", 0.5, warmup=0.5) == 0.0 and at("linear", 0.75, warmup=0.5) == pytest.approx(0.5)
    assert at("linear", 1.7) == 1.0 and at("linear", -1.0) == 0.0  # progress is clamped


def test_bad_progress_and_schedule_are_rejected():
    with pytest.raises(ValueError, match="progress"):
        schedule_value(ScheduleConfig(), float("nan"))
    with pytest.raises(ValueError, match="warmup"):
        schedule_value(ScheduleConfig(warmup=1.0), 0.5)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        schedule_value(ScheduleConfig(kind="exp"), 0.5)
