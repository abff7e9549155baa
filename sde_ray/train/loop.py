"""The Ray Train worker: `start` → `fit` → `finish`, the loop read top to bottom like nanoGPT.

`train_loop_per_worker({"config": Config, "args": RunArgs})` runs on every worker of the TorchTrainer
(Ray has already set up the gloo/NCCL process group); the typed config and the run arguments arrive
as they left the driver (pickled), never as strings or plain dicts. Ray itself stays behind a
`train.session.Session` (rank, world size, the handed checkpoint, `report`, the stop flag), so the
same three functions run under a `LocalSession` in one process:

- `start(config, args, session)`: the encoder and the objective as one module (objective parameters
  train too) in a DeepSpeed engine, resumed in one call (`resume`: exact DeepSpeed state when the
  world size and ZeRO stage match, consolidated weights otherwise, an elastic resize); the data
  stream at the saved position of the epoch order (`sde_ray.train.data`), reading nothing before it;
  and the loop's components, each owning its state: the step meter (`train.meter`), the cadence
  (`train.cadence`), the non-finite guard (`train.grad_guard`);
- `fit(run)`, per optimizer step: this worker's local batch (global / world rows) → `step.train_step`
  (chunked encode, the objective once on the global batch, one optimizer step; a non-finite loss or
  gradient is skipped whole on every rank) → the guard's policy → the temperature clamped → the
  state advanced → the meter → the cadence's log / validation P@1 (every rank encodes its share,
  see `sde_ray.eval.sharded`) / checkpoint (every `checkpoint_every` steps and every
  `checkpoint_every_minutes`, uploaded in the background under `checkpoint_upload=async`) / report
  → the step hook and, at the cadence's steps (`train.stop_check_every`, every logged step), the
  preemption flag;
- `finish(run)`: spectrum plot, final checkpoint with the run's summary, then the `save_pretrained`
  export (rank 0; LoRA merged in place, so it comes after the last checkpoint). The full MMEB
  evaluation is not run here: the driver runs it on the eval actors after `fit()` returns, so no
  rank ever waits in a collective while another evaluates.

Every report is a barrier (`ray.train.report`), so each rank reports under the same step conditions.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sde_ray import storage
from sde_ray.config import Config
from sde_ray.eval.validation import validation_p_at_1
from sde_ray.losses import StepContext
from sde_ray.losses.batch import step_target_ids
from sde_ray.models import BatchProcessor, load_trained_weights, to_model_inputs
from sde_ray.distributed import broadcast_object
from sde_ray.runs import RunLogger, say
from sde_ray.train.cadence import Cadence, Due
from sde_ray.train.checkpoint import (
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
from sde_ray.train.engine import (  # noqa: F401
    PartitionedEncoder, TrainModule, build_engine, build_train_module, gathered, seed_everything)
from sde_ray.train.grad_guard import NonFiniteGuard
from sde_ray.train.meter import StepMeter
from sde_ray.train.session import RaySession, Session
from sde_ray.train.step import train_step

# Keys of a processed batch that are not model inputs.
TARGET_ID_KEY = "target_id"
QUERY_ID_KEY = "query_id"
NEGATIVE_ID_KEY = "neg_target_id"


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


# ---------------------------------------------------------------------------------------------
# Validation on every rank, export on rank 0


class TrainedModel:
    """The trained encoder, un-wrapped: on every rank's device for validation, on rank 0 for export,
    in the training dtype.

    It is the engine's module itself for validation, partitioned or not: under ZeRO-3 its forwards
    gather each layer's weights as training's do (every rank runs the same forwards, `partitioned`),
    so no rank ever holds the whole model. For export under ZeRO-3, a copy is built from the config
    (the frozen base as loaded) on rank 0's CPU and only the trainable weights are gathered into it.
    """

    def __init__(self, config: Config, engine, rank: int):
        self.config, self.engine, self.rank = config, engine, rank

    @property
    def partitioned(self) -> bool:
        """ZeRO-3: the weights are partitioned over the ranks and every forward is a collective."""
        return bool(self.engine.zero_optimization_partition_weights())

    def for_validation(self) -> torch.nn.Module:
        """The encoder on this rank's device (ZeRO-3: partitioned, run through the engine; every rank
        must run it alike)."""
        return PartitionedEncoder(self.engine) if self.partitioned else self.engine.module.model

    def for_export(self) -> torch.nn.Module | None:
        """The encoder to export on rank 0 (None elsewhere), in the training dtype, to be saved
        `in_place` (a LoRA merge needs no second copy of the backbone): export it after the last
        checkpoint. Every rank must call it (ZeRO-3 gathers the trainable weights)."""
        if not self.partitioned:
            return self.engine.module.model if self.rank == 0 else None
        weights = consolidated_state_dict(self.engine, trainable_only=has_frozen(self.engine.module), copy=False)
        if self.rank != 0:
            return None
        dtype = next(self.engine.module.parameters()).dtype
        copy = build_train_module(self.config).to(dtype)
        load_trained_weights(copy, weights, verify_base=False)  # the frozen part: the base, as trained on
        return copy.model


def validate(model: torch.nn.Module, processor, val_root: str, config: Config, rank: int, world_size: int,
             partitioned: bool = False) -> float:
    """Validation P@1, every rank encoding its share under the training precision (same value on all).
    `partitioned` (ZeRO-3): every rank runs as many forwards as the largest share needs."""
    was_training = model.training
    model.eval()
    try:
        return float(validation_p_at_1(model, processor, val_root, max_queries=config.eval.val_queries,
                                       batch_size=config.eval.batch_size, rank=rank, world_size=world_size,
                                       precision=config.deepspeed.precision, equal_shares=partitioned))
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# The worker: start -> fit -> finish


@dataclass
class Run:
    """One worker's training run, as `start` built it: what `fit` and `finish` work on."""

    config: Config
    args: RunArgs
    session: Session
    engine: Any
    state: TrainState
    stream: Any  # train.data.BatchStream: this worker's local batches, from the resumed position
    meter: StepMeter
    cadence: Cadence
    guard: NonFiniteGuard
    trained: TrainedModel
    logger: RunLogger | None  # rank 0's sinks
    launch: str  # unique checkpoint names per attempt
    processor: Any = None  # validation's batch processor (None: no validation split)
    last_metrics: dict = field(default_factory=dict)  # the last logged row

    @property
    def rank(self) -> int:
        return self.session.rank

    @property
    def world_size(self) -> int:
        return self.session.world_size

    def notice(self, message: str) -> None:
        if self.rank == 0:
            notice(self.args, message)


