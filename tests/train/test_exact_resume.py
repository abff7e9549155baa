"""Exact resume: a run whose worker dies in epoch 1 and is resumed by Ray Train from its checkpoint
is the run that was never interrupted (reference: the same config fitted without the kill, the
session's `uninterrupted_run`, shared with the driver-restart test).

352 synthetic rows, global batch 64 over 2 workers: 5 steps per epoch (320 rows, a different 32-row
tail left out each epoch), so 10 steps are 2 epochs. Checkpoints at steps 3, 6 and 9; rank 1 dies
with os._exit after step 8 (epoch 1); the group restarts from the step-6 checkpoint (epoch 1, one
step in).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from resume_runs import consolidated_weights, resume_overrides, step_recorder  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Final weights: every run here is deterministic on CPU (gloo reductions in a fixed order, the
# objective's randomness seeded per step, each rank's RNG state restored from the checkpoint).
# The tolerance leaves room only for float reassociation.
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-6


def _by_step(log: Path) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the last record written for it (a resumed attempt's record wins)."""
    records = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        records[(record["step"], record["rank"])] = record
    return records


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_in_epoch_1_and_resumed_equals_uninterrupted(stage, uninterrupted_run, small_config, tmp_path):
    from sde_ray.train.driver import build_trainer

    ref_weights, ref_log = uninterrupted_run(stage)
    config = small_config(*resume_overrides(stage), f"train.run_name=resume-{stage}")
    res_log, marker = tmp_path / "resumed.jsonl", tmp_path / "resumed.killed"
    resumed = build_trainer(config, step_hook=step_recorder(res_log, marker, kill_at=8)).fit()

    assert marker.exists(), "the worker was not killed"
    pids = {json.loads(line)["pid"] for line in res_log.read_text().splitlines()}
    assert len(pids) == 4  # two ranks, two attempts: the group really restarted
    expected, got = _by_step(ref_log), _by_step(res_log)
    assert sorted(expected) == sorted(got) == [(s, r) for s in range(1, 11) for r in (0, 1)]
    for key in expected:
        assert got[key]["ids"] == expected[key]["ids"], key  # the same rows on the same rank
        assert got[key]["epoch"] == expected[key]["epoch"], key
        torch.testing.assert_close(torch.tensor(got[key]["losses"]), torch.tensor(expected[key]["losses"]),
                                   rtol=LOSS_RTOL, atol=0.0)
    # Every row of each epoch trained exactly once (5 steps x 64 rows of 352 per epoch).
    for epoch in (0, 1):
        ids = [i for (s, r), rec in got.items() if rec["epoch"] == epoch for i in rec["ids"]]
        assert len(ids) == len(set(ids)) == 5 * 64, epoch
    epochs = [{i for rec in got.values() if rec["epoch"] == e for i in rec["ids"]} for e in (0, 1)]
    assert epochs[0] != epochs[1]  # a different tail of 32 rows is left out each epoch
    res_weights = consolidated_weights(resumed.checkpoint.path)
    assert ref_weights.keys() == res_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(res_weights[name], ref_weights[name], atol=WEIGHT_ATOL, rtol=0.0, msg=name)
