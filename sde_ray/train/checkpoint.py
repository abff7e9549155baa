"""Checkpoints: every rank's DeepSpeed shards + a consolidated copy of the weights + the run state.

Layout of one checkpoint directory (Ray merges every rank's files into it):

    deepspeed/state/...        DeepSpeed `save_checkpoint` (per-rank ZeRO shards, model states)
    consolidated.pt            full weights of the training module (encoder + objective), rank 0
    state.json                 step, samples consumed, epoch position, world size, ZeRO stage, config
    rng/rank_<r>.pt            torch CPU / CUDA, numpy and python RNG state of rank r, as tensors
    manifest/rank_<r>.json     sha256 of every file rank r wrote, written last (rank r's "complete" mark)

Nothing here is unpickled by our code: the RNG state and the weights are tensors loaded with
`weights_only=True`, the state is JSON. DeepSpeed's `load_checkpoint` does unpickle its own files
(optimizer state), so `verify_checkpoint` checks every file against the manifests before any load:
a file no rank wrote, an altered one or a missing one refuses the checkpoint, naming the path. A
checkpoint is complete when every rank of its world size left a manifest and every file verifies.

Resume picks one of two paths (`resume_plan`):
- same world size and ZeRO stage: DeepSpeed `load_checkpoint` restores weights, optimizer moments
  and the scheduler exactly;
- otherwise (an elastic resize, or a changed stage): the consolidated weights are loaded into the
  module before `deepspeed.initialize`, the optimizer state restarts (AdamW moments rebuild within
  a few steps) and the scheduler is moved to the saved step, so the learning-rate curve continues.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sde_ray.config import Config, to_dict
from sde_ray.distributed import get_rank
from sde_ray.runs import (
    CONSOLIDATED,
    DEEPSPEED_DIR,
    DEEPSPEED_TAG,
    MANIFEST_DIR,
    RNG_DIR,
    STATE,
    CheckpointError,
    is_complete,
    verify_checkpoint,
    write_manifest,
)



@dataclass
class TrainState:
    """Where a run stands; saved with each checkpoint and read back on resume."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # samples consumed over the whole run (global)
    epoch: int = 0  # current data epoch
    epoch_rows: int = 0  # global rows of the current epoch already consumed
    world_size: int = 1
    zero_stage: int = 0
    nan_skips: int = 0  # steps skipped for a non-finite loss or gradient (both count)
    grad_skips: int = 0  # of which for a non-finite gradient under a finite loss
    rows_replaced: int = 0  # rows the processor rejected at read time, replaced in their batch
    data_order: dict = field(default_factory=dict)  # what the epoch order depends on (sde_ray.data.order)

    def advance(self, global_batch_size: int, epoch: int, epoch_rows: int) -> None:
        """One optimizer step done on a global batch; the stream now stands at (epoch, epoch_rows)."""
        self.step += 1
        self.samples += global_batch_size
        self.epoch, self.epoch_rows = epoch, epoch_rows

    @classmethod
    def read(cls, directory: str | os.PathLike) -> TrainState:
        data = json.loads((Path(directory) / STATE).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG this process draws from, as plain tensors (loadable with `weights_only=True`)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        # position, has_gauss, cached gaussian (a float64 carries the int fields exactly)
        "numpy_rest": torch.tensor([position, has_gauss, cached], dtype=torch.float64, device="cpu"),
        "python": torch.tensor(python_state, dtype=torch.int64, device="cpu"),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64, device="cpu"),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    position, has_gauss, cached = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(position),
                         int(has_gauss), cached))
    gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), gauss[0] if gauss else None))
    if "cuda" in state and torch.cuda.is_available():
        # One state per device; a resume on fewer visible devices restores the ones it has.
        devices = min(len(state["cuda"]), torch.cuda.device_count())
        torch.cuda.set_rng_state_all(list(state["cuda"][:devices]))


def restore_rng(directory: str | os.PathLike, rank: int) -> None:
    rng_file = Path(directory) / RNG_DIR / f"rank_{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Full weights of the engine's module on rank 0 (None elsewhere). A collective under ZeRO-3."""
    if engine.zero_optimization_partition_weights():
        # Gathers one layer at a time from every rank's partition; all ranks must call it.
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if get_rank() == 0 else None
    if state is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_checkpoint(directory: str | os.PathLike, engine, state: TrainState, config: Config, rank: int) -> None:
    """Writes this rank's part of a checkpoint into `directory` (every rank calls it); `config` is
    recorded in state.json as its JSON tree."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    weights = consolidated_state_dict(engine)
    (directory / RNG_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), directory / RNG_DIR / f"rank_{rank}.pt")
    if rank == 0:
        torch.save(weights, directory / CONSOLIDATED)
        (directory / STATE).write_text(json.dumps({**asdict(state), "config": to_dict(config)}, indent=1))
    write_manifest(directory, rank)


@dataclass
class ResumePlan:
    state: TrainState
    exact: bool  # DeepSpeed load_checkpoint (optimizer too) vs consolidated weights only
    directory: Path


def resume_plan(directory: str | os.PathLike, world_size: int, zero_stage: int) -> ResumePlan:
    verify_checkpoint(directory)  # before anything in it is read, DeepSpeed's pickles included
    state = TrainState.read(directory)
    exact = state.world_size == world_size and state.zero_stage == zero_stage
    return ResumePlan(state=state, exact=exact, directory=Path(directory))


def match_shapes(weights: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`weights` with each tensor viewed in the module's shape where only the shape differs
    (0-dim parameters travel through DeepSpeed as shape (1,))."""
    own = module.state_dict()
    return {
        key: value.reshape(own[key].shape) if key in own and value.shape != own[key].shape
        and value.numel() == own[key].numel() else value
        for key, value in weights.items()
    }


def load_consolidated(module: torch.nn.Module, directory: str | os.PathLike) -> None:
    """Loads the consolidated weights into a plain (not yet DeepSpeed-wrapped) module."""
    weights = torch.load(Path(directory) / CONSOLIDATED, map_location="cpu", weights_only=True)
    module.load_state_dict(match_shapes(weights, module))


def restore_engine(engine, plan: ResumePlan, rank: int) -> None:
    """Exact resume: DeepSpeed weights, optimizer and scheduler; else only the step counters."""
    if plan.exact:
        load_path, _ = engine.load_checkpoint(str(plan.directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {plan.directory / DEEPSPEED_DIR}")
        restore_rng(plan.directory, rank)
    else:
        engine.global_steps = plan.state.step
        engine.global_samples = plan.state.samples
        if engine.lr_scheduler is not None and plan.state.step > 0:
            # DeepSpeed steps the scheduler once per optimizer step, starting from iteration -1.
            engine.lr_scheduler.step(plan.state.step - 1)
