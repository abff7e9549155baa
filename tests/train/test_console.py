"""What `sde-ray train` prints (sde_ray/train/console.py and the driver around it).

- The default job through the real CLI in a fresh process, at a handful of steps: its console passes
  CI's check of the README run (.ci/check_console.py: progress, the P@1 table and the paths, none of
  Ray's, Ray Data's or DeepSpeed's own output, fewer than 80 lines), holds a line per validation,
  and the chatter is in the Ray log folder the last line names.
- A run whose worker fails ends with the reason in its last lines and the traceback in a file.
- The renderer against hand-written lines: one per `every` steps on a plain stream, a bar redrawn
  in place on a terminal, validations and notices once each.
"""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The data_cache fixture's synthetic set (tests/train/conftest.py), so the run reuses its shards.
SYNTH = ["data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64"]
PROGRESS = re.compile(r"^step +(\d+)/(\d+) \[[#.]{20}\] +\d+% \| loss [-\d.e+]+ \| \d+ samples/s \| eta \S+$")


def check_console():
    spec = importlib.util.spec_from_file_location("check_console", REPO / ".ci" / "check_console.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.ray
@pytest.mark.slow
def test_the_default_jobs_console_is_progress_validation_table_and_paths(data_cache, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "sde_ray.cli", "train", "--config", "configs/default.yaml",
               "--output-dir", str(out), *SYNTH, f"data.cache_dir={data_cache}", "logging.wandb=false",
               "train.max_steps=4", "train.log_every=1", "train.eval_every=2", "train.checkpoint_every=4",
               "train.warmup_steps=1", "logging.console_every=2", "eval.val_queries=16"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    console = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 0, "\n".join(console[-40:])
    assert check_console().problems(console) == [], "\n".join(console)
    assert not [line for line in console if re.search(r"Started a local Ray|\(_Mailbox|wandb:", line)]

    progress = [PROGRESS.match(line) for line in console]
    assert [(int(m[1]), int(m[2])) for m in progress if m] == [(2, 4), (4, 4)]  # every console_every steps
    validations = [re.fullmatch(r"step (\d+)/4: validation P@1 \d+\.\d%", line) for line in console
                   if ": validation" in line]
    assert [m and m[1] for m in validations] == ["2", "4"]

    # The paths end stdout (stderr, appended above, may hold Ray's token-auth notice when this process
    # has not started Ray before: RAY_AUTH_MODE is then unset in the child's environment).
    paths = dict(line.split(": ", 1) for line in run.stdout.splitlines()[-6:])
    assert list(paths) == ["output_dir", "model_dir", "checkpoint", "metrics_jsonl", "spectrum_plot", "logs"]
    assert Path(paths["output_dir"]) == out and Path(paths["metrics_jsonl"]).is_file()
    # The chatter went to Ray's log folder: the workers' DeepSpeed lines are there, and no warning
    # raised from our own modules (a deprecated torch API called by sde_ray/distributed.py, say).
    logs = Path(paths["logs"])
    worker_out = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.out"))
    worker_err = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err"))
    assert "DeepSpeed" in worker_out + worker_err
    assert not re.findall(r"sde_ray/\S+\.py:\d+: \w*Warning.*", worker_err)


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_worker_ends_the_run_with_its_reason(ray_cluster, data_cache, tmp_path, capsys):
    """A model path that does not exist fails on the worker that builds the model; the CLI's last
    two lines: the reason (the worker's own message), then where the traceback is."""
    from sde_ray.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(REPO / "configs" / "default.yaml"), "--output-dir", str(out), *SYNTH,
                 f"data.cache_dir={data_cache}", "logging.wandb=false", "scaling.num_workers=1",
                 "scaling.max_failures=0",  # the reason is the same on every attempt: one is enough
                 "model.name_or_path=/nonexistent/model"])
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-2:]
    assert code == 1
    assert last[0].startswith("sde-ray train failed: OSError: model.name_or_path='/nonexistent/model'"), last
    assert last[1].startswith(f"full traceback: {out / 'error.log'}")
    assert "Traceback" in (out / "error.log").read_text()


def test_plain_stream_gets_a_line_every_n_steps_and_each_notice_once(ray_cluster):
    from sde_ray.train.console import ConsoleRelay, ProgressConsole

    relay, stream = ConsoleRelay.start(), io.StringIO()
    with ProgressConsole(relay, every=2, stream=stream, poll_s=0.05):
        for step in (1, 2, 3):
            relay.progress(step, 3, {"loss": 2.0 / step, "samples_per_s": 100.0, "lr": 1e-3}, eta_s=65.0 * (3 - step))
        relay.notice("[sde_ray] resumed at step 0")
        relay.progress(3, 3, {"loss": 0.5, "samples_per_s": 90.0, "val_p_at_1": 0.4375}, eta_s=0.0)
    assert stream.getvalue().splitlines() == [
        "step 2/3 [#############.......]  67% | loss 1 | 100 samples/s | eta 1m05s",
        "step 3/3 [####################] 100% | loss 0.6667 | 100 samples/s | eta 0s",
        "[sde_ray] resumed at step 0",
        "step 3/3: validation P@1 43.8%",
        "step 3/3 [####################] 100% | loss 0.5 | 90 samples/s | eta 0s",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_bar_redrawn_and_notices_above_it():
    from sde_ray.train.console import ProgressConsole

    stream = _Terminal()
    console = ProgressConsole(relay=None, every=50, stream=stream)  # drawn by hand: no relay, no thread
    console.show({"step": 1, "total": 4, "eta_s": 30.0, "loss": 3.0})
    console.show({"notice": "[sde_ray] warning: x"})
    console.show({"step": 2, "total": 4, "eta_s": 20.0, "loss": 2.5})
    bar1 = "step 1/4 [#####...............]  25% | loss 3 | eta 30s"
    bar2 = "step 2/4 [##########..........]  50% | loss 2.5 | eta 20s"
    assert stream.getvalue() == (f"\r\x1b[K{bar1}" + f"\r\x1b[K[sde_ray] warning: x\n{bar1}" + f"\r\x1b[K{bar2}")


def test_durations_and_reasons():
    from sde_ray.train.console import duration, failure_reason

    assert [duration(s) for s in (0, 59.4, 61, 3599, 3725, float("inf"))] == ["0s", "59s", "1m01s", "59m59s",
                                                                               "1h02m", "?"]
    try:
        raise ValueError("bad thing\nsecond line")
    except ValueError as exc:
        assert failure_reason(exc) == "ValueError: bad thing"


def test_the_ci_check_names_what_a_console_lacks():
    lines = [f"chatter {i}" for i in range(80)] + ["(RayTrainWorker pid=1) DeepSpeed info"]
    found = check_console().problems(lines)
    assert found[0] == "81 lines (at most 79)" and len(found) == 5
    assert found[3] == "paths missing: output_dir, model_dir, checkpoint, metrics_jsonl, spectrum_plot, logs"
