"""Exact resume: a run whose worker dies in epoch 1 and is resumed by Ray Train from its checkpoint
is the run that was never interrupted (reference: the same config fitted without the kill).

352 synthetic rows, global batch 64 over 2 workers: 5 steps per epoch (320 rows, a different 32-row
tail left out each epoch), so 10 steps are 2 epochs. Checkpoints at steps 3 and 6; rank 1 dies with
os._exit after step 8 (epoch 1); the group restarts from the step-6 checkpoint (epoch 1, one step in).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Final weights: every run here is deterministic on CPU (gloo reductions in a fixed order, the
# objective's randomness seeded per step, each rank's RNG state restored from the checkpoint).
# The tolerance leaves room only for float reassociation.
WEIGHT_ATOL = 1e-6
LOSS_RTOL = 1e-6


def _recorder(log: Path, marker: Path | None, kill_at: int):
    def hook(step, rank, world_size, module, sample_ids, epoch, losses):
        with open(log, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "step": step, "rank": rank, "epoch": epoch,
                                     "ids": sample_ids, "losses": losses}) + "\n")
        if marker is not None and step == kill_at and rank == 1 and not marker.exists():
            marker.write_text(str(os.getpid()))
            os._exit(1)  # a real process death in epoch 1

    return hook


def _by_step(log: Path) -> dict[tuple[int, int], dict]:
    """(step, rank) -> the last record written for it (a resumed attempt's record wins)."""
    records = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        records[(record["step"], record["rank"])] = record
    return records


def _final_weights(result) -> dict[str, torch.Tensor]:
    return torch.load(Path(result.checkpoint.path) / "consolidated.pt", weights_only=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_killed_in_epoch_1_and_resumed_equals_uninterrupted(stage, ray_cluster, small_config, tmp_path):
    from sde_ray.train.driver import build_trainer

    overrides = [f"deepspeed.zero_stage={stage}", "train.global_batch_size=64", "train.max_steps=10",
                 "train.checkpoint_every=3", "train.micro_batch_size=16", "scaling.max_failures=1",
                 "data.shuffle_window=128", "train.log_every=5"]
    if stage == 3:
        overrides.append("deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}")
    runs = {}
    for name, kill in (("uninterrupted", False), ("resumed", True)):
        config = small_config(*overrides, f"train.output_dir={tmp_path / name}", f"train.run_name=resume-{stage}-{name}")
        log, marker = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.killed"
        result = build_trainer(config,
                               step_hook=_recorder(log, marker if kill else None, kill_at=8)).fit()
        runs[name] = (result, log, marker)

    (reference, ref_log, _), (resumed, res_log, marker) = runs["uninterrupted"], runs["resumed"]
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
    ref_weights, res_weights = _final_weights(reference), _final_weights(resumed)
    assert ref_weights.keys() == res_weights.keys()
    for name in ref_weights:
        torch.testing.assert_close(res_weights[name], ref_weights[name], atol=WEIGHT_ATOL, rtol=0.0, msg=name)
