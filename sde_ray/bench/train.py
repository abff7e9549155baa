"""`sde-ray bench train`: step time of the training stack against a plain PyTorch floor, in one run.

All on the same model (`model` section of the config, tiny-clip by default), the same objective and
one fixed global batch of real processed samples from the synthetic MMEB shards:

- plain: one process, torch AdamW + grad clipping, no Ray, no DeepSpeed (the floor);
- ray_1: Ray Train + DeepSpeed (the config's ZeRO stage and precision) with 1 worker;
- ray_2: the same with 2 workers, each on half the batch (one thread each);
- plain_infonce vs plain: the objective's cost, `loss.name=infonce` against the configured one (SDE),
  interleaved step by step in one process; the plain pair runs before and after the Ray runs.

Every variant runs with the same number of torch threads per worker (1 by default), so the ratios
measure framework overhead, not thread counts. Targets: ray_1 / plain ≤ 1.2 (framework overhead),
SDE / InfoNCE ≤ 1.15 (the spectral stage's extra cost). The data pipeline is excluded (see
`sde-ray bench data`).
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import torch

from sde_ray.config import Config, load_config, replace, to_dict

TARGET_FRAMEWORK_OVERHEAD = 1.2
TARGET_SDE_OVERHEAD = 1.15


def _read_samples(shards: list[str], count: int) -> dict[str, list]:
    """The first `count` samples of the shards as read_webdataset-style raw columns."""
    samples: dict[str, dict] = {}
    for shard in shards:
        with tarfile.open(shard) as archive:
            for member in archive:
                key, suffix = member.name.split(".", 1)
                if key not in samples and len(samples) == count:
                    break
                samples.setdefault(key, {"__key__": key})[suffix] = archive.extractfile(member).read()
        if len(samples) >= count:
            break
    if len(samples) < count:
        raise ValueError(f"the shards hold {len(samples)} samples, fewer than the batch of {count}")
    columns = ("__key__", "json", "qry.img", "pos.img")
    return {c: [s.get(c) for s in list(samples.values())[:count]] for c in columns}


def fixed_batch(config: Config, size: int) -> dict[str, torch.Tensor]:
    """`size` processed samples (the model's BatchProcessor output) from the configured data."""
    from sde_ray.data.batches import raw_batch_from_rows
    from sde_ray.data.cache import prepare_data
    from sde_ray.models import BatchProcessor

    prepared = prepare_data(config)
    raw = raw_batch_from_rows(_read_samples(prepared.shards, size))
    arrays = BatchProcessor(to_dict(config.model))(raw)
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def plain_step_durations(configs: list[Config], batch: dict[str, torch.Tensor], *, steps: int,
                         warmup: int) -> list[list[float]]:
    """Seconds of each timed optimizer step of a plain single-process PyTorch loop, per config.

    The configs' loops run interleaved step by step on the same batch, so a change in machine load
    hits them all alike and their ratio stays meaningful on a shared machine.
    """
    from sde_ray.losses import StepContext
    from sde_ray.train.loop import build_train_module, seed_everything, step_generator

    loops = []
    for config in configs:
        seed_everything(config.train.seed)
        module = build_train_module(config)
        module.train()
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                      betas=(0.9, 0.98), eps=1e-6)
        loops.append((config, module, parameters, optimizer))
    durations: list[list[float]] = [[] for _ in configs]
    for step in range(warmup + steps):
        for index, (config, module, parameters, optimizer) in enumerate(loops):
            start = time.perf_counter()
            context = StepContext(progress=step / config.train.max_steps, rank=0, world_size=1, training=True,
                                  target_ids=batch.get("target_id"),
                                  generator=step_generator(config.train.seed, step, 0))
            loss, _, _, _ = module(batch, context)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
            optimizer.step()
            if step >= warmup:
                durations[index].append(time.perf_counter() - start)
    return durations


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


def _rates(step_s: float, batch: int) -> dict[str, float]:
    return {"step_ms": 1000.0 * step_s, "steps_per_s": 1.0 / step_s, "samples_per_s": batch / step_s}


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False) -> dict:
    import ray

    from sde_ray.train.driver import resolve_paths
    from sde_ray.train.timing import fit_timing

    config = resolve_paths(config or load_config(None, []))
    steps, warmup = (6, 2) if quick else (30, 5)
    batch_size = config.train.global_batch_size
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    threads = torch.get_num_threads()
    batch = fixed_batch(config, batch_size)
    variants = [config, replace(config, ["loss.name=infonce"])]

    def plain_pass() -> list[list[float]]:
        torch.set_num_threads(1)
        try:
            return plain_step_durations(variants, batch, steps=steps, warmup=warmup)
        finally:
            torch.set_num_threads(threads)

    # The plain floor is measured before and after the Ray runs and pooled, so load drift during
    # the run does not favour either side.
    before = plain_pass()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_1 = fit_timing(config, batch, 1, steps=steps, warmup=warmup)
        ray_2 = fit_timing(config, batch, 2, steps=steps, warmup=warmup)
    finally:
        if started:
            ray.shutdown()
    after = plain_pass()
    plain = _median(before[0] + after[0])
    plain_infonce = _median(before[1] + after[1])
    results = {
        "model": config.model.name_or_path,
        "objective": config.loss.name,
        "zero_stage": config.deepspeed.zero_stage,
        "precision": config.deepspeed.precision,
        "global_batch_size": batch_size,
        "steps_timed": steps,
        "threads_per_worker": 1,
        "plain": _rates(plain, batch_size),
        "plain_infonce": _rates(plain_infonce, batch_size),
        "ray_1": _rates(ray_1["step_s"], batch_size),
        "ray_2": _rates(ray_2["step_s"], batch_size),
        "ratios": {
            "ray_1_over_plain_step_time": ray_1["step_s"] / plain,
            "ray_2_over_plain_step_time": ray_2["step_s"] / plain,
            "ray_2_speedup_over_ray_1": ray_1["step_s"] / ray_2["step_s"],
            "sde_over_infonce_step_time": plain / plain_infonce,
        },
    }
    results["targets"] = {
        "framework_overhead": {"target": TARGET_FRAMEWORK_OVERHEAD,
                               "met": results["ratios"]["ray_1_over_plain_step_time"] <= TARGET_FRAMEWORK_OVERHEAD},
        "sde_overhead": {"target": TARGET_SDE_OVERHEAD,
                         "met": results["ratios"]["sde_over_infonce_step_time"] <= TARGET_SDE_OVERHEAD},
    }
    _print(results)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _print(results: dict) -> None:
    print(f"train bench: {results['model']}, {results['objective']}, ZeRO-{results['zero_stage']} "
          f"{results['precision']}, global batch {results['global_batch_size']}, 1 thread per worker")
    print("| variant | step (ms) | steps/s | samples/s |\n|---|---:|---:|---:|")
    for name in ("plain", "plain_infonce", "ray_1", "ray_2"):
        row = results[name]
        print(f"| {name} | {row['step_ms']:.1f} | {row['steps_per_s']:.2f} | {row['samples_per_s']:.1f} |")
    for name, value in results["ratios"].items():
        print(f"{name}: {value:.3f}")
    for name, target in results["targets"].items():
        print(f"{name}: target <= {target['target']} -> {'met' if target['met'] else 'NOT met'}")
