"""The cadence against schedules written out by hand from the config (no engine, no Ray)."""

from __future__ import annotations

from sde_ray.config import load_config
from sde_ray.train.cadence import Cadence


def _steps(cadence: Cadence, what: str) -> list[int]:
    return [step for step in range(1, cadence.max_steps + 1) if getattr(cadence.at(step), what)]


def test_the_cadence_of_a_run_with_validation():
    config = load_config(None, ["train.max_steps=12", "train.log_every=2", "train.checkpoint_every=5",
                                "train.eval_every=6", "logging.console_every=4", "logging.wandb=false"])
    cadence = Cadence.of(config, validating=True)
    assert _steps(cadence, "log") == [2, 4, 5, 6, 8, 10, 12]  # log_every, checkpoints, validations, the last
    assert _steps(cadence, "validate") == [6, 12]
    assert _steps(cadence, "checkpoint") == [5, 10]  # the last step's checkpoint is finish's
    assert _steps(cadence, "report") == [2, 4, 5, 6, 8, 10]  # at the last step finish reports
    assert _steps(cadence, "console") == [4, 8, 12]  # console_every among logged steps, and the last
    assert _steps(Cadence.of(config, validating=False), "validate") == []


def test_the_stop_flag_is_read_at_logged_steps_and_every_stop_check_every_steps_never_at_the_last():
    config = load_config(None, ["train.max_steps=12", "train.log_every=4", "train.checkpoint_every=100",
                                "train.stop_check_every=3", "logging.wandb=false"])
    assert _steps(Cadence.of(config, validating=False), "stop_check") == [3, 4, 6, 8, 9]
    every_step = load_config(None, ["train.max_steps=4", "train.stop_check_every=1", "logging.wandb=false"])
    assert _steps(Cadence.of(every_step, validating=False), "stop_check") == [1, 2, 3]


def test_the_last_step_is_logged_off_the_schedule_and_the_console_needs_a_logged_step():
    config = load_config(None, ["train.max_steps=7", "train.log_every=3", "train.checkpoint_every=7",
                                "train.eval_every=0", "logging.console_every=2", "logging.wandb=false"])
    cadence = Cadence.of(config, validating=True)
    assert _steps(cadence, "log") == [3, 6, 7]
    assert _steps(cadence, "console") == [6, 7]  # step 2 and 4 are not logged: no line
    assert _steps(cadence, "checkpoint") == [] and _steps(cadence, "validate") == []
    assert cadence.at(7).last and not cadence.at(7).report


def test_the_wall_clock_rule_checkpoints_once_the_period_is_over_and_restarts_after_each_checkpoint():
    # train.checkpoint_every_minutes on a fake clock, times worked out by hand. That every rank decides
    # alike (the slowest rank's clock) is tested on 2 gloo ranks in tests/test_distributed.py.
    config = load_config(None, ["train.max_steps=100", "train.log_every=50", "train.checkpoint_every=40",
                                "train.checkpoint_every_minutes=0.5", "logging.wandb=false"])
    now = [100.0]
    cadence = Cadence.of(config, validating=False, now=lambda: now[0])
    now[0] += 29.9
    assert not cadence.at(1).checkpoint and not cadence.at(1).log
    now[0] += 0.1
    due = cadence.at(2)
    assert due.checkpoint and due.log and due.report  # a checkpoint goes with its metrics
    cadence.checkpointed()
    assert not cadence.checkpoint_due(3)
    now[0] += 1e9
    assert not cadence.checkpoint_due(100)  # the last step's checkpoint is finish's, whatever the clock
    assert cadence.checkpoint_due(40) and cadence.checkpoint_due(41)
    by_step_only = Cadence.of(load_config(None, ["train.max_steps=100", "train.checkpoint_every=40",
                                                 "logging.wandb=false"]), validating=False, now=lambda: now[0])
    now[0] += 1e9
    assert [s for s in range(1, 101) if by_step_only.checkpoint_due(s)] == [40, 80]
