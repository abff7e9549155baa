"""`sde-ray bench data`: samples/s of the Ray Data pipeline against a single-process floor.

One run, side by side, on the same synthetic MMEB shards and the same batch processor
(`SimpleProcessor`: decode both images to fixed-size arrays, hash text to token ids):

- floor: one process, `webdataset.WebDataset` read of the shards + the processor, batch by batch;
- ray-1: the full pipeline (`build_train_dataset` -> `iter_torch_batches`) feeding one consumer;
- ray-2: the same dataset through `streaming_split(2, equal=True)` feeding two consumers at once.

Each run is timed on the wall clock and its CPU time is summed over this process and every process
under it (the local Ray cluster's raylet, workers and actors), so "per CPU" means samples per
CPU-second actually spent, Ray's own overhead included. The target is a per-CPU ratio >= 0.8 of
the floor. A second figure divides by the CPUs the pipeline reserves (`data.data_cpus`).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

import psutil

from sde_ray.config import Config
from sde_ray.data.convert import convert_mmeb
from sde_ray.data.pipeline import (
    SimpleProcessor,
    build_train_dataset,
    check_shards,
    data_resources,
    raw_batch_from_rows,
)
from sde_ray.data.synthetic import write_synthetic_mmeb


class CpuMeter:
    """CPU seconds used by this process and all its descendants between start() and stop().

    Polls the process tree so that processes which exit mid-run (Ray actors) still count.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._seen: dict[int, float] = {}
        self._baseline: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _snapshot(self) -> dict[int, float]:
        root = psutil.Process()
        out = {}
        for proc in [root] + root.children(recursive=True):
            try:
                times = proc.cpu_times()
                out[proc.pid] = times.user + times.system
            except psutil.Error:
                continue
        return out

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._seen.update(self._snapshot())

    def start(self) -> None:
        self._baseline = self._snapshot()
        self._seen = dict(self._baseline)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._seen.update(self._snapshot())
        return sum(cpu - self._baseline.get(pid, 0.0) for pid, cpu in self._seen.items())


def _measure(run) -> dict:
    """Runs `run(mark)`; `mark(samples_so_far)` at the first batch splits off the start-up cost."""
    meter = CpuMeter()
    meter.start()
    start = time.perf_counter()
    first: dict = {}

    def mark(samples: int) -> None:
        if not first:
            first.update(seconds=time.perf_counter() - start, samples=samples,
                         cpu=sum(c - meter._baseline.get(p, 0.0) for p, c in {**meter._seen, **meter._snapshot()}.items()))

    samples = run(mark)
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    result = {"samples": samples, "seconds": seconds, "cpu_seconds": cpu,
              "samples_per_s": samples / seconds, "samples_per_cpu_s": samples / max(cpu, 1e-9)}
    if first and samples > first["samples"]:
        steady = samples - first["samples"]
        result["startup_seconds"] = first["seconds"]
        result["steady_samples_per_s"] = steady / max(seconds - first["seconds"], 1e-9)
        result["steady_samples_per_cpu_s"] = steady / max(cpu - first["cpu"], 1e-9)
    return result


def floor_run(paths: list[str], processor: SimpleProcessor, batch_size: int, mark=lambda n: None) -> int:
    """Single-process webdataset read + the same processor, no Ray (webdataset imported by main)."""
    import webdataset as wds

    columns = ("__key__", "json", "qry.img", "pos.img")
    samples, pending = 0, {name: [] for name in columns}
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        for name in columns:
            pending[name].append(sample.get(name))
        if len(pending["json"]) == batch_size:
            processor(raw_batch_from_rows(pending))
            samples += batch_size
            mark(samples)
            pending = {name: [] for name in columns}
    if pending["json"]:
        processor(raw_batch_from_rows(pending))
        samples += len(pending["json"])
    return samples


