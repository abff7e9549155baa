"""The worker loop without a Ray cluster: `fit` and `finish` on a real DeepSpeed engine (world size 1,
the session's gloo group) under a `LocalSession`, fed real processed rows of the synthetic MMEB.

References: the schedule the config spells out (log every 2 steps and at the last, console every 4
and at the last, a checkpoint every 4, none but `finish`'s at the last step), the rows the stream
marked replaced (one per batch), and the checkpoint's own state file."""

from __future__ import annotations

import math
import re

import pytest
import torch

from sde_ray.train.checkpoint import TrainState, verify_checkpoint
from sde_ray.train.data import REPLACED, SAMPLE_ID, BatchStream
from sde_ray.train.session import LocalSession

ROWS = 8


@pytest.fixture
def make_run(small_config, process_group, tmp_path):
    """`make_run(*overrides)`: a fresh `loop.Run` on a resumed-from-nothing engine and a stream of
    real processed batches (every batch marks its first row as a replaced read-time reject)."""
    from sde_ray.bench.train import fixed_batch
    from sde_ray.train.loop import RunArgs, assemble, resume

    def make(*overrides: str):
        config = small_config(f"train.global_batch_size={ROWS}", "train.log_every=2", "train.checkpoint_every=4",
                              "train.eval_every=0", "logging.console_every=4", *overrides)
        batch = fixed_batch(config, ROWS)

        def open_epoch(epoch: int, start_step: int):
            for step in range(start_step, 4):  # epochs of 4 global batches
                ids = torch.arange(ROWS) + 1000 * epoch + ROWS * step
                yield {**batch, SAMPLE_ID: ids, REPLACED: (torch.arange(ROWS) == 0)}

        session = LocalSession(tmp_path / "storage")
        args = RunArgs(run_id="loop-test", wandb_mode="disabled")
        engine, state = resume(config, args, session)
        return assemble(config, args, session, engine, state, BatchStream(open_epoch, ROWS, 0, 0))

    return make


def test_fit_follows_the_cadence_and_finish_reports_the_summary(make_run, read_metrics, capfd):
    from sde_ray.train.loop import finish, fit

    run = make_run("train.max_steps=5")
    assert fit(run) is True
    finish(run)

    rows = read_metrics(run.config.train.output_dir)
    assert [r["step"] for r in rows] == [2, 4, 5]  # every log_every and the last step
    assert [r["data_rows_replaced"] for r in rows] == [2, 4, 5]  # one replaced row per batch, synced at logs
    assert all(math.isfinite(r["loss"]) and "effective_rank_q" in r for r in rows)
    assert [r["epoch"] for r in rows] == [0, 0, 1]  # 4 batches per epoch
    console = [int(m) for m in re.findall(r"step\s+(\d+)/5", capfd.readouterr().out)]
    assert console == [4, 5]  # every console_every and the last step

    reported = [(m["step"], path is not None) for m, path in run.session.reports]
    assert reported == [(2, False), (4, True), (5, True)]  # no plain report at the last step: finish's
    summary, final = run.session.reports[-1]
    verify_checkpoint(final)
    assert TrainState.read(final).step == 5 and summary["samples"] == 5 * ROWS
    assert summary["loss"] == rows[-1]["loss"] and (run.session.storage.parent / "run" / "model").is_dir()


def test_a_stop_request_checkpoints_at_the_step_boundary(make_run):
    from sde_ray.train.loop import fit

    run = make_run("train.max_steps=6", "train.stop_check_every=1")  # step 3 is not a logged one
    seen = []

    def stop_at_three(step: int) -> None:  # the driver's SIGTERM arrives during step 3
        seen.append(step)
        run.session.stop = step == 3

    run.args = type(run.args)(**{**run.args.__dict__, "step_hook": stop_at_three})
    assert fit(run) is False
    assert seen == [1, 2, 3] and run.state.step == 3
    (logged, _), (stopped, path) = run.session.reports
    assert logged["step"] == 2 and "preempted" not in logged
    assert stopped["preempted"] == 1 and stopped["step"] == 3 and stopped["loss"] == logged["loss"]
    verify_checkpoint(path)
    state = TrainState.read(path)
    assert (state.step, state.samples, state.epoch_rows, state.rows_replaced) == (3, 3 * ROWS, 3 * ROWS, 3)


@pytest.mark.parametrize("policy, raised_after", [("skip", 3), ("raise", 1)])
def test_non_finite_steps_are_skipped_then_stop_the_run(make_run, policy, raised_after):
    """NaN weights make every loss non-finite: `skip` skips `train.max_nan_skips` steps in a row and
    stops at the next, `raise` at the first; no step, report or weight update happens meanwhile."""
    from sde_ray.train.loop import fit

    run = make_run("train.max_steps=6", f"train.nan_policy={policy}", "train.max_nan_skips=2")
    with torch.no_grad():
        for parameter in run.engine.module.model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=f"{raised_after} consecutive"):
        fit(run)
    assert (run.state.step, run.state.nan_skips, run.state.grad_skips) == (0, raised_after, 0)
    assert run.session.reports == [] and run.stream.epoch_rows == raised_after * ROWS
