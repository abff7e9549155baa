"""`train.checkpoint_every_minutes` (`CheckpointClock`): due once the period has passed since the
last reset, never when 0. Reference: times worked out by hand on a fake clock. That every rank
decides alike (the slowest rank's clock) is tested on 2 gloo ranks in tests/test_distributed.py."""

from __future__ import annotations

from sde_ray.train.preemption import CheckpointClock


def test_due_after_the_period_and_off_at_zero():
    now = [100.0]
    clock = CheckpointClock(0.5, now=lambda: now[0])
    now[0] += 29.9
    assert not clock.due(world_size=1)
    now[0] += 0.1
    assert clock.due(world_size=1)
    clock.reset()
    assert not clock.due(world_size=1)
    never = CheckpointClock(0.0, now=lambda: now[0])
    now[0] += 1e9
    assert not never.due(world_size=1)
