"""Fault tolerance: a training worker process dies mid-run (os._exit, once, guarded by a marker
file); Ray Train restarts the group from the last checkpoint, the run skips the consumed batches and
finishes with the right step count; a NaN loss is detected on every rank and handled per policy."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_worker_death_resumes_from_last_checkpoint(ray_cluster, small_config, read_metrics, tmp_path):
    from sde_ray.train.driver import build_trainer

    marker = tmp_path / "killed"
    seen = tmp_path / "steps.jsonl"

    def die_once_at_step_7(step, rank, world_size, module):
        if rank == 0:
            with open(seen, "a") as handle:
                handle.write(json.dumps({"step": step, "pid": os.getpid()}) + "\n")
        if step == 7 and rank == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # a real process death, not an exception

    config = small_config("train.max_steps=10", "train.checkpoint_every=5", "scaling.max_failures=1")
    result = build_trainer(config, step_hook=die_once_at_step_7).fit()

    assert marker.exists()
    steps = [json.loads(line) for line in seen.read_text().splitlines()]
    # First attempt ran steps 1..7 (rank 0 may or may not log 7 before the group is torn down);
    # the second resumed after the step-5 checkpoint, so it starts at 6 in a new process.
    first_pid = steps[0]["pid"]
    resumed = [s["step"] for s in steps if s["pid"] != first_pid]
    assert resumed == [6, 7, 8, 9, 10]
    assert [s["step"] for s in steps if s["pid"] == first_pid][:6] == [1, 2, 3, 4, 5, 6]

    assert result.metrics["step"] == 10 and result.metrics["samples"] == 10 * 32
    state = json.loads((Path(result.checkpoint.path) / "state.json").read_text())
    assert state["step"] == 10 and state["samples"] == 320
    # 352 rows split in 2 × 11 batches of 16: after 10 steps, still epoch 0 with 320 rows consumed
    # (the restart skipped the 160 rows the step-5 checkpoint had consumed).
    assert (state["epoch"], state["epoch_rows"]) == (0, 320)
    rows = read_metrics(config.train.output_dir)
    # Logged every 2 steps and at checkpoints; the first attempt's row for step 6 was dropped on resume.
    assert [r["step"] for r in rows] == [2, 4, 5, 6, 8, 10]


def test_nan_loss_is_detected_and_skips_are_bounded(ray_cluster, small_config):
    import ray.train

    from sde_ray.train.driver import build_trainer

    def poison_weights_after_step_3(step, rank, world_size, module):
        if step == 3:
            import torch

            with torch.no_grad():
                for parameter in module.model.parameters():
                    if parameter.numel() > 1:
                        parameter.fill_(float("nan"))

    config = small_config("train.max_steps=10", "train.nan_policy=skip", "train.max_nan_skips=2",
                          "scaling.max_failures=0", "loss.name=infonce")
    with pytest.raises(ray.train.TrainingFailedError) as failure:
        build_trainer(config, step_hook=poison_weights_after_step_3).fit()
    message = str(failure.value)
    # A skipped step is skipped whole: the step count stays at 3, so every attempt is step 4; the
    # poisoned weights stay NaN, and the third consecutive attempt is one skip too many.
    assert "non-finite loss at step 4" in message
    assert "train.nan_policy=skip, 3 consecutive (train.max_nan_skips=2)" in message
