"""`sde-ray bench train`: step time of the training stack against a plain PyTorch floor, in one run.

All on the same model (`model` section of the config, tiny-clip by default), the same objective and
one fixed global batch of real processed samples from the synthetic MMEB shards:

- plain: one process, torch AdamW + grad clipping, no Ray, no DeepSpeed (the floor);
- ray_1: Ray Train + DeepSpeed (the config's ZeRO stage and precision) with 1 worker;
- ray_2: the same with 2 workers, each on half the batch (one thread each);
- plain_infonce vs plain: the objective's cost, `loss.name=infonce` against the configured one (SDE),
  interleaved step by step in one process; the plain pair runs before and after the Ray runs;
- gradcache: per global batch N, `train_step` (the loop's step) with the whole local batch and with
  64-row chunks against the pre-GradCache step (engine forward, backward, step), interleaved in one
  fresh DeepSpeed process per N (variant order rotating each step): wall and CPU time per step, with
  GradCache's graph-free forward of the batch timed alone (the floor of chunked / whole is 1 + its
  share); and, in a fresh process per variant, the peak RSS of two steps above the RSS of the built engine.

Every variant runs with the same number of torch threads per worker (1 by default), so the ratios
measure framework overhead, not thread counts. Targets: ray_1 / plain ≤ 1.2 (framework overhead),
SDE / InfoNCE ≤ 1.15 (the spectral stage's extra cost); GradCache: whole-batch `train_step` ≤ 1.05×
the pre-GradCache step, chunked ≤ 1.4× the whole-batch step (one extra forward). The data pipeline is excluded (see
`sde-ray bench data`).
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from pathlib import Path

import torch

from sde_ray.config import Config, load_config, with_values
from sde_ray.ray_cluster import start_local

TARGET_FRAMEWORK_OVERHEAD = 1.2
TARGET_SDE_OVERHEAD = 1.15
TARGET_WHOLE_OVER_TODAY = 1.05
TARGET_CHUNKED_OVER_WHOLE = 1.4
GRADCACHE_CHUNK = 64


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
    arrays = BatchProcessor(config.model)(raw)
    return {k: torch.as_tensor(v, device="cpu") for k, v in arrays.items()}


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
            loss = module(batch, context).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
            optimizer.step()
            if step >= warmup:
                durations[index].append(time.perf_counter() - start)
    return durations


def _median(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64, device="cpu").median())


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
    variants = [config, with_values(config, {"loss.name": "infonce"})]

    def plain_pass() -> list[list[float]]:
        torch.set_num_threads(1)
        try:
            return plain_step_durations(variants, batch, steps=steps, warmup=warmup)
        finally:
            torch.set_num_threads(threads)

    # The plain floor is measured before and after the Ray runs and pooled, so load drift during
    # the run does not favour either side.
    before = plain_pass()
    started = start_local(2, log_to_driver=False)
    try:
        ray_1 = fit_timing(config, batch, 1, steps=steps, warmup=warmup)
        ray_2 = fit_timing(config, batch, 2, steps=steps, warmup=warmup)
    finally:
        if started:
            ray.shutdown()
    after = plain_pass()
    gradcache = gradcache_bench(config, [64] if quick else [64, 1024, 4096],
                                chunk=16 if quick else GRADCACHE_CHUNK, steps=2 if quick else 6)
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
    results["gradcache"] = gradcache
    results["targets"] = {
        "framework_overhead": {"target": TARGET_FRAMEWORK_OVERHEAD,
                               "met": results["ratios"]["ray_1_over_plain_step_time"] <= TARGET_FRAMEWORK_OVERHEAD},
        "sde_overhead": {"target": TARGET_SDE_OVERHEAD,
                         "met": results["ratios"]["sde_over_infonce_step_time"] <= TARGET_SDE_OVERHEAD},
        "gradcache_whole_over_today": {"target": TARGET_WHOLE_OVER_TODAY, "met": all(
            row["whole_over_today"] <= TARGET_WHOLE_OVER_TODAY for row in gradcache)},
        "gradcache_chunked_over_whole": {"target": TARGET_CHUNKED_OVER_WHOLE, "met": all(
            row["chunked_over_whole"] <= TARGET_CHUNKED_OVER_WHOLE for row in gradcache)},
        "gradcache_whole_over_today_cpu": {"target": TARGET_WHOLE_OVER_TODAY, "met": all(
            row["whole_over_today_cpu"] <= TARGET_WHOLE_OVER_TODAY for row in gradcache)},
        "gradcache_chunked_over_whole_cpu": {"target": TARGET_CHUNKED_OVER_WHOLE, "met": all(
            row["chunked_over_whole_cpu"] <= TARGET_CHUNKED_OVER_WHOLE for row in gradcache)},
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
    print("GradCache (1 worker, 1 thread; peak = RSS high-water mark of two steps above the built engine's RSS):")
    print("| global batch | chunk | pre-GradCache step (ms) | whole (ms) | chunked (ms) | whole / pre | "
          "chunked / whole | peak whole (MiB) | peak chunked (MiB) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results["gradcache"]:
        print(f"| {row['global_batch_size']} | {row['chunk']} | {row['today_step_ms']:.0f} | {row['whole_step_ms']:.0f} | "
              f"{row['chunked_step_ms']:.0f} | {row['whole_over_today']:.3f} | {row['chunked_over_whole']:.3f} | "
              f"{row['whole_peak_mib']:.0f} | {row['chunked_peak_mib']:.0f} |")
    print("(where N equals the chunk, chunked is the whole step again: its chunked / whole is the timing noise)")
    print("The same steps in CPU time (user + system of the one-thread process; not inflated by other jobs):")
    print("| global batch | pre-GradCache CPU (ms) | whole CPU (ms) | chunked CPU (ms) | graph-free forward CPU (ms) | "
          "whole / pre | chunked / whole | floor: 1 + forward / whole | chunked / (whole + forward) |"
          "\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results["gradcache"]:
        print(f"| {row['global_batch_size']} | {row['today_cpu_ms']:.0f} | {row['whole_cpu_ms']:.0f} | "
              f"{row['chunked_cpu_ms']:.0f} | {row['forward_cpu_ms']:.0f} | {row['whole_over_today_cpu']:.3f} | "
              f"{row['chunked_over_whole_cpu']:.3f} | {1 + row['forward_over_whole_cpu']:.3f} | "
              f"{row['chunked_over_whole_plus_forward_cpu']:.3f} |")
    for name, target in results["targets"].items():
        print(f"{name}: target <= {target['target']} -> {'met' if target['met'] else 'NOT met'}")


# ---------------------------------------------------------------------------------------------
# GradCache: memory and time of `train_step` with chunks against the unchunked step


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _gradcache_worker(config: Config, batch: dict, chunks: list[int], steps: int, port: int, queue) -> None:
    """A fresh one-worker DeepSpeed process (spawned), one engine per chunk size. With `steps > 0`:
    the pre-GradCache step and `train_step` per engine, timed interleaved step by step. With
    `steps == 0` (one chunk size): the process's peak RSS over two steps above its RSS once the
    engine is built (VmHWM, reset through /proc/self/clear_refs just before the first step; a fresh
    process, so no earlier, larger step has left memory resident)."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from sde_ray.losses import StepContext
    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.loop import build_engine, build_train_module, seed_everything
    from sde_ray.train.step import split_rows, train_step

    rows = len(batch["target_id"])
    engines = []
    for chunk in chunks:
        chunked = with_values(config, {"train.global_batch_size": rows, "train.micro_batch_size": chunk,
                                       "scaling.num_workers": 1})
        seed_everything(config.train.seed)
        engines.append(build_engine(build_train_module(chunked), build_deepspeed_config(chunked, 1)))

    def context(step: int) -> StepContext:
        return StepContext(progress=0.5, rank=0, world_size=1, training=True, target_ids=batch["target_id"],
                           generator=torch.Generator().manual_seed(step))

    if steps == 0:
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        for _ in range(2):  # the second step also holds the optimizer state the first one created
            train_step(engines[0], batch, context(0), chunks[0], 1)
        queue.put({"peak_mib": (_rss_kib("VmHWM") - before) / 1024.0})
        return

    def plain_step(engine) -> None:  # the step before GradCache: engine forward, backward, step
        loss = engine(batch, context(0)).loss
        engine.backward(loss)
        engine.step()

    def graphless_forward(engine, chunk: int) -> None:  # GradCache's extra pass alone: its step 1
        with torch.no_grad():
            for piece in split_rows(batch, [chunk] * (rows // chunk)):
                engine(piece)

    runs = [lambda e=engines[0]: plain_step(e)]  # "today": the pre-GradCache loop body
    runs += [lambda e=engine, c=chunk: train_step(e, batch, context(0), c, 1) for engine, chunk in zip(engines, chunks)]
    runs.append(lambda: graphless_forward(engines[-1], chunks[-1]))
    # Wall time and the process's CPU time (user + system) of each step. With one thread and no
    # peers, CPU time is the step's own work: on a shared box it does not count the time other jobs
    # held the cores, which wall time does (a load of 10 on 2 cores moved wall ratios by ±50 %).
    durations: list[list[float]] = [[] for _ in runs]
    cpu_durations: list[list[float]] = [[] for _ in runs]
    for step in range(steps + 1):  # step 0 warms up
        # The order rotates every step: no variant always runs right after the one whose large
        # buffers were just freed (at N = 4096 the whole step touches ~3 GiB of fresh pages).
        for offset in range(len(runs)):
            index = (step + offset) % len(runs)
            start, cpu_start = time.perf_counter(), time.process_time()
            runs[index]()
            if step:
                durations[index].append(time.perf_counter() - start)
                cpu_durations[index].append(time.process_time() - cpu_start)
    queue.put({"step_s": [_median(d) for d in durations], "cpu_s": [_median(d) for d in cpu_durations]})


def _gradcache_process(config: Config, batch: dict, chunks: list[int], steps: int) -> dict:
    import multiprocessing
    from queue import Empty

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_gradcache_worker,
                              args=(config, batch, chunks, steps, _free_port(), queue))
    process.start()
    try:
        while True:  # a child that died without a result fails the bench now, not after the hour
            try:
                result = queue.get(timeout=5)
                break
            except Empty:
                if not process.is_alive():
                    raise RuntimeError(f"the GradCache bench process exited with {process.exitcode} "
                                       "before reporting (its traceback is above)") from None
    finally:
        process.join(timeout=60)
    if process.exitcode not in (0, None):
        raise RuntimeError(f"the GradCache bench process exited with {process.exitcode}")
    return result


def gradcache_bench(config: Config, batch_sizes: list[int], chunk: int, steps: int) -> list[dict]:
    """Per global batch N (one worker): step time of the pre-GradCache step and of `train_step` with
    the whole batch and with `chunk`-row chunks (interleaved in one fresh process), and the peak
    step memory of each `train_step` variant (each in its own fresh process)."""
    largest = fixed_batch(config, min(max(batch_sizes), 256))  # real samples, tiled beyond 256 rows
    rows_out = []
    for rows in batch_sizes:
        repeat = -(-rows // len(largest["target_id"]))  # tile the real samples up to N rows
        batch = {k: v.repeat(repeat, *([1] * (v.dim() - 1)))[:rows] for k, v in largest.items()}
        timed = _gradcache_process(config, batch, [rows, min(chunk, rows)], steps)
        today, whole, chunked, forward = timed["step_s"]
        today_cpu, whole_cpu, chunked_cpu, forward_cpu = timed["cpu_s"]
        peaks = [_gradcache_process(config, batch, [size], 0)["peak_mib"] for size in (rows, min(chunk, rows))]
        rows_out.append({
            "global_batch_size": rows, "chunk": min(chunk, rows),
            "today_step_ms": 1000 * today, "whole_step_ms": 1000 * whole, "chunked_step_ms": 1000 * chunked,
            "today_cpu_ms": 1000 * today_cpu, "whole_cpu_ms": 1000 * whole_cpu, "chunked_cpu_ms": 1000 * chunked_cpu,
            "whole_peak_mib": peaks[0], "chunked_peak_mib": peaks[1],
            "whole_over_today": whole / today, "chunked_over_whole": chunked / whole,
            "whole_over_today_cpu": whole_cpu / today_cpu, "chunked_over_whole_cpu": chunked_cpu / whole_cpu,
            # The price GradCache should pay is one graph-free forward of the batch: the floor of
            # chunked / whole is 1 + forward / whole, and chunked / (whole + forward) is what it
            # costs beyond that (chunking, RNG replay, per-chunk reductions).
            "forward_ms": 1000 * forward, "forward_cpu_ms": 1000 * forward_cpu,
            "forward_over_whole_cpu": forward_cpu / whole_cpu,
            "chunked_over_whole_plus_forward_cpu": chunked_cpu / (whole_cpu + forward_cpu),
        })
    return rows_out
