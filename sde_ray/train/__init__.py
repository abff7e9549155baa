"""Ray Train + DeepSpeed training: the only part of sde_ray that imports `ray.train` and `deepspeed`.

- `deepspeed_config`: the DeepSpeed JSON derived from the config tree (pure);
- `loop`: the worker loop (`train_loop_per_worker`, its `RunArgs`, the log/validate/checkpoint schedule);
- `checkpoint`: DeepSpeed shards + consolidated weights + run state, exact or resized resume
  (file names in `sde_ray.runs`);
- `timing`: the train benchmark's fixed-batch step timing on Ray Train workers;
- `driver`: `resolve_paths`, `build_trainer` (the TorchTrainer) and `run_train` (the `sde-ray train` job).

Run logging lives in `sde_ray.runs`, spectral diagnostics in `sde_ray.spectral.snapshot`,
cross-rank reductions in `sde_ray.distributed`.
"""
