"""Helpers of the exact-resume tests (a plain module, imported by tests/train/conftest.py and the tests).

One config whose uninterrupted run is computed once per ZeRO stage (the `uninterrupted_run` fixture)
and shared by every test that compares a killed-and-resumed run with it: test_exact_resume.py (a
worker killed), test_driver_restart.py (the driver killed). 352 synthetic rows, global batch 64 over
2 workers in 2 GradCache chunks each: 5 steps per epoch, so 10 steps are 2 epochs; checkpoints at
steps 3, 6 and 9.
"""

from __future__ import annotations

import json
from pathlib import Path

RESUME = ["train.global_batch_size=64", "train.max_steps=10", "train.checkpoint_every=3",
          "train.micro_batch_size=16", "scaling.max_failures=1", "data.shuffle_window=128", "train.log_every=1"]


def resume_overrides(stage: int) -> list[str]:
    overrides = [*RESUME, f"deepspeed.zero_stage={stage}"]
    if stage == 3:
        overrides.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    return overrides


def step_recorder(log: Path, marker: Path | None = None, kill_at: int = 0):
    """A step hook appending (pid, step, rank, epoch, sample ids, losses) to `log`; with a `marker`,
    rank 1 dies with os._exit after step `kill_at` the first time (a real process death)."""
    import os

    def hook(step, rank, world_size, module, sample_ids, epoch, losses):
        with open(log, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, "rank": rank, "epoch": epoch,
                                     "ids": sample_ids, "losses": losses}) + "\n")
        if marker is not None and step == kill_at and rank == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)

    return hook


def consolidated_weights(checkpoint: str | Path) -> dict:
    import torch

    return torch.load(Path(checkpoint) / "consolidated.pt", weights_only=True)