def train_loop_per_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs; `loop_config` is `{"config": Config, "args": RunArgs}`
    as built by `driver.build_trainer` (Ray Train passes a dict)."""
    args: RunArgs = loop_config["args"]
    run = start(loop_config["config"], args, RaySession(args.preemption))
    if fit(run):
        finish(run)


def start(config: Config, args: RunArgs, session: Session) -> Run:
    """Builds the engine (resumed when a checkpoint exists), the data stream at the resumed position,
    the logger and the loop's components."""
    if not config.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    engine, state = resume(config, args, session)
    train_data = args.train_data
    check_order(state, train_data.spec(), session.rank, args)
    state.data_order = train_data.spec()
    # This worker's rows of the epoch order, after the rows the checkpoint consumed (none read before).
    stream = batch_stream(train_data, session.rank, session.world_size, state.epoch, state.epoch_rows,
                          lookahead=config.data.epoch_lookahead, batches_left=config.train.max_steps - state.step)
    return assemble(config, args, session, engine, state, stream)


def assemble(config: Config, args: RunArgs, session: Session, engine, state: TrainState, stream) -> Run:
    """The run around a (resumed) engine and its stream: the logger (rank 0) and the loop's components."""
    rank, world_size = session.rank, session.world_size
    logger = RunLogger(config, config.train.output_dir, args.run_id, args.wandb_mode, state.step,
                       console=args.console) if rank == 0 else None
    engine.train()
    return Run(config=config, args=args, session=session, engine=engine, state=state, stream=stream,
               meter=StepMeter(config.spectral, config.train.global_batch_size, rank, world_size),
               cadence=Cadence.of(config, validating=bool(args.val_root), world_size=world_size),
               guard=NonFiniteGuard(config.train.nan_policy, config.train.max_nan_skips),
               trained=TrainedModel(config, engine, rank), logger=logger,
               launch=broadcast_object(uuid.uuid4().hex[:8], world_size),
               processor=BatchProcessor(config.model) if args.val_root else None)


