"""What `sde-ray train` shows while it runs: one progress bar on the driver, a line per validation and
the workers' notices; the libraries' own output stays in Ray's log files.

By default Ray forwards every worker's stdout and stderr to the driver: DeepSpeed's op builds and
config, Ray Data's execution plan per epoch and worker, Ray Train's controller, Ray's own warnings
(~900 lines for the default job). The driver therefore starts or joins Ray with `log_to_driver=False`
(`sde-ray train --verbose` forwards everything again, as before), so that output stays in the Ray
session's log files (`ray_cluster.logs_dir()`: `worker-*.out|err` per process, `ray-data/`), and
rank 0 sends what the user needs through `ConsoleRelay`, a zero-CPU Ray actor: one progress event per
logged step and the notices that matter (a resume, a skipped non-finite step, a changed data order).
`ProgressConsole`, a thread on the driver, drains it and draws: on a terminal one bar redrawn in
place, elsewhere (CI, a file, `ray job logs`) one line every `logging.console_every` steps.
`report_failure` ends a failed run with its reason in one line and where the rest is.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import ray

from sde_ray import storage
from sde_ray.ray_cluster import logs_dir

BAR_WIDTH = 20


@ray.remote(num_cpus=0)
class _Mailbox:
    """The events rank 0 sent since the driver last looked, in the order they were sent."""

    def __init__(self):
        self._events: list[dict] = []

    def put(self, event: dict) -> None:
        self._events.append(event)

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events


@dataclass(frozen=True)
class ConsoleRelay:
    """The workers' side (picklable, carried in `RunArgs.console`): fire-and-forget sends."""

    mailbox: Any

    @classmethod
    def start(cls) -> ConsoleRelay:
        return cls(_Mailbox.remote())

    def progress(self, step: int, total: int, metrics: dict[str, float], eta_s: float) -> None:
        shown = {k: float(metrics[k]) for k in ("loss", "samples_per_s", "val_p_at_1") if k in metrics}
        self.mailbox.put.remote({"step": step, "total": total, "eta_s": eta_s, **shown})

    def notice(self, text: str) -> None:
        self.mailbox.put.remote({"notice": text})

    def stop(self) -> None:
        ray.kill(self.mailbox)


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: short enough for a progress line."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_text(event: dict) -> str:
    """`step 250/1000 [#####...............]  25% | loss 1.234 | 512 samples/s | eta 3m05s`."""
    step, total = event["step"], max(event["total"], 1)
    filled = min(BAR_WIDTH, int(BAR_WIDTH * step / total))
    parts = [f"step {step:>{len(str(total))}d}/{total} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
             f"{100.0 * step / total:3.0f}%"]
    if "loss" in event:
        parts.append(f"loss {event['loss']:.4g}")
    if "samples_per_s" in event:
        parts.append(f"{event['samples_per_s']:.0f} samples/s")
    parts.append(f"eta {duration(event['eta_s'])}")
    return " | ".join(parts)


class ProgressConsole:
    """Draws the relay's events on `stream` while the trainer runs (a context manager around `fit()`).

    A terminal gets one bar redrawn in place; any other stream a line every `every` steps and at the
    last step. Validations and notices are lines of their own, printed once."""

    def __init__(self, relay: ConsoleRelay, every: int, stream: TextIO | None = None, poll_s: float = 0.5):
        self.relay, self.every, self.poll_s = relay, max(1, every), poll_s
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self._bar = ""  # the bar on screen (terminal only)
        self._pending = None  # the drain request not answered yet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sde_ray-progress", daemon=True)

    @classmethod
    def around(cls, relay: ConsoleRelay | None, every: int):
        """The console of `relay` as a context manager; nothing when there is no relay (`--verbose`)."""
        return cls(relay, every) if relay is not None else contextlib.nullcontext()

    def __enter__(self) -> ProgressConsole:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # what rank 0 sent last
        if self._bar:
            self.stream.write("\n")
            self.stream.flush()
        self.relay.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            if not self._drain():
                return

    def _drain(self) -> bool:
        """Shows what arrived; False once the mailbox is gone (nothing more will come)."""
        if self._pending is None:
            self._pending = self.relay.mailbox.drain.remote()
        try:
            events = ray.get(self._pending, timeout=60)
        except ray.exceptions.GetTimeoutError:
            return True  # a busy cluster: wait for the same answer next time (it holds the events)
        except Exception:  # noqa: BLE001 - the mailbox or Ray is gone
            return False
        self._pending = None
        for event in events:
            self.show(event)
        return True

    def show(self, event: dict) -> None:
        if "notice" in event:
            self._line(event["notice"])
            return
        if "val_p_at_1" in event:
            self._line(f"step {event['step']}/{event['total']}: validation P@1 {100.0 * event['val_p_at_1']:.1f}%")
        text = progress_text(event)
        if self.live:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self._bar = text[:width]
            self.stream.write("\r\x1b[K" + self._bar)
            self.stream.flush()
        elif event["step"] % self.every == 0 or event["step"] == event["total"]:
            self._line(text)

    def _line(self, text: str) -> None:
        """A line that stays: on a terminal the bar is cleared first and redrawn below it."""
        if self._bar:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self._bar:
            self.stream.write(self._bar)
        self.stream.flush()


def failure_reason(exc: BaseException) -> str:
    """One line: the first failed rank's exception (Ray Train's `WorkerGroupError` carries each
    rank's traceback text), the controller's, or the exception itself."""
    failures = getattr(exc, "worker_failures", None)
    root = failures[min(failures)] if failures else getattr(exc, "controller_failure", None) or exc
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        return lines[-1]  # the traceback's last line: `SomeError: what went wrong`
    return f"{type(root).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def report_failure(exc: BaseException, output_dir: str | Path, verbose: bool = False,
                   stream: TextIO | None = None) -> None:
    """The last lines of a failed run: the reason, and where the full traceback and the logs are.
    The traceback goes to `<output_dir>/error.log` (a folder or a bucket; to the console too when
    `verbose`)."""
    stream = stream or sys.stderr
    trace = "".join(traceback.format_exception(exc))
    path = storage.join(str(output_dir), "error.log")
    try:
        storage.write_text(path, trace)
        where = f"full traceback: {path}"
    except OSError:
        verbose, where = True, "full traceback above"
    if verbose:
        stream.write(trace)
    logs = logs_dir()
    stream.write(f"sde-ray train failed: {failure_reason(exc)}\n"
                 f"{where}" + (f"; every process's output: {logs}" if logs else "") + "\n")
    stream.flush()
