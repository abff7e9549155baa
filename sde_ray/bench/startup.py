"""What a launch costs before its first training step: `sde-ray bench startup [--quick] [--json PATH]`.

On one synthetic MMEB-train source (`data.source=mmeb` pointed at it, `SHAPE` / `QUICK_SHAPE`), in
one run on a local Ray of this machine's CPUs:

- conversion: `convert_mmeb` in one process (what the in-job path did before issue 28) against the
  in-job path itself (`prepare_data` with Ray tasks over the cluster's CPUs), which fills the cache;
  the two manifests must be equal (same shards, same bytes);
- shard check with the cache warm, on the same shards, best of `REPEATS`: `data.shard_check=headers`
  (every tar header parsed: what every launch did before) against `manifest` (a stat per shard);
- a training worker's imports, in fresh interpreters, best of `REPEATS`, alternating: the loop and
  the driver (what a worker imported before issue 28, for the data factory the driver held) against
  the loop alone (`WORKER_IMPORTS`);
- launch to first step (not with --quick), warm cache: `run_train` from its call to the end of the
  first optimizer step (rank 0's `step_hook`, wall clock of this machine), once with the old check
  and once with the new. With a warm cache the old launch differed from today's only in the check
  (the conversion is skipped either way), so `headers` is the old launch path.

Each pair's ratio is after / before. The check's cost grows with the samples (tar members), the
launch's fixed cost (Ray, Ray Train's worker group, the model) does not: the per-sample rate is
printed so the check can be scaled to a real corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sde_ray.config import load_config, with_values
from sde_ray.data.cache import prepare_data
from sde_ray.data.convert import convert_mmeb
from sde_ray.data.shards import check_shards
from sde_ray.data.synthetic import write_synthetic_mmeb
from sde_ray.ray_cluster import conversion_executor, start_local

# Rows per synthetic subset (11 subsets) and samples per shard.
SHAPE = {"train_per_subset": 1024, "samples_per_shard": 256}
QUICK_SHAPE = {"train_per_subset": 24, "samples_per_shard": 16}
REPEATS = 3
# The launches: the default tiny model, one worker, one step, no wandb, no final evaluation (no eval root).
LAUNCH = ["train.max_steps=1", "train.global_batch_size=16", "train.warmup_steps=0",
          "logging.wandb=false", "scaling.num_workers=1"]


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


class FirstStep:
    """A `step_hook` that writes the wall-clock time of rank 0's first step to a file (the worker
    runs in another process on this machine)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __call__(self, step: int, rank: int, **_) -> None:
        if step == 1 and rank == 0:
            Path(self.path).write_text(repr(time.time()))


def _launch_to_first_step(config, work: Path, label: str) -> float:
    from sde_ray.train.driver import run_train

    marker = work / f"first-step-{label}"
    config = with_values(config, {"train.output_dir": str(work / f"run-{label}")})
    start = time.time()
    run_train(config, step_hook=FirstStep(marker))
    return float(marker.read_text()) - start


# What a training worker imports to unpickle its loop: before, the loop plus the driver (the data
# factory lived there; the driver imports the evaluation runner, which imports matplotlib and
# wandb); after, the loop alone (the factory is in sde_ray.train.data, the spectrum plot imported
# when rank 0 draws it).
WORKER_IMPORTS = {"before": "import sde_ray.train.loop, sde_ray.train.driver", "after": "import sde_ray.train.loop"}