def resume(config: Config, args: RunArgs, session: Session) -> tuple[Any, TrainState]:
    """The DeepSpeed engine and the run state, from the newest checkpoint when there is one (Ray's,
    or a newer complete one the driver found on storage): exact DeepSpeed state when the world size
    and ZeRO stage match, consolidated weights and a fresh optimizer otherwise (an elastic resize)."""
    rank, world_size, train = session.rank, session.world_size, config.train
    seed_everything(train.seed)
    ds_config = build_deepspeed_config(config, world_size)
    # The same initial weights on every rank (under `deepspeed.zero_init`, each rank's partition of them).
    module = build_train_module(config, ds_config=ds_config)
    # The frozen weights' source and hash, which checkpoints record instead of the weights: rank 0
    # hashes them once, before ZeRO-3 partitions them (`checkpoint.base_identity`; already partitioned
    # under zero_init: every rank gathers the frozen ones for it).
    with gathered([p for p in module.model.parameters() if not p.requires_grad]):
        base = base_identity(config, module.model) if rank == 0 else {}
    # Then one seed per rank: dropout and other module randomness differ across data-parallel ranks
    # (an exact resume restores each rank's RNG state from the checkpoint instead).
    seed_everything(train.seed + rank)
    fresh = TrainState(world_size=world_size, zero_stage=config.deepspeed.zero_stage, base=base)
    with session.resume_checkpoint() as offered_by_ray:
        directory = newer_checkpoint(offered_by_ray, args.resume_dir)
        plan = resume_plan(directory, world_size, config.deepspeed.zero_stage) if directory else None
        if plan is not None:
            # A trainable-only checkpoint goes onto the base it was trained on, or not at all (every rank).
            check_resume_base(plan, base, rank, world_size)
            if not plan.exact:  # trainable-only: onto the frozen part as built
                with gathered(list(module.parameters()), modifier_rank=0):  # zero_init: rank 0's load, partitioned
                    load_consolidated(module, plan)
        if rank == 0:
            overrides = (f" (overrides applied: {json.dumps(config.deepspeed.overrides)})"
                         if config.deepspeed.overrides else "")
            say(f"[sde_ray] world size {world_size}; DeepSpeed config{overrides}:\n{json.dumps(ds_config, indent=1)}")
        engine = build_engine(module, ds_config)
        if plan is None:
            return engine, fresh
        restore_engine(engine, plan, rank)
    state = TrainState(**{**plan.state.__dict__, "world_size": world_size, "zero_stage": fresh.zero_stage,
                          "base": base})  # this launch's base (rank 0's; checked equal to the recorded one)
    if rank == 0:
        how = "exact DeepSpeed state" if plan.exact else (
            f"consolidated weights, fresh optimizer state (world size {plan.state.world_size} -> {world_size})")
        notice(args, f"[sde_ray] resumed at step {state.step} from {plan.directory.name}: {how}")
    return engine, state


def fit(run: Run) -> bool:
    """Trains to `train.max_steps`; False when the driver asked to stop (a checkpoint was written)."""
    config, state, engine, meter = run.config, run.state, run.engine, run.meter
    chunk = chunk_size(config, run.world_size)  # GradCache: rows per encoder forward
    float_dtype = next(engine.module.parameters()).dtype
    while state.step < config.train.max_steps:
        local_batch = run.stream.next()  # this worker's rows of the global batch of this step
        sample_ids = local_batch.pop(SAMPLE_ID)
        meter.batch(int(local_batch.pop(REPLACED).sum()))
        batch = to_model_inputs(local_batch, engine.device, float_dtype)
        result = train_step(engine, batch, step_context(config, state, run.rank, run.world_size, batch), chunk,
                            run.world_size, config.train.chunk_tokens)
        skipped = run.guard.check(result, state)  # raises under nan_policy=raise or too many in a row
        if skipped:  # skipped whole on every rank: the run continues as one without this batch
            run.notice(skipped)
            continue
        clamp_temperatures(engine)  # the optimizer stepped
        meter.step(result)
        state.advance(config.train.global_batch_size, run.stream.epoch, run.stream.epoch_rows)
        due = run.cadence.at(state.step)
        after_step(run, due)
        if run.args.step_hook is not None:
            call_hook(run.args.step_hook, step=state.step, rank=run.rank, world_size=run.world_size,
                      module=engine.module, sample_ids=sample_ids.tolist(), epoch=run.stream.epoch,
                      losses=[result.loss])
        if due.stop_check and run.session.stop_requested():  # at the cadence's steps, on every rank alike
            meter.sync_replaced(state)
            checkpoint_and_report(run, {**run.last_metrics, "step": state.step, "samples": state.samples,
                                        "preempted": 1})
            return False  # SIGTERM on the driver: stopped at this step boundary with a checkpoint
    return True


