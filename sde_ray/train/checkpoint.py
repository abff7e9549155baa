"""Checkpoints: every rank's DeepSpeed shards + a consolidated copy of the weights + the run state.

Layout of one checkpoint directory (Ray merges every rank's files into it):

    deepspeed/state/...        DeepSpeed `save_checkpoint` (per-rank ZeRO shards, model states)
    consolidated.pt            the training module's (encoder + objective) weights that change, rank 0
    state.json                 step, samples consumed, epoch position, world size, ZeRO stage, config,
                               and the base the frozen weights come from (id + content hash)
    rng/rank_<r>.pt            torch CPU / CUDA, numpy and python RNG state of rank r, as tensors
    manifest/rank_<r>.json     sha256 of every file rank r wrote, written last (rank r's "complete" mark)

Nothing here is unpickled by our code: the RNG state and the weights are tensors loaded with
`weights_only=True`, the state is JSON. DeepSpeed's `load_checkpoint` does unpickle its own files
(optimizer state), so `verify_checkpoint` checks every file against the manifests before any load:
a file no rank wrote, an altered one or a missing one refuses the checkpoint, naming the path. A
checkpoint is complete when every rank of its world size left a manifest and every file verifies.

A checkpoint holds what training changes: the trainable parameters, the persistent buffers, the
optimizer and the objective's state (DeepSpeed's `exclude_frozen_parameters`). The frozen part (a
LoRA model's backbone, a frozen tower: 99 % of a 7B VLM under LoRA) is not copied into every
checkpoint; state.json names the base it comes from by id and by the content hash of the frozen
weights (`base_identity`, hashed once per launch on rank 0), and a resume or an export rebuilds it
from the base and refuses a different one. `train.checkpoint_frozen=true` writes it all (a
checkpoint that needs no base); a model without frozen parameters is always written whole.

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
from sde_ray.distributed import broadcast_object, get_rank
from sde_ray.models import check_base, load_trained_weights, weights_fingerprint
from sde_ray.models.build import match_shapes  # noqa: F401  (the loop's export and the tests use it)
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
    base: dict = field(default_factory=dict)  # the frozen weights' source and hash (`base_identity`); {}: none
    trainable_only: bool = False  # consolidated.pt and DeepSpeed's files lack the frozen weights

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


def saved_keys(module: torch.nn.Module) -> list[str]:
    """The state-dict keys a trainable-only checkpoint holds: trainable parameters (under every name a
    tied one has) and persistent buffers; the rest are the frozen parameters."""
    parameters = dict(module.named_parameters(remove_duplicate=False))
    return [key for key in module.state_dict() if key not in parameters or parameters[key].requires_grad]


def has_frozen(module: torch.nn.Module) -> bool:
    return any(not parameter.requires_grad for parameter in module.parameters())


def base_identity(config: Config, encoder: torch.nn.Module) -> dict:
    """The base a trainable-only checkpoint is trained on: the model ids of `config.model` and the
    content hash of the `encoder`'s frozen weights under their encoder-relative names
    (`models.weights_fingerprint`, what `eval` checks on the encoder it rebuilds); {} when nothing is
    frozen. Call it on the plain module (before ZeRO-3 partitions it), on one rank: it reads every
    frozen byte once."""
    state = encoder.state_dict()
    frozen = sorted(set(state) - set(saved_keys(encoder)))
    if not frozen:
        return {}
    model = config.model
    return {"name_or_path": model.name_or_path, "vision_name_or_path": model.vision_name_or_path,
            "text_name_or_path": model.text_name_or_path, "init_from": model.init_from,
            **weights_fingerprint((key, state[key]) for key in frozen)}


def _zero3_trainable_state_dict(module: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor] | None:
    """The `keys` of a ZeRO-3 module on rank 0's CPU, gathering only those parameters (one module's
    at a time), never the frozen ones. A collective: every rank calls it."""
    import deepspeed

    parameters = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    rank0 = get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    by_owner: dict[str, list[str]] = {}
    for key in keys:
        if key in parameters:
            by_owner.setdefault(key.rpartition(".")[0], []).append(key)
        elif rank0:
            state[key] = buffers[key].detach().cpu()
    for names in by_owner.values():
        with deepspeed.zero.GatheredParameters([parameters[k] for k in names], modifier_rank=None):
            if rank0:
                for key in names:
                    state[key] = parameters[key].detach().cpu().clone()
    return state if rank0 else None


def consolidated_state_dict(engine, trainable_only: bool = False, copy: bool = True) -> dict[str, torch.Tensor] | None:
    """The engine module's weights on rank 0 (None elsewhere): all of them, or with `trainable_only`
    the trainable parameters and buffers (`saved_keys`). A collective under ZeRO-3, where only the
    weights written are gathered. `copy=False` may return the live tensors (unpartitioned stages;
    for an immediate save)."""
    module = engine.module
    keys = saved_keys(module) if trainable_only else None
    if engine.zero_optimization_partition_weights():
        if keys is None:
            # Gathers one layer at a time from every rank's partition; all ranks must call it.
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = _zero3_trainable_state_dict(module, keys)
    elif get_rank() == 0:
        state = module.state_dict()
        state = state if keys is None else {key: state[key] for key in keys}
    else:
        state = None
    if state is None:
        return None
    return {k: v.detach().cpu().clone() if copy else v.detach().cpu() for k, v in state.items()}


def save_checkpoint(directory: str | os.PathLike, engine, state: TrainState, config: Config, rank: int) -> None:
    """Writes this rank's part of a checkpoint into `directory` (every rank calls it); `config` is
    recorded in state.json as its JSON tree. With a base (`state.base`, frozen weights) and
    `train.checkpoint_frozen` off, neither file holds the frozen weights."""
    directory = Path(directory)
    state.trainable_only = has_frozen(engine.module) and not config.train.checkpoint_frozen
    engine.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                           exclude_frozen_parameters=state.trainable_only)
    weights = consolidated_state_dict(engine, trainable_only=state.trainable_only, copy=False)
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


def load_consolidated(module: torch.nn.Module, plan: ResumePlan) -> None:
    """Loads the consolidated weights into a plain (not yet DeepSpeed-wrapped) module; a trainable-only
    checkpoint's frozen part stays as built (its base was checked by `check_resume_base`)."""
    weights = torch.load(plan.directory / CONSOLIDATED, map_location="cpu", weights_only=True)
    load_trained_weights(module, weights, plan.state.base, verify_base=False)


