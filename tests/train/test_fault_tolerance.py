"""Fault tolerance: a NaN loss is detected on every rank and handled per policy. (A worker process
dying mid-run and Ray Train restarting the group from the last checkpoint is
tests/train/test_exact_resume.py: the same rows, losses, weights, step counts and metrics rows as
the uninterrupted run.)"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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
