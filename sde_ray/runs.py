"""What a run leaves on disk, shared by Train and Eval so that neither imports the other.

- The checkpoint format: the file names inside one checkpoint directory (written by
  `train.checkpoint`, read back by it on resume and by `eval.runner` when it scores a checkpoint).
- Run logging: `say` (one line on a worker's stdout: its Ray log file, and the driver's console
  when Ray forwards worker output), `wandb_mode`, the wandb run id that survives restarts, and
  `RunLogger`, the rank-0 sinks (progress lines, `<output_dir>/metrics.jsonl`, wandb, and the
  driver's progress bar through a `console` relay) that the training loop writes and
  `eval.diagnostics.training_history` reads.

Depends on the standard library only (wandb is imported when a logger opens a run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

# Checkpoint directory layout (see train/checkpoint.py for what each holds).
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
CONSOLIDATED = "consolidated.pt"
STATE = "state.json"
RNG_DIR = "rng"

# Run directory layout.
METRICS_FILE = "metrics.jsonl"

CONSOLE_KEYS = ("loss", "loss_instance", "alpha", "lambda", "energy_strong_q", "effective_rank_q", "val_p_at_1")


def is_checkpoint(path: Path) -> bool:
    """A directory holding a complete sde_ray checkpoint (consolidated weights and the run state)."""
    return (path / CONSOLIDATED).is_file() and (path / STATE).is_file()


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (from its state file)."""
    return int(json.loads((path / STATE).read_text()).get("step", 0))


# Checkpoint integrity: every rank writes a sha256 manifest of its files last; a checkpoint is
# loaded (resume, eval) only when every file matches (train.checkpoint writes, both sides verify).
class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded (planted, altered or incomplete files); names the path.
    `incomplete`: files or manifests are missing (an interrupted write), nothing was changed."""

    def __init__(self, message: str, incomplete: bool = False):
        super().__init__(message)
        self.incomplete = incomplete


MANIFEST_DIR = "manifest"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, rank: int) -> None:
    """sha256 of every file under `directory` (this rank's part), written last."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    listing = {p.relative_to(directory).as_posix(): _sha256(p) for p in files}
    target = directory / MANIFEST_DIR / f"rank_{rank}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(listing, indent=0, sort_keys=True))
    partial.rename(target)  # a half-written manifest never looks complete


def verify_checkpoint(directory: str | os.PathLike) -> None:
    """Raises CheckpointError naming the first file that is planted, altered or missing."""
    directory = Path(directory)
    manifests = sorted((directory / MANIFEST_DIR).glob("rank_*.json"))
    try:
        world_size = int(json.loads((directory / STATE).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / STATE}: missing or unreadable ({exc})",
                              incomplete=isinstance(exc, FileNotFoundError)) from None
    if len(manifests) != world_size:
        raise CheckpointError(
            f"{directory / MANIFEST_DIR}: {len(manifests)} rank manifest(s) for world size {world_size} "
            "(an incomplete checkpoint)", incomplete=True)
    expected: dict[str, str] = {}
    for manifest in manifests:
        try:
            expected.update(json.loads(manifest.read_text()))
        except ValueError as exc:
            raise CheckpointError(f"{manifest}: not a manifest ({exc})") from None
    manifest_names = {m.relative_to(directory).as_posix() for m in manifests}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name in manifest_names:
            continue
        if name not in expected:
            raise CheckpointError(f"{path}: not written by any rank of this checkpoint (refused)")
        if _sha256(path) != expected[name]:
            raise CheckpointError(f"{path}: checksum differs from the manifest (altered; refused)")
    missing = [name for name in expected if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory / missing[0]}: listed in the manifest but missing (incomplete)",
                              incomplete=True)


def is_complete(directory: str | os.PathLike) -> bool:
    try:
        verify_checkpoint(directory)
    except CheckpointError:
        return False
    return True



def run_id(storage_path: str, run_name: str) -> str:
    """A wandb run id stable across restarts of the same Ray Train run (same storage + name)."""
    digest = hashlib.sha1(f"{storage_path}/{run_name}".encode()).hexdigest()[:10]
    return f"{run_name}-{digest}"


def say(message: str) -> None:
    """One console line from a worker. Written to the process's real stdout, which Ray forwards to
    the driver: Ray Train's print patch would also log it, and tees it when wandb or Ray has wrapped
    `sys.stdout`, so a plain `print` shows every line twice."""
    print(message, file=sys.__stdout__, flush=True)


def wandb_mode(logging_config) -> str:
    """`auto` resolves to online with WANDB_API_KEY set, else offline; WANDB_MODE in the env wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if logging_config.wandb_mode != "auto":
        return logging_config.wandb_mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _format(value: float) -> str:
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.2e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunLogger:
    """Rank-0 sinks: progress lines, metrics.jsonl (truncated to the resumed step), wandb, and the
    driver's progress bar: `console` (a `train.console.ConsoleRelay`, or None) receives every logged
    step's loss, throughput and time left."""

    def __init__(self, config, output_dir: str, run_id: str, mode: str, resumed_step: int, console=None):
        self.config = config
        self.console_relay = console
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.output_dir / METRICS_FILE
        self._truncate_after(resumed_step)
        self.start_time = time.time()
        self.start_step = resumed_step
        self.run = None
        if config.logging.wandb and mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=config.logging.wandb_project,
                group=config.logging.wandb_group or None,
                name=config.train.run_name,
                id=run_id,  # stable across worker-group restarts, so a resumed run continues one chart
                resume="allow",
                dir=str(self.output_dir),
                mode=mode,
                config=dataclasses.asdict(config),
                reinit="finish_previous",
            )

    def _truncate_after(self, step: int) -> None:
        """Drops rows past the checkpoint a restart resumed from, so every step appears once."""
        if not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def last_logged(self) -> dict[str, Any]:
        """The metrics of the last training row already in metrics.jsonl (without step and time),
        {} if none: the summary of a relaunch that had no step left to train."""
        if not self.jsonl.exists():
            return {}
        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        rows = [row for row in rows if "loss" in row]
        return {k: v for k, v in rows[-1].items() if k not in ("step", "time")} if rows else {}

    def log(self, step: int, metrics: dict[str, float], console: bool = False) -> None:
        """One logged step; `console`: also a progress line (the loop's cadence decides when)."""
        row = {"step": step, "time": time.time(), **metrics}
        with self.jsonl.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)
        if self.console_relay is not None:
            self.console_relay.progress(step, self.config.train.max_steps, metrics, self.eta(step))
        if console:
            self.console(step, metrics)

    def eta(self, step: int) -> float:
        """Seconds left at this step's pace since the logger opened (this launch's steps only)."""
        elapsed = time.time() - self.start_time
        return elapsed / max(step - self.start_step, 1) * (self.config.train.max_steps - step)

    def console(self, step: int, metrics: dict[str, float]) -> None:
        total = self.config.train.max_steps
        eta = self.eta(step)
        parts = [f"step {step:>5d}/{total} ({100.0 * step / total:3.0f}%)"]
        parts += [f"{k} {_format(metrics[k])}" for k in CONSOLE_KEYS if k in metrics and not math.isnan(metrics[k])]
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        parts.append(f"eta {eta:.0f}s")
        say(" | ".join(parts))

    def log_image(self, key: str, path: str, step: int) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        if self.run is not None:
            for key, value in (summary or {}).items():
                if isinstance(value, (int, float, str)):
                    self.run.summary[key] = value
            self.run.finish()
            self.run = None