def after_step(run: Run, due: Due) -> None:
    """The cadence's work after a step: the window's metrics logged, validated, reported to Ray
    (with a checkpoint when due); every rank runs it at the same steps (collectives inside)."""
    if not due.log:
        return
    state = run.state
    run.meter.sync_replaced(state)
    report = run.meter.window_metrics()
    report.update(step=state.step, epoch=state.epoch, samples=state.samples, world_size=run.world_size,
                  lr=float(run.engine.get_lr()[0]), nan_skips=state.nan_skips, grad_skips=state.grad_skips,
                  data_rows_replaced=state.rows_replaced,  # rejected while reading, this run
                  **run.args.data_counts)  # shards skipped, rows the converter rejected
    if due.validate:
        report["val_p_at_1"] = validate(run.trained.for_validation(), run.processor, run.args.val_root,
                                        run.config, run.rank, run.world_size, run.trained.partitioned)
    if run.logger is not None:
        run.logger.log(state.step, report, console=due.console)
    if due.checkpoint:
        checkpoint_and_report(run, report, background=run.config.train.checkpoint_upload == "async")
        run.cadence.checkpointed()  # the wall-clock period starts again
    elif due.report:
        run.session.report(report)
    run.last_metrics = report
    run.meter.reset()


def checkpoint_and_report(run: Run, metrics: dict, background: bool = False) -> None:
    """Saves this rank's part into node-local scratch and hands it to the session, which uploads it
    to `train.storage_path` and deletes the local copy. `background` (`train.checkpoint_upload=async`,
    periodic checkpoints only): training goes on while the files travel; Ray registers the checkpoint
    once every rank's upload has finished, so a run killed mid-upload resumes from the previous one."""
    directory = tempfile.mkdtemp(prefix="ckpt-", dir=storage.scratch_dir())
    save_checkpoint(directory, run.engine, run.state, run.config, run.rank)
    run.session.report(metrics, directory, name=f"checkpoint_{run.state.step:06d}_{run.launch}", background=background)


def finish(run: Run) -> None:
    """Spectrum plot, the final checkpoint with the run's summary, then the `save_pretrained` export
    (rank 0; after the checkpoint, since it merges LoRA in place). The driver evaluates the export
    after fit()."""
    config, state, rank = run.config, run.state, run.rank
    summary: dict[str, Any] = dict(run.last_metrics)
    if not summary and run.logger is not None:
        # A relaunch of a finished run trains no step: its summary is the last logged one (what
        # `sde-ray compare` records), not an empty one.
        summary = run.logger.last_logged()
    run.meter.sync_replaced(state)
    summary.update(step=state.step, samples=state.samples, world_size=run.world_size,
                   data_rows_replaced=state.rows_replaced)
    if run.meter.features is not None:
        _, spectra = run.meter.spectra()
        if rank == 0:
            # Imported here: matplotlib is ~1-3 s of a worker's start, and only rank 0 plots, after training.
            from sde_ray.eval.plots import plot_spectrum

            with storage.writable_dir(storage.join(config.train.output_dir, "plots")) as plots:  # uploaded when remote
                path = plot_spectrum(spectra, plots / "spectrum.png",
                                     title=f"{config.loss.name}: singular values at step {state.step}")
                run.logger.log_image("spectrum", str(path), state.step)
    export_dir = storage.join(config.train.output_dir, "model")
    if rank == 0:  # Ray keeps rank 0's metrics only
        summary["model_dir"] = export_dir
        # Where and when training ended: the driver's evaluation starts after it (tests check it).
        summary.update(train_worker_pid=os.getpid(), train_finished_at=time.time())
        if torch.device(run.engine.device).type == "cuda":
            summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(run.engine.device) / 2**30
    if run.logger is not None:
        run.logger.finish(dict(summary))
    # Always a checkpoint: Ray Train keeps the metrics of checkpointed reports only (the Result's).
    checkpoint_and_report(run, summary)
    # The export comes last: it merges LoRA into the weights it is given in place (under ZeRO-0/1/2
    # the engine's own), in the training dtype, with no second copy of the backbone. The driver
    # evaluates it after fit() returns, i.e. after every worker is past this line.
    model = run.trained.for_export()
    if model is not None:
        with storage.writable_dir(export_dir) as local:  # scratch, uploaded when the output is remote
            model.save_pretrained(str(local), in_place=True)


def step_context(config: Config, state: TrainState, rank: int, world_size: int, batch: dict) -> StepContext:
    """The objective's view of this step: progress, rank, the targets' ids, the shared generator."""
    by_pair = config.loss.duplicate_targets != "ignore" and config.loss.duplicate_key == "pair"
    return StepContext(
        progress=state.step / config.train.max_steps,
        rank=rank,
        world_size=world_size,
        training=True,
        target_ids=step_target_ids(batch.get(TARGET_ID_KEY), batch.get(NEGATIVE_ID_KEY),
                                   batch.get(QUERY_ID_KEY) if by_pair else None, rank, world_size),
        generator=step_generator(config.train.seed, state.step, 0),
    )
