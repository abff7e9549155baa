"""The Ray Train worker loop: one DeepSpeed engine per worker, read top to bottom like nanoGPT.

`train_loop_per_worker(loop_config)` runs on every worker of the TorchTrainer (Ray has already set up
the gloo/NCCL process group):

1. build the encoder and the objective as one module (objective parameters train too);
2. resume from `ray.train.get_checkpoint()`: exact DeepSpeed state when the world size matches,
   consolidated weights otherwise (an elastic resize), and skip the rows already consumed;
3. `deepspeed.initialize` with the JSON derived from the config;
4. per micro-step: a batch from this worker's Ray Data shard → encode both sides → objective →
   non-finite check (agreed by all ranks) → `engine.backward` / `engine.step`;
5. per optimizer step: metrics (averaged over ranks) every `log_every`, validation P@1 every
   `eval_every` (rank 0 evaluates, every rank reports it), a checkpoint every `checkpoint_every`;
6. at the end: spectrum plot, `save_pretrained` export, final P@1 on the eval split, final checkpoint.

Every `ray.train.report` is a barrier, so each rank reports under the same step conditions.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sde_ray.config import Config, from_dict, to_dict
from sde_ray.train.checkpoint import (
    ResumePlan,
    TrainState,
    consolidated_state_dict,
    load_consolidated,
    match_shapes,
    restore_engine,
    resume_plan,
    save_checkpoint,
)
from sde_ray.train.deepspeed_config import build_deepspeed_config, micro_batch_size
from sde_ray.train.metrics import RunLogger, average_over_ranks, say, spectral_snapshot

# Keys of a processed batch that are not model inputs.
TARGET_ID_KEY = "target_id"


class TrainModule(torch.nn.Module):
    """The encoder and the objective under one module, so DeepSpeed optimises both."""

    def __init__(self, model: torch.nn.Module, objective: torch.nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor], context):
        query, target = self.model(batch)
        # The spectral stage (SVD / eigh, partition thresholds) wants at least fp32 under bf16 too.
        query, target = query.float(), target.float()
        loss, metrics = self.objective(query, target, context)
        # Diagnostics (spectra, gap) describe the paired rows: explicit negatives are left out.
        from sde_ray.losses.infonce import split_negatives

        return loss, metrics, query.detach(), split_negatives(query, target)[0].detach()


def build_train_module(config: Config) -> TrainModule:
    from sde_ray.losses import build_objective
    from sde_ray.models import build_model

    model = build_model(config.model, seed=config.train.seed)
    return TrainModule(model, build_objective(config, model.embed_dim))


@contextlib.contextmanager
def scalar_parameters_as_vectors(module: torch.nn.Module):
    """Holds 0-dim parameters as shape (1,) while DeepSpeed builds its engine.

    DeepSpeed 0.19 broadcasts every parameter as a uint8 view at `initialize`, which fails for a
    0-dim tensor (CLIP's `logit_scale`, a learnable temperature). Afterwards each one gets its
    shape back as a view of the same storage; a ZeRO-3 partition (empty on this rank) keeps (1,),
    and the consolidated copies are reshaped on load (`checkpoint.match_shapes`).
    """
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for parameter in scalars:
        parameter.data = parameter.data.reshape(1)
    try:
        yield
    finally:
        for parameter in scalars:
            if parameter.data.numel() == 1:
                parameter.data = parameter.data.view(())


def build_engine(module: torch.nn.Module, ds_config: dict):
    """`deepspeed.initialize` on the trainable parameters (Ray already set up the process group)."""
    import deepspeed

    with scalar_parameters_as_vectors(module):
        engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=[p for p in module.parameters() if p.requires_grad], config=ds_config
        )
    return engine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """Randomness for the objective, identical on every rank and reproducible after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def all_ranks_true(flag: bool, world_size: int) -> bool:
    if world_size == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(value: Any, world_size: int) -> Any:
    """Rank 0's `value` on every rank."""
    if world_size == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def to_model_inputs(batch: dict, device: torch.device, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors on the engine's device; float inputs in the engine's precision (pixels arrive as uint8
    and stay so: the model normalises them on its device)."""
    out = {}
    for key, value in batch.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        if tensor.is_floating_point():
            tensor = tensor.to(float_dtype)
        out[key] = tensor.to(device)
    return out


class BatchStream:
    """Endless micro-batches of this worker's shard, epoch after epoch, in step on every rank.

    Position is kept as (epoch, global rows consumed in the epoch); the global rows per micro-step
    (micro × world = global batch / accumulation) do not change under an elastic resize, so a
    resume skips the same number of rows whatever the new world size. All ranks agree each step
    that every one of them still has a batch (one int all-reduce), so an uneven split can never
    leave a rank waiting in a collective.
    """

    def __init__(self, open_epoch: Callable[[int], Iterator], micro: int, world_size: int, epoch: int, epoch_rows: int):
        self.open_epoch = open_epoch
        self.global_rows = micro * world_size
        self.world_size = world_size
        self.epoch = epoch
        self.epoch_rows = epoch_rows - epoch_rows % self.global_rows
        self.iterator = self._start(skip=self.epoch_rows // self.global_rows)

    def _start(self, skip: int) -> Iterator:
        iterator = iter(self.open_epoch(self.epoch))
        for _ in range(skip):  # rows the checkpointed run already trained on
            next(iterator, None)
        return iterator

    def next(self) -> dict:
        for attempt in range(2):
            batch = next(self.iterator, None)
            if all_ranks_true(batch is not None, self.world_size):
                self.epoch_rows += self.global_rows
                return batch
            self.epoch += 1
            self.epoch_rows = 0
            self.iterator = self._start(skip=0)
        raise RuntimeError(
            f"the training data yields no full batch of {self.global_rows} rows "
            f"({self.global_rows // self.world_size} per worker); add data or lower train.global_batch_size"
        )


def open_epoch_fn(shard, micro: int, config: Config, rank: int) -> Callable[[int], Iterator]:
    from sde_ray.data.pipeline import iter_worker_batches

    def open_epoch(epoch: int) -> Iterator:
        return iter_worker_batches(
            shard, micro, seed=config.data.shuffle_seed, epoch=epoch, rank=rank,
            shuffle_buffer=config.data.shuffle_buffer,
        )

    return open_epoch


# ---------------------------------------------------------------------------------------------
# Evaluation and export on rank 0


class RankZeroModel:
    """The trained encoder on rank 0, un-wrapped and in fp32, for validation and export.

    Under ZeRO-0/1/2 in fp32 every rank holds the full weights and the engine's module is used
    directly; under ZeRO-3 (gathered, a collective) or bf16 the weights go into a cached fp32 copy.
    """

    def __init__(self, config: Config, engine, rank: int):
        self.config, self.engine, self.rank = config, engine, rank
        self.copy: TrainModule | None = None

    def get(self) -> torch.nn.Module | None:
        """The encoder on rank 0, None elsewhere. Every rank must call it (ZeRO-3 gathers)."""
        full_fp32 = next(self.engine.module.parameters()).dtype == torch.float32
        if not self.engine.zero_optimization_partition_weights() and full_fp32:
            return self.engine.module.model if self.rank == 0 else None
        weights = consolidated_state_dict(self.engine)
        if self.rank != 0:
            return None
        if self.copy is None:
            self.copy = build_train_module(self.config)
        self.copy.load_state_dict(match_shapes(weights, self.copy))
        return self.copy.model


def validation_p_at_1(model: torch.nn.Module, processor, eval_root: str, config: Config) -> float:
    from sde_ray.eval.runner import validation_p_at_1 as evaluate_validation

    was_training = model.training
    model.eval()
    try:
        return float(evaluate_validation(model, processor, eval_root, max_queries=config.eval.val_queries,
                                         batch_size=config.eval.batch_size))
    finally:
        model.train(was_training)


def final_evaluation(model: torch.nn.Module, processor, eval_root: str, config: Config) -> dict:
    from sde_ray.eval.runner import evaluate_model

    model.eval()
    return evaluate_model(model, processor, eval_root, datasets=config.eval.datasets or None,
                          batch_size=config.eval.batch_size)


# ---------------------------------------------------------------------------------------------
# The loop


def _report(metrics: dict, checkpoint_dir: str | None = None, name: str | None = None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint else None)


def _checkpoint_and_report(engine, state: TrainState, config: Config, rank: int, metrics: dict, launch: str) -> None:
    with tempfile.TemporaryDirectory(prefix="sde_ray_ckpt_") as directory:
        save_checkpoint(directory, engine, state, to_dict(config), rank)
        _report(metrics, directory, name=f"checkpoint_{state.step:06d}_{launch}")


def train_loop_per_worker(loop_config: dict) -> None:
    """The function every Ray Train worker runs; `loop_config` is built by `driver.build_trainer`."""
    config: Config = from_dict(loop_config["config"])
    if not config.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    train = config.train
    output_dir = loop_config["output_dir"]
    eval_root = loop_config.get("eval_root")
    step_hook = loop_config.get("step_hook")
    seed_everything(train.seed)

    # 1-2. Model + objective, and where to resume from.
    module = build_train_module(config)
    resume_stack = contextlib.ExitStack()
    plan: ResumePlan | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        plan = resume_plan(resume_stack.enter_context(checkpoint.as_directory()), world_size, config.deepspeed.zero_stage)
        if not plan.exact:
            load_consolidated(module, plan.directory)

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
            say(f"[sde_ray] resumed at step {state.step} from {plan.directory.name}: {how}")
    resume_stack.close()
    float_dtype = next(engine.module.parameters()).dtype

    # Data: this worker's shard, positioned after the rows the checkpoint already consumed.
    micro = micro_batch_size(config, world_size)
    shard = ray.train.get_dataset_shard("train")
    stream = BatchStream(open_epoch_fn(shard, micro, config, rank), micro, world_size, state.epoch, state.epoch_rows)

    launch = broadcast_object(uuid.uuid4().hex[:8], world_size)  # unique checkpoint names per attempt
    logger = RunLogger(config, output_dir, loop_config["run_id"], loop_config["wandb_mode"], state.step) if rank == 0 else None
    rank_zero_model = RankZeroModel(config, engine, rank)
    processor = None
    if rank == 0 and eval_root:
        from sde_ray.models import BatchProcessor

        processor = BatchProcessor(to_dict(config.model))

    # 4-5. Train.
    window: dict[str, float] = {}
    window_count, window_start, window_samples = 0, time.time(), 0
    consecutive_nan = 0
    last_features = None
    final_metrics: dict[str, float] = {}
    engine.train()
    while state.step < train.max_steps:
        for micro_index in range(train.grad_accumulation):
            batch = to_model_inputs(stream.next(), engine.device, float_dtype)
            step_context = _step_context(config, state, rank, world_size, batch, micro_index)
            loss, metrics, query, target = engine(batch, step_context)
            window_samples += micro * world_size
            if not all_ranks_true(bool(torch.isfinite(loss.detach()).all()), world_size):
                consecutive_nan += 1
                state.nan_skips += 1
                message = f"non-finite loss at step {state.step + 1} (micro-step {micro_index}) on at least one rank"
                if train.nan_policy == "raise" or consecutive_nan > train.max_nan_skips:
                    raise FloatingPointError(
                        f"{message}; train.nan_policy={train.nan_policy}, {consecutive_nan} consecutive "
                        f"(train.max_nan_skips={train.max_nan_skips})"
                    )
                if rank == 0:
                    say(f"[sde_ray] {message}: skipped ({consecutive_nan}/{train.max_nan_skips})")
                continue
            consecutive_nan = 0
            engine.backward(loss)
            engine.step()
            for key, value in {**metrics, "loss": float(loss.detach())}.items():
                window[key] = window.get(key, 0.0) + float(value)
            window_count += 1
            last_features = (query, target)
        state.step += 1
        state.samples += train.global_batch_size
        state.epoch, state.epoch_rows = stream.epoch, stream.epoch_rows

        is_last = state.step == train.max_steps
        do_log = state.step % train.log_every == 0 or is_last
        do_eval = bool(eval_root) and train.eval_every > 0 and state.step % train.eval_every == 0
        do_checkpoint = state.step % train.checkpoint_every == 0 or is_last
        if do_log or do_eval or do_checkpoint:
            report = _step_metrics(window, window_count, config, rank, world_size, last_features)
            elapsed = max(time.time() - window_start, 1e-9)
            report.update(step=state.step, epoch=state.epoch, samples=state.samples, world_size=world_size,
                          lr=float(engine.get_lr()[0]), samples_per_s=window_samples / elapsed,
                          steps_per_s=(window_samples / train.global_batch_size) / elapsed, nan_skips=state.nan_skips)
            if do_eval:
                model = rank_zero_model.get()
                value = validation_p_at_1(model, processor, eval_root, config) if rank == 0 else None
                report["val_p_at_1"] = broadcast_object(value, world_size)
            if logger is not None:
                logger.log(state.step, report)
            if do_checkpoint and not is_last:
                _checkpoint_and_report(engine, state, config, rank, report, launch)
            elif not is_last:
                _report(report)
            final_metrics = report
            window, window_count, window_start, window_samples = {}, 0, time.time(), 0
        if step_hook is not None:
            step_hook(step=state.step, rank=rank, world_size=world_size, module=engine.module)

    # 6. Spectrum, export, final evaluation, final checkpoint.
    summary: dict[str, Any] = dict(final_metrics)  # empty when relaunching a finished run
    summary.update(step=state.step, samples=state.samples, world_size=world_size)
    if last_features is not None:
        _, spectra = spectral_snapshot(last_features[0], last_features[1], config, rank, world_size)
        if rank == 0:
            from sde_ray.eval.plots import plot_spectrum

            path = plot_spectrum(spectra, Path(output_dir) / "plots" / "spectrum.png",
                                 title=f"{config.loss.name}: singular values at step {state.step}")
            logger.log_image("spectrum", str(path), state.step)
    model = rank_zero_model.get()
    evaluation = None
    if rank == 0:  # Ray keeps rank 0's metrics only, so the full table is reported by rank 0 alone
        export_dir = Path(output_dir) / "model"
        model.save_pretrained(str(export_dir))
        summary["model_dir"] = str(export_dir)
        if eval_root:
            evaluation = final_evaluation(model, processor, eval_root, config)
        summary["eval"] = evaluation
    if logger is not None:
        overall = (evaluation or {}).get("overall")
        logger.finish({**{k: v for k, v in summary.items() if k != "eval"}, "final_p_at_1": overall})
    # Always a checkpoint: Ray Train keeps the metrics of checkpointed reports only (the Result's).
    _checkpoint_and_report(engine, state, config, rank, summary, launch)


def _step_context(config: Config, state: TrainState, rank: int, world_size: int, batch: dict, micro_index: int):
    from sde_ray.losses import StepContext
    from sde_ray.losses.infonce import ids_with_negatives

    return StepContext(
        progress=state.step / config.train.max_steps,
        rank=rank,
        world_size=world_size,
        training=True,
        # With explicit negatives: one id per target row, in the objectives' per-query layout.
        target_ids=ids_with_negatives(batch.get(TARGET_ID_KEY), batch.get("neg_target_id")),
        generator=step_generator(config.train.seed, state.step, micro_index),
    )


def _step_metrics(window: dict[str, float], count: int, config: Config, rank: int, world_size: int,
                  last_features) -> dict[str, float]:
    """Window means of the objective's metrics, averaged over ranks, plus spectral diagnostics
    for objectives that do not compute them (the InfoNCE baseline logs the same numbers as SDE)."""
    local = {k: v / max(count, 1) for k, v in window.items()}
    if last_features is not None and "effective_rank_q" not in local:
        diagnostics, _ = spectral_snapshot(last_features[0], last_features[1], config, rank, world_size)
        local.update(diagnostics)
    return average_over_ranks(local, world_size)