def _import_seconds(statement: str) -> float:
    """Wall seconds of `statement` in a fresh interpreter that has imported what a Ray Train worker
    has before it unpickles the loop (Ray Train's torch backend, torch; not timed)."""
    code = ("import ray.train.torch, torch, time; start = time.perf_counter(); "
            f"{statement}; import sys; "
            "assert ('matplotlib' in sys.modules) == ('driver' in " + repr(statement) + "); "
            "print(time.perf_counter() - start)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def worker_import_seconds(repeats: int) -> dict[str, float]:
    """Best of `repeats` fresh processes per import set, alternating before / after."""
    best = {label: float("inf") for label in WORKER_IMPORTS}
    for _ in range(repeats):
        for label, statement in WORKER_IMPORTS.items():
            best[label] = min(best[label], _import_seconds(statement))
    return best


def main(json_path: str | None = None, config=None, quick: bool = False) -> dict:
    del config  # the benchmark fixes its data and model
    shape = QUICK_SHAPE if quick else SHAPE
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="sde_ray_bench_startup_"))
    try:
        write_synthetic_mmeb(work / "synth", seed=0, train_per_subset=shape["train_per_subset"], eval_per_dataset=2)
        source = work / "synth" / "MMEB-train"
        config = load_config(None, [*LAUNCH, "data.source=mmeb", f"data.mmeb_train_dir={source}",
                                    f"data.cache_dir={work / 'cache'}",
                                    f"data.samples_per_shard={shape['samples_per_shard']}"])
        start = time.perf_counter()
        reference = convert_mmeb(source, work / "one-process", samples_per_shard=shape["samples_per_shard"],
                                 progress=False)
        one_process_s = time.perf_counter() - start

        started = start_local(cpus, log_to_driver=False, fresh=True)
        try:
            start = time.perf_counter()
            prepared = prepare_data(config, **conversion_executor())  # the in-job path: fills the cache
            ray_tasks_s = time.perf_counter() - start
            if prepared.manifest != reference:
                raise RuntimeError("the Ray tasks' conversion differs from the one-process conversion")
            shards, manifest = prepared.shards, prepared.manifest
            check = {depth: _best_seconds(lambda d=depth: check_shards(shards, manifest, depth=d), REPEATS)
                     for depth in ("headers", "manifest")}
            launch = {}
            if not quick:
                for label, depth in (("before", "headers"), ("after", "manifest")):
                    launch[label] = _launch_to_first_step(
                        with_values(config, {"data.shard_check": depth}), work, label)
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    imports = worker_import_seconds(1 if quick else REPEATS)
    samples = reference["num_samples"]
    result = {
        "samples": samples, "shards": reference["num_shards"], "cpus": cpus,
        "convert_one_process_s": one_process_s, "convert_ray_tasks_s": ray_tasks_s,
        "convert_ratio": ray_tasks_s / one_process_s,
        "check_headers_s": check["headers"], "check_manifest_s": check["manifest"],
        "check_ratio": check["manifest"] / check["headers"],
        "check_headers_s_per_100k_samples": check["headers"] / samples * 1e5,
    }
    print(f"{samples} samples in {reference['num_shards']} shards, a local Ray of {cpus} CPUs; "
          "before -> after (ratio after/before)")
    print(f"  conversion (cold cache): one process {one_process_s:.2f} s -> Ray tasks {ray_tasks_s:.2f} s "
          f"({result['convert_ratio']:.3f})")
    print(f"  shard check (warm cache): headers {check['headers'] * 1e3:.1f} ms -> manifest "
          f"{check['manifest'] * 1e3:.2f} ms ({result['check_ratio']:.4f}); the header parse costs "
          f"{result['check_headers_s_per_100k_samples']:.2f} s per 100k samples")
    result.update({"worker_imports_before_s": imports["before"], "worker_imports_after_s": imports["after"],
                   "worker_imports_ratio": imports["after"] / imports["before"]})
    print(f"  a training worker's imports: {imports['before']:.2f} s -> {imports['after']:.2f} s "
          f"({result['worker_imports_ratio']:.3f})")
    if launch:
        result.update({"launch_before_s": launch["before"], "launch_after_s": launch["after"],
                       "launch_ratio": launch["after"] / launch["before"]})
        print(f"  launch to first step (warm cache): {launch['before']:.1f} s -> {launch['after']:.1f} s "
              f"({result['launch_ratio']:.3f})")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
