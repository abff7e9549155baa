"""Step timing of the training stack on a fixed batch (the train benchmark's Ray Train side).

`timing_loop_per_worker` builds the module and the DeepSpeed engine exactly as the training loop
does (`build_train_module`, `build_deepspeed_config`, `build_engine`), then times `step.train_step`, the training loop's own
step, on this worker's slice of one fixed global batch, so the data pipeline is out of the measurement (the
data benchmark measures it). `fit_timing(config, batch, workers, ...)` runs it on a TorchTrainer.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import torch

from sde_ray.config import Config
from sde_ray.distributed import max_over_ranks
from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size, local_batch_size
from sde_ray.train.step import train_step


def timing_loop_per_worker(loop_config: dict) -> None:
    import ray.train

    from sde_ray.losses import StepContext
    from sde_ray.train.loop import build_engine, build_train_module, seed_everything, step_generator

    config: Config = loop_config["config"]
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    seed_everything(config.train.seed)
    engine = build_engine(build_train_module(config), build_deepspeed_config(config, world_size))
    local, chunk = local_batch_size(config, world_size), chunk_size(config, world_size)
    batch = {k: v[rank * local:(rank + 1) * local] for k, v in loop_config["batch"].items()}
    durations = []
    for step in range(loop_config["warmup"] + loop_config["steps"]):
        start = time.perf_counter()
        step_context = StepContext(progress=step / config.train.max_steps, rank=rank, world_size=world_size,
                                   training=True, target_ids=batch.get("target_id"),
                                   generator=step_generator(config.train.seed, step, 0))
        result = train_step(engine, batch, step_context, chunk, world_size)
        durations.append(time.perf_counter() - start)
    timed = torch.tensor(durations[loop_config["warmup"]:], dtype=torch.float64, device="cpu")
    timed = max_over_ranks(timed, world_size)  # a step takes as long as its slowest rank
    metrics = {"step_s": float(timed.median()), "world_size": world_size, "final_loss": result.loss,
               "global_steps": engine.global_steps}
    # Ray Train keeps the metrics of checkpointed reports only: rank 0 attaches a one-file checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            with open(os.path.join(directory, "timing.json"), "w") as handle:
                json.dump(metrics, handle)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def fit_timing(config: Config, batch: dict[str, torch.Tensor], workers: int, *, steps: int, warmup: int,
               threads: int = 1) -> dict:
    """Median optimizer-step seconds of `workers` Ray Train + DeepSpeed workers on `batch`."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="sde_ray_bench_") as storage:
        trainer = TorchTrainer(
            timing_loop_per_worker,
            train_loop_config={"config": config, "batch": batch, "steps": steps, "warmup": warmup,
                               "threads": threads},
            scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
            run_config=ray.train.RunConfig(storage_path=storage, name=f"bench_{workers}",
                                           worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}),
        )
        return dict(trainer.fit().metrics)
