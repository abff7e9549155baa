"""The Ray Train worker loop: one DeepSpeed engine per worker, read top to bottom like nanoGPT.

`train_loop_per_worker({"config": Config, "args": RunArgs})` runs on every worker of the TorchTrainer
(Ray has already set up the gloo/NCCL process group); the typed config and the run arguments arrive
as they left the driver (pickled), never as strings or plain dicts:

1. build the encoder and the objective as one module (objective parameters train too);
2. resume from `ray.train.get_checkpoint()`: exact DeepSpeed state when the world size matches,
   consolidated weights otherwise (an elastic resize); the data stream starts at the saved step of
   the epoch order (`sde_ray.train.data`), reading nothing before it;
3. `deepspeed.initialize` with the JSON derived from the config;
4. per optimizer step: this worker's local batch (global / world rows) of the epoch order →
   `step.train_step` (chunked encode, the objective once on the global batch, non-finite loss and
   gradient checks agreed by all ranks, one optimizer step; a non-finite step is skipped whole); the temperature
   clamped in place after the step;
5. per optimizer step: metrics (averaged over ranks) every `log_every`, validation P@1 every
   `eval_every` (every rank encodes its share on its device, see `sde_ray.eval.sharded`), a
   checkpoint every `checkpoint_every`;
6. at the end: spectrum plot, final checkpoint, `save_pretrained` export (rank 0). The full MMEB
   evaluation is not run here: the driver runs it on the eval actors after `fit()` returns, so no
   rank ever waits in a collective while another evaluates.

Every `ray.train.report` is a barrier, so each rank reports under the same step conditions.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from sde_ray.config import Config, TrainConfig
from sde_ray.eval.plots import plot_spectrum
from sde_ray.eval.runner import validation_p_at_1 as evaluate_validation
from sde_ray.losses import StepContext
from sde_ray.losses.infonce import duplicate_groups, ids_with_negatives
from sde_ray.models import BatchProcessor, load_trained_weights
from sde_ray.distributed import all_reduce, broadcast_object, mean_over_ranks
from sde_ray.runs import RunLogger, say
from sde_ray.spectral import spectral_snapshot, spectrum_rule
from sde_ray.train.checkpoint import (
    ResumePlan,
    TrainState,
    base_identity,
    check_resume_base,
    consolidated_state_dict,
    has_frozen,
    load_consolidated,
    restore_engine,
    resume_plan,
    save_checkpoint,
)
from sde_ray.train.checkpoint_store import newer_checkpoint
from sde_ray.train.data import REPLACED, SAMPLE_ID, batch_stream
from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size
# Built without Ray in `engine` (the device check builds them too); imported here for the loop and its callers.
from sde_ray.train.engine import TrainModule, build_engine, build_train_module, seed_everything  # noqa: F401
from sde_ray.train.step import train_step
from sde_ray.train.preemption import stop_requested

# Keys of a processed batch that are not model inputs.
TARGET_ID_KEY = "target_id"
QUERY_ID_KEY = "query_id"


@dataclass(frozen=True)
class RunArgs:
    """What a worker needs besides the Config, computed once on the driver (`driver.build_trainer`)."""

    run_id: str  # wandb run id, stable across worker-group restarts
    wandb_mode: str  # resolved on the driver, where WANDB_API_KEY is known
    step_hook: Callable[..., None] | None = None  # step_hook(step=, rank=, world_size=, module=, ...)
    train_data: Any = None  # sde_ray.train.data.TrainData: the shards, processor and epoch order
    resume_dir: str | None = None  # newest complete checkpoint on storage (checkpoint_store.prepare_resume)
    preemption: Any = None  # the flag actor a SIGTERM on the driver raises (train.preemption)
    data_counts: dict = field(default_factory=dict)  # what the data stage left out
    val_root: str | None = None  # the split validated on (driver.val_root_of); None: no validation
    console: Any = None  # train.console.ConsoleRelay to the driver's progress bar; None: stdout only


# The schedule of one optimizer step's aftermath (torchtitan-style): what happens after step `step`.
def should_log(step: int, train: TrainConfig) -> bool:
    return step % train.log_every == 0 or step == train.max_steps


def should_validate(step: int, train: TrainConfig, val_root: str | None) -> bool:
    return bool(val_root) and train.eval_every > 0 and step % train.eval_every == 0


def should_checkpoint(step: int, train: TrainConfig) -> bool:
    return step % train.checkpoint_every == 0 or step == train.max_steps


def clamp_temperatures(engine) -> None:
    """Clamps every learnable temperature in place after an optimizer step (open_clip's rule).

    Clamping the parameter, not its value in the forward pass, keeps the gradient alive at the
    bound. Under ZeRO the optimizer's fp32 master copy is what the next step starts from, so it is
    clamped too (`safe_get/set_full_fp32_param`, a gather under ZeRO-3: every rank calls this).
    """
    from sde_ray.losses.objectives import Temperature

    for temperature in (m for m in engine.module.modules() if isinstance(m, Temperature)):
        parameter = temperature.log_scale
        if not isinstance(parameter, torch.nn.Parameter) or not parameter.requires_grad:
            continue
        low, high = temperature.bounds
        with torch.no_grad():
            if engine.zero_optimization_stage() > 0:
                from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

                master = safe_get_full_fp32_param(parameter)
                if master is not None:
                    safe_set_full_fp32_param(parameter, master.clamp(low, high))
            local = getattr(parameter, "ds_tensor", None)  # ZeRO-3: this rank's partition
            (local if local is not None else parameter.data).clamp_(low, high)


def call_hook(hook: Callable[..., None], **values) -> None:
    """`hook(**values)` with the keyword arguments its signature accepts (older hooks take fewer)."""
    import inspect

    parameters = inspect.signature(hook).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        values = {k: v for k, v in values.items() if k in parameters}
    hook(**values)


def notice(args: RunArgs, message: str) -> None:
    """A line the user must see: the worker's log, and the driver's console through the relay."""
    say(message)
    if args.console is not None:
        args.console.notice(message)


def check_order(state: TrainState, spec: dict, rank: int, args: RunArgs) -> None:
    """Warns when a checkpoint was written under another epoch order (other shards, seed, window or
    global batch): the resume continues, but not on the uninterrupted run's rows."""
    if state.data_order and state.data_order != spec and rank == 0:
        notice(args, f"[sde_ray] warning: the checkpoint's data order {state.data_order} differs from this "
                     f"run's {spec}; the resumed epoch is not the one the checkpointed run would have seen")


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Randomness for the objective, identical on every rank and reproducible after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def to_model_inputs(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors on the engine's device; float inputs in the engine's precision (pixels arrive as uint8
    and stay so: the model normalises them on its device). A VLM's padded patches are cut to the
    batch's largest image first (`trim_patches`): only those bytes cross to the device."""
    from sde_ray.models.vlm import trim_patches

    out = {}
    for key, value in trim_patches(batch).items():
        tensor = torch.as_tensor(value if isinstance(value, torch.Tensor) else np.asarray(value), device=device)
        out[key] = tensor.to(float_dtype) if tensor.is_floating_point() else tensor
    return out


# ---------------------------------------------------------------------------------------------
# Validation on every rank, export on rank 0


class TrainedModel:
    """The trained encoder, un-wrapped: on every rank's device for validation, on rank 0 for export,
    in the training dtype.

    Unpartitioned weights (ZeRO-0/1/2) are the engine's module itself. Under ZeRO-3 a copy is built
    from the config (the frozen base as loaded) and only the trainable weights are gathered into it:
    on every rank's device for validation (a cached copy; a collective), on rank 0's CPU for export.
    """

    def __init__(self, config: Config, engine, rank: int):
        self.config, self.engine, self.rank = config, engine, rank
        self.device_copy: TrainModule | None = None

    def for_validation(self) -> torch.nn.Module:
        """The encoder on this rank's device. Every rank must call it (ZeRO-3 gathers)."""
        module = self.engine.module
        if not self.engine.zero_optimization_partition_weights():
            return module.model
        import deepspeed

        if self.device_copy is None:
            self.device_copy = build_train_module(self.config).to(self.engine.device, next(module.parameters()).dtype)
        # The frozen weights are the base's in both: only the trained ones are gathered and copied.
        copies = dict(self.device_copy.named_parameters())
        trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in trained], modifier_rank=None):
            with torch.no_grad():
                for name, source in trained:
                    copies[name].copy_(source.data.reshape(copies[name].shape))
        return self.device_copy.model

    def for_export(self) -> torch.nn.Module | None:
        """The encoder to export on rank 0 (None elsewhere), in the training dtype, to be saved
        `in_place` (a LoRA merge needs no second copy of the backbone): export it after the last
        checkpoint. Every rank must call it (ZeRO-3 gathers the trainable weights)."""
        if not self.engine.zero_optimization_partition_weights():
            return self.engine.module.model if self.rank == 0 else None
        weights = consolidated_state_dict(self.engine, trainable_only=has_frozen(self.engine.module), copy=False)
        if self.rank != 0:
            return None
        dtype = next(self.engine.module.parameters()).dtype
        copy = build_train_module(self.config).to(dtype)
        load_trained_weights(copy, weights, verify_base=False)  # the frozen part: the base, as trained on
        return copy.model


