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


def test_the_last_step_is_logged_off_the_schedule_and_the_console_needs_a_logged_step():
    config = load_config(None, ["train.max_steps=7", "train.log_every=3", "train.checkpoint_every=7",
                                "train.eval_every=0", "logging.console_every=2", "logging.wandb=false"])
    cadence = Cadence.of(config, validating=True)
    assert _steps(cadence, "log") == [3, 6, 7]
    assert _steps(cadence, "console") == [6, 7]  # step 2 and 4 are not logged: no line
    assert _steps(cadence, "checkpoint") == [] and _steps(cadence, "validate") == []
    assert cadence.at(7).last and not cadence.at(7).report
