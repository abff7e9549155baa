"""Ray Train + DeepSpeed training: the only part of sde_ray that imports `ray.train` and `deepspeed`.

- `deepspeed_config`: the DeepSpeed JSON derived from the config tree (pure);
- `loop`: the worker loop (`train_loop_per_worker`);
- `checkpoint`: DeepSpeed shards + consolidated weights + run state, exact or resized resume;
- `metrics`: cross-rank metric averaging, spectral diagnostics, console / jsonl / wandb sinks;
- `driver`: `build_trainer` (the TorchTrainer) and `run_train` (the `sde-ray train` job).
"""