def check_resume_base(plan: ResumePlan, base: dict, rank: int, world_size: int) -> None:
    """Refuses, on every rank, to resume a trainable-only checkpoint onto another base than the one it
    was trained on. `base` is this launch's `base_identity`, computed on rank 0 only: the frozen
    weights are hashed once, not by every rank."""
    if not (plan.state.trainable_only and plan.state.base):
        return  # whole weights, or only the objective's frozen (built from the config, not a base)
    problem = None
    if rank == 0:
        try:
            check_base(base or {"sha256": "", "numel": 0}, plan.state.base)
        except ValueError as exc:
            problem = f"cannot resume from {plan.directory}: {exc}"
    problem = broadcast_object(problem, world_size)
    if problem:
        raise ValueError(problem)


def restore_engine(engine, plan: ResumePlan, rank: int) -> None:
    """Exact resume: DeepSpeed weights, optimizer and scheduler; else only the step counters."""
    if plan.exact:
        # Without the frozen weights in DeepSpeed's files, they stay as built from the base.
        load_path, _ = engine.load_checkpoint(str(plan.directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                              load_module_strict=not plan.state.trainable_only)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {plan.directory / DEEPSPEED_DIR}")
        restore_rng(plan.directory, rank)
    else:
        engine.global_steps = plan.state.step
        engine.global_samples = plan.state.samples
        if engine.lr_scheduler is not None and plan.state.step > 0:
            # DeepSpeed steps the scheduler once per optimizer step, starting from iteration -1.
            engine.lr_scheduler.step(plan.state.step - 1)