def validation_p_at_1(model: torch.nn.Module, processor, val_root: str, config: Config, rank: int,
                      world_size: int) -> float:
    """Validation P@1, every rank encoding its share under the training precision (same value on all)."""

    was_training = model.training
    model.eval()
    try:
        return float(evaluate_validation(model, processor, val_root, max_queries=config.eval.val_queries,
                                         batch_size=config.eval.batch_size, rank=rank, world_size=world_size,
                                         precision=config.deepspeed.precision))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The loop


def _report(metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


def _checkpoint_and_report(engine, state: TrainState, config: Config, rank: int, metrics: dict, launch: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sde_ray_ckpt_") as directory:
        save_checkpoint(directory, engine, state, config, rank)
        _report(metrics, directory, name=f"checkpoint_{state.step:06d}_{launch}")


def train_loop_per_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs; `loop_config` is `{"config": Config, "args": RunArgs}`
    as built by `driver.build_trainer` (Ray Train passes a dict)."""
    config: Config = loop_config["config"]
    args: RunArgs = loop_config["args"]
    if not config.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train = config.train
    output_dir = config.train.output_dir
    val_root, step_hook = args.val_root, args.step_hook
    seed_everything(train.seed)

    # 1-2. Model + objective (the same initial weights on every rank), and where to resume from.
    module = build_train_module(config)
    # The frozen weights' source and hash, which checkpoints record instead of the weights: rank 0
    # hashes them once, before ZeRO-3 partitions them (`checkpoint.base_identity`).
    base = base_identity(config, module.model) if rank == 0 else {}
    # Then one seed per rank: dropout and other module randomness differ across data-parallel ranks
    # (an exact resume restores each rank's RNG state from the checkpoint instead).
    seed_everything(train.seed + rank)
    resume_stack = contextlib.ExitStack()
    plan: ResumePlan | None = None
    checkpoint = ray.train.get_checkpoint()
    resume_dir = newer_checkpoint(checkpoint and resume_stack.enter_context(checkpoint.as_directory()),
                                  args.resume_dir)  # Ray's, or a newer unregistered one
    if resume_dir is not None:
        plan = resume_plan(resume_dir, world_size, config.deepspeed.zero_stage)
        check_resume_base(plan, base, rank, world_size)
        if not plan.exact:
            load_consolidated(module, plan)

    # 3. DeepSpeed.
    ds_config = build_deepspeed_config(config, world_size)
    if rank == 0:
        overrides = f" (overrides applied: {json.dumps(config.deepspeed.overrides)})" if config.deepspeed.overrides else ""
        say(f"[sde_ray] world size {world_size}; DeepSpeed config{overrides}:\n{json.dumps(ds_config, indent=1)}")
    engine = build_engine(module, ds_config)
    state = TrainState(world_size=world_size, zero_stage=config.deepspeed.zero_stage)
    if plan is not None:
        restore_engine(engine, plan, rank)
        state = TrainState(**{**plan.state.__dict__, "world_size": world_size, "zero_stage": config.deepspeed.zero_stage})
        if rank == 0:
            how = "exact DeepSpeed state" if plan.exact else (
                f"consolidated weights, fresh optimizer state (world size {plan.state.world_size} -> {world_size})")
            notice(args, f"[sde_ray] resumed at step {state.step} from {plan.directory.name}: {how}")
    state.base = base
    resume_stack.close()
    float_dtype = next(engine.module.parameters()).dtype

    # Data: this worker's rows of the epoch order, positioned after the rows the checkpoint consumed
    # (nothing before that position is read or decoded).
    chunk = chunk_size(config, world_size)  # GradCache: rows per encoder forward
    train_data = args.train_data
    check_order(state, train_data.spec(), rank, args)
    state.data_order = train_data.spec()
    stream = batch_stream(train_data, rank, world_size, state.epoch, state.epoch_rows,
                          lookahead=config.data.epoch_lookahead, batches_left=train.max_steps - state.step)

    launch = broadcast_object(uuid.uuid4().hex[:8], world_size)  # unique checkpoint names per attempt
    logger = RunLogger(config, output_dir, args.run_id, args.wandb_mode, state.step,
                       console=args.console) if rank == 0 else None
    trained = TrainedModel(config, engine, rank)
    processor = None
    if val_root:
        processor = BatchProcessor(config.model)

    # 4-5. Train.
    window: dict[str, float] = {}
    window_count, window_start, window_samples = 0, time.time(), 0
    consecutive_nan = 0
    replaced_rows = 0  # this rank's rows that stood in for read-time rejects, since the last sync
    last_features = None
    final_metrics: dict[str, float] = {}
    engine.train()
    while state.step < train.max_steps:
        local_batch = stream.next()  # this worker's rows of the global batch of this step
        sample_ids = local_batch.pop(SAMPLE_ID)
        replaced_rows += int(local_batch.pop(REPLACED).sum())
        batch = to_model_inputs(local_batch, engine.device, float_dtype)
        result = train_step(engine, batch, _step_context(config, state, rank, world_size, batch), chunk, world_size)
        window_samples += train.global_batch_size
        if not result.finite:
            # Skipped whole on every rank: neither our step count nor DeepSpeed's moves, so the run
            # continues as one without this batch.
            consecutive_nan += 1
            state.nan_skips += 1
            state.grad_skips += result.skipped == "gradient"
            message = f"non-finite {result.skipped} at step {state.step + 1} on at least one rank"
            if train.nan_policy == "raise" or consecutive_nan > train.max_nan_skips:
                raise FloatingPointError(
                    f"{message}; train.nan_policy={train.nan_policy}, {consecutive_nan} consecutive "
                    f"(train.max_nan_skips={train.max_nan_skips})"
                )
            if rank == 0:
                notice(args, f"[sde_ray] {message}: skipped ({consecutive_nan}/{train.max_nan_skips})")
            continue
        consecutive_nan = 0
        clamp_temperatures(engine)  # the optimizer stepped
        for key, value in {**result.metrics, "loss": result.loss}.items():
            window[key] = window.get(key, 0.0) + float(value)
        window_count += 1
        last_features = (result.query, result.target)
        step_losses = [result.loss]
        state.step += 1
        state.samples += train.global_batch_size
        state.epoch, state.epoch_rows = stream.epoch, stream.epoch_rows

        is_last = state.step == train.max_steps
        do_log = should_log(state.step, train)
        do_eval = should_validate(state.step, train, val_root)
        do_checkpoint = should_checkpoint(state.step, train)
        if do_log or do_eval or do_checkpoint:
            replaced_rows = _count_replaced(state, replaced_rows, world_size)
            report = _step_metrics(window, window_count, config, rank, world_size, last_features)
            elapsed = max(time.time() - window_start, 1e-9)
            report.update(step=state.step, epoch=state.epoch, samples=state.samples, world_size=world_size,
                          lr=float(engine.get_lr()[0]), samples_per_s=window_samples / elapsed,
                          steps_per_s=(window_samples / train.global_batch_size) / elapsed, nan_skips=state.nan_skips,
                          grad_skips=state.grad_skips,
                          data_rows_replaced=state.rows_replaced,  # rejected while reading, this run
                          **args.data_counts)  # shards skipped, rows the converter rejected
            if do_eval:
                report["val_p_at_1"] = validation_p_at_1(trained.for_validation(), processor, val_root, config,
                                                         rank, world_size)
            if logger is not None:
                logger.log(state.step, report)
            if do_checkpoint and not is_last:
                _checkpoint_and_report(engine, state, config, rank, report, launch)
            elif not is_last:
                _report(report)
            final_metrics = report
            window, window_count, window_start, window_samples = {}, 0, time.time(), 0
        if step_hook is not None:
            call_hook(step_hook, step=state.step, rank=rank, world_size=world_size, module=engine.module,
                      sample_ids=sample_ids.tolist(), epoch=stream.epoch, losses=step_losses)
        if state.step < train.max_steps and stop_requested(args.preemption, rank, world_size):
            replaced_rows = _count_replaced(state, replaced_rows, world_size)
            _checkpoint_and_report(engine, state, config, rank, {**final_metrics, "step": state.step,
                                                                 "samples": state.samples, "preempted": 1}, launch)
            return  # SIGTERM on the driver: stopped at this step boundary with a checkpoint

    # 6. Spectrum, export, final checkpoint (the driver evaluates the export after fit()).
    if not final_metrics and logger is not None:
        # A relaunch of a finished run trains no step: its summary is the last logged one (what
        # `sde-ray compare` records), not an empty one.
        final_metrics = logger.last_logged()
    summary: dict[str, Any] = dict(final_metrics)
    replaced_rows = _count_replaced(state, replaced_rows, world_size)
    summary.update(step=state.step, samples=state.samples, world_size=world_size,
                   data_rows_replaced=state.rows_replaced)
    if last_features is not None:
        rule = spectrum_rule(config.spectral)
        _, spectra = spectral_snapshot(last_features[0], last_features[1], rule, rank, world_size)
        if rank == 0:
            path = plot_spectrum(spectra, Path(output_dir) / "plots" / "spectrum.png",
                                 title=f"{config.loss.name}: singular values at step {state.step}")
            logger.log_image("spectrum", str(path), state.step)
    export_dir = Path(output_dir) / "model"
    if rank == 0:  # Ray keeps rank 0's metrics only
        summary["model_dir"] = str(export_dir)
        # Where and when training ended: the driver's evaluation starts after it (tests check it).
        summary.update(train_worker_pid=os.getpid(), train_finished_at=time.time())
        if torch.device(engine.device).type == "cuda":
            summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(engine.device) / 2**30
    if logger is not None:
        logger.finish(dict(summary))
    # Always a checkpoint: Ray Train keeps the metrics of checkpointed reports only (the Result's).
    _checkpoint_and_report(engine, state, config, rank, summary, launch)
    # The export comes last: it merges LoRA into the weights it is given in place (under ZeRO-0/1/2
    # the engine's own), in the training dtype, with no second copy of the backbone. The driver
    # evaluates it after fit() returns, i.e. after every worker is past this line.
    model = trained.for_export()
    if model is not None:
        model.save_pretrained(str(export_dir), in_place=True)


def _count_replaced(state: TrainState, replaced_rows: int, world_size: int) -> int:
    """Adds every rank's count of replaced rows since the last sync to `state.rows_replaced` (one
    all-reduce; all ranks call it at the same steps) and returns the new local count, 0."""
    state.rows_replaced += int(all_reduce(torch.tensor([replaced_rows], dtype=torch.int64, device="cpu"), world_size).item())
    return 0


def _step_context(config: Config, state: TrainState, rank: int, world_size: int, batch: dict):
    target_ids, negative_ids = batch.get(TARGET_ID_KEY), batch.get("neg_target_id")
    if (config.loss.duplicate_targets != "ignore" and config.loss.duplicate_key == "pair"
            and target_ids is not None and QUERY_ID_KEY in batch):
        # Rows that share a query share their positives too (one all-gather of the ids, every rank).
        target_ids, negative_ids = duplicate_groups(batch[QUERY_ID_KEY], target_ids, rank, world_size, negative_ids)
    return StepContext(
        progress=state.step / config.train.max_steps,
        rank=rank,
        world_size=world_size,
        training=True,
        # With explicit negatives: one id per target row, in the objectives' per-query layout.
        target_ids=ids_with_negatives(target_ids, negative_ids),
        generator=step_generator(config.train.seed, state.step, 0),
    )


def _step_metrics(window: dict[str, float], count: int, config: Config, rank: int, world_size: int,
                  last_features) -> dict[str, float]:
    """Window means of the objective's metrics, averaged over ranks, plus spectral diagnostics
    for objectives that do not compute them (the InfoNCE baseline logs the same numbers as SDE)."""
    local = {k: v / max(count, 1) for k, v in window.items()}
    if last_features is not None and "effective_rank_q" not in local:
        rule = spectrum_rule(config.spectral)
        diagnostics, _ = spectral_snapshot(last_features[0], last_features[1], rule, rank, world_size)
        local.update(diagnostics)
    return mean_over_ranks(local, world_size)