def ray_run(dataset, consumers: int, batch_size: int, mark=lambda n: None) -> int:
    counts = [0] * consumers
    if consumers == 1:
        for batch in dataset.iter_torch_batches(batch_size=batch_size, drop_last=True):
            counts[0] += len(batch["key_id"])
            mark(counts[0])
        return counts[0]
    iterators = dataset.streaming_split(consumers, equal=True)

    def consume(index: int) -> None:
        for batch in iterators[index].iter_torch_batches(batch_size=batch_size, drop_last=True):
            counts[index] += len(batch["key_id"])
            mark(sum(counts))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False) -> dict:
    import ray

    config = config or Config()
    data = config.data
    per_subset = 48 if quick else 768
    started_ray = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        started_ray = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = data_resources(data.data_cpus, data.preprocess_concurrency)
    batch_size = 32
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="sde_ray_bench_data_") as tmp:
            write_synthetic_mmeb(tmp, seed=0, train_per_subset=per_subset, eval_per_dataset=2,
                                 image_size=data.synth.image_size)
            manifest = convert_mmeb(Path(tmp) / "MMEB-train", Path(tmp) / "shards",
                                    samples_per_shard=data.samples_per_shard, progress=False)
            check = check_shards(str(Path(tmp) / "shards"), manifest)

            def dataset():
                return build_train_dataset(
                    check.paths, SimpleProcessor, seed=0, check=check,
                    preprocess_concurrency=resources.concurrency, preprocess_batch_size=data.preprocess_batch_size,
                    num_cpus_per_actor=resources.actor_cpus, read_cpus=resources.read_cpus,
                    read_concurrency=resources.read_concurrency)

            # Warm Ray's worker pool so that no run pays for the first process start-ups, and import
            # webdataset (which imports torch) outside the floor's timing.
            import webdataset  # noqa: F401

            ray.data.range(8).map_batches(lambda batch: batch).take_all()
            idle = _measure(lambda mark: (time.sleep(3.0), 0)[1])
            idle_cpu_per_s = idle["cpu_seconds"] / idle["seconds"]
            results["floor"] = _measure(
                lambda mark: floor_run(check.paths, SimpleProcessor(), data.preprocess_batch_size, mark))
            results["ray_1_consumer"] = _measure(lambda mark: ray_run(dataset(), 1, batch_size, mark))
            results["ray_2_consumers"] = _measure(lambda mark: ray_run(dataset(), 2, batch_size, mark))
    finally:
        if started_ray:
            ray.shutdown()
    floor = results["floor"]
    for name in ("ray_1_consumer", "ray_2_consumers"):
        run = results[name]
        # The idle Ray node (raylet, GCS, idle workers) burns CPU whatever the pipeline does; this
        # figure charges the pipeline only for what it adds on top.
        busy_cpu = max(run["cpu_seconds"] - idle_cpu_per_s * run["seconds"], 1e-9)
        run["samples_per_busy_cpu_s"] = run["samples"] / busy_cpu
        run["ratio_per_busy_cpu"] = run["samples_per_busy_cpu_s"] / floor["samples_per_cpu_s"]
        run["ratio_throughput"] = run["samples_per_s"] / floor["samples_per_s"]
        run["ratio_per_cpu"] = run["samples_per_cpu_s"] / floor["samples_per_cpu_s"]
        run["samples_per_s_per_reserved_cpu"] = run["samples_per_s"] / data.data_cpus
        run["ratio_per_reserved_cpu"] = run["samples_per_s_per_reserved_cpu"] / floor["samples_per_s"]
        if "steady_samples_per_cpu_s" in run and "steady_samples_per_cpu_s" in floor:
            run["ratio_steady_per_cpu"] = run["steady_samples_per_cpu_s"] / floor["steady_samples_per_cpu_s"]
    report = {"benchmark": "data", "quick": quick, "num_samples": manifest["num_samples"],
              "num_shards": manifest["num_shards"], "batch_size": batch_size,
              "preprocess_batch_size": data.preprocess_batch_size, "data_cpus": data.data_cpus,
              "preprocess_concurrency": data.preprocess_concurrency, "results": results,
              "idle_cluster_cpu_per_s": idle_cpu_per_s,
              "target_ratio_per_cpu": 0.8}
    print(_table(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _table(report: dict) -> str:
    lines = [(f"data bench: {report['num_samples']} samples in {report['num_shards']} shards, "
             f"data_cpus={report['data_cpus']}, preprocess_concurrency={report['preprocess_concurrency']}"),
             (f"{'run':<18}{'samples/s':>10}{'cpu-s':>7}{'samples/cpu-s':>14}{'x floor':>8}{'x floor/cpu':>12}"
             f"{'start s':>8}{'steady x floor/cpu':>20}{'x floor/busy cpu':>18}")]
    floor = report["results"]["floor"]
    for name, run in report["results"].items():
        steady = run.get("steady_samples_per_cpu_s", float("nan")) / floor.get("steady_samples_per_cpu_s", float("nan"))
        lines.append(f"{name:<18}{run['samples_per_s']:>10.1f}{run['cpu_seconds']:>7.1f}"
                     f"{run['samples_per_cpu_s']:>14.1f}"
                     f"{run['samples_per_s'] / floor['samples_per_s']:>8.2f}"
                     f"{run['samples_per_cpu_s'] / floor['samples_per_cpu_s']:>12.2f}"
                     f"{run.get('startup_seconds', float('nan')):>8.2f}{steady:>20.2f}"
                     f"{run.get('ratio_per_busy_cpu', 1.0):>18.2f}")
    lines.append(f"idle Ray node: {report['idle_cluster_cpu_per_s']:.2f} CPU-s/s (subtracted in the last column)")
    return "\n".join(lines)
