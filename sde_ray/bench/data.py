"""`sde-ray bench data`: samples/s of the Ray Data pipeline against a single-process floor.

One run, side by side, on the same synthetic MMEB shards and the same batch processor
(`SimpleProcessor`: decode both images to fixed-size uint8 arrays, hash text to token ids), for
`epochs` passes over the data each, the way training iterates:

- floor: one process, `webdataset.WebDataset` read of the shards + the processor, batch by batch;
- floor_to_object_store: the floor, plus a `ray.put` of its output in Ray-sized blocks: what handing
  the pixels to another process costs at the least, whatever the pipeline (a reference, not a
  pipeline: nobody reads the blocks back);
- ray-1: the full pipeline (`sde_ray.train.data.iter_epoch_batches`, the training loop's iterator:
  epoch order, window shuffle and all) feeding one consumer, one dataset per epoch;
- ray-2: the same for two consumers at once (ranks 0 and 1 of a world of 2, each driving its
  own dataset of its rows, as training workers do), epoch after epoch.
- lookahead (the synthetic scenario): two consumers that each spend `step_seconds` per batch (a
  sleep: an accelerator's step, which uses no host CPU) pull their batches through the training
  loop's `batch_stream`, without and with `data.epoch_lookahead`, one after the other: the wall time
  and the time each step waited for data, per epoch. Without look-ahead every epoch starts with a
  stall (a new Ray dataset per epoch and worker, then the whole first window's reads).

Each run is timed on the wall clock and its CPU time is summed over this process and every process
under it (the local Ray cluster's raylet, workers and actors), so "per CPU" means samples per
CPU-second actually spent, Ray's own overhead included. Both are also split by epoch: the first
epoch carries the start-up (worker processes importing the processor, the split coordinator
actor), which a training run pays once, while the later epochs are what every further epoch costs.
The target is a per-CPU ratio >= 0.8 of the floor. A second figure divides by the CPUs the
pipeline reserves (`data.data_cpus`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from sde_ray.config import Config
from sde_ray.data.convert import convert_mmeb
from sde_ray.data.batches import raw_batch_from_rows
from sde_ray.data.mmeb import stable_id
from sde_ray.data.shards import check_shards
from sde_ray.data.synthetic import write_synthetic_mmeb
from sde_ray.ray_cluster import start_local
from sde_ray.train.data import TrainData, iter_epoch_batches


class SimpleProcessor:
    """A model-free batch processor (the data benchmark's and the tests' stand-in for the model's).

    Decodes each image to RGB `image_size`² uint8 pixels (zeros when absent; the model normalises,
    as with `sde_ray.models.BatchProcessor`) and hashes text into `max_len` int64 token ids, so its
    cost resembles a real processor's decode + tokenize. Also emits `key_id` (a stable int64 per
    sample key) so tests can count samples.
    """

    def __init__(self, image_size: int = 32, max_len: int = 16, vocab: int = 4096) -> None:
        self.image_size, self.max_len, self.vocab = image_size, max_len, vocab

    def _pixels(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        import io

        from PIL import Image

        out = np.zeros((len(images), 3, self.image_size, self.image_size), dtype=np.uint8)
        present = np.zeros(len(images), dtype=bool)
        for i, data in enumerate(images):
            if data is None:
                continue
            with Image.open(io.BytesIO(data)) as image:
                rgb = image.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
            out[i] = np.asarray(rgb).transpose(2, 0, 1)
            present[i] = True
        return out, present

    def _tokens(self, texts: list[str]) -> np.ndarray:
        ids = np.zeros((len(texts), self.max_len), dtype=np.int64)
        for i, text in enumerate(texts):
            words = text.split()[: self.max_len]
            ids[i, : len(words)] = [1 + int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "little")
                                    % (self.vocab - 1) for w in words]
        return ids

    def __call__(self, raw: dict[str, list]) -> dict[str, np.ndarray]:
        out = {}
        for side in ("qry", "pos"):
            out[f"{side}_input_ids"] = self._tokens(raw[f"{side}_text"])
            out[f"{side}_attention_mask"] = (out[f"{side}_input_ids"] > 0).astype(np.int64)
            out[f"{side}_pixel_values"], out[f"{side}_has_image"] = self._pixels(raw[f"{side}_image"])
        out["target_id"] = np.array([stable_id(h) for h in raw["target_hash"]], dtype=np.int64)
        out["key_id"] = np.array([stable_id(k) for k in raw["key"]], dtype=np.int64)
        return out


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

    def current(self) -> float:
        """CPU seconds so far (a fresh snapshot on top of what the poller has seen)."""
        seen = {**self._seen, **self._snapshot()}
        return sum(cpu - self._baseline.get(pid, 0.0) for pid, cpu in seen.items())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._seen.update(self._snapshot())
        return sum(cpu - self._baseline.get(pid, 0.0) for pid, cpu in self._seen.items())


def _measure(run) -> dict:
    """Runs `run(end_epoch)`, where `end_epoch(samples_so_far)` is called after each epoch."""
    meter = CpuMeter()
    meter.start()
    start = time.perf_counter()
    marks = [(0, 0.0, 0.0)]  # (samples, seconds, cpu seconds) at each epoch's end

    def end_epoch(samples: int) -> None:
        marks.append((samples, time.perf_counter() - start, meter.current()))

    samples = run(end_epoch)
    seconds = time.perf_counter() - start
    cpu = meter.stop()
    epochs = [{"samples": n1 - n0, "seconds": t1 - t0, "cpu_seconds": c1 - c0}
              for (n0, t0, c0), (n1, t1, c1) in zip(marks, marks[1:])]
    result = {"samples": samples, "seconds": seconds, "cpu_seconds": cpu, "epochs": epochs}
    result.update(_rates(samples, seconds, cpu))
    if len(epochs) > 1:
        later = {key: sum(epoch[key] for epoch in epochs[1:]) for key in ("samples", "seconds", "cpu_seconds")}
        result["later_epochs"] = {**later, **_rates(later["samples"], later["seconds"], later["cpu_seconds"])}
    return result


def _rates(samples: int, seconds: float, cpu: float) -> dict:
    return {"samples_per_s": samples / max(seconds, 1e-9), "samples_per_cpu_s": samples / max(cpu, 1e-9)}


def floor_run(paths: list[str], processor: SimpleProcessor, batch_size: int, epochs: int = 1,
              end_epoch=lambda n: None, transfer_block_bytes: int | None = None) -> int:
    """Single-process webdataset read + the same processor, no Ray (webdataset imported by main).

    With `transfer_block_bytes`, every processed batch is also handed to Ray's object store
    (`ray.put`), gathered into blocks of about that many bytes as a Ray Data task's output is. That
    is the floor of any pipeline whose preprocessing runs in another process than the training
    loop: the pixels have to cross into shared memory once.
    """
    import webdataset as wds

    columns = ("__key__", "json", "qry.img", "pos.img")
    hand_over = ObjectStoreHandOver(transfer_block_bytes) if transfer_block_bytes else lambda out: None
    samples = 0
    for _ in range(epochs):
        pending = {name: [] for name in columns}
        for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
            for name in columns:
                pending[name].append(sample.get(name))
            if len(pending["json"]) == batch_size:
                hand_over(processor(raw_batch_from_rows(pending)))
                samples += batch_size
                pending = {name: [] for name in columns}
        if pending["json"]:
            hand_over(processor(raw_batch_from_rows(pending)))
            samples += len(pending["json"])
        hand_over(None)  # the epoch's last, partly filled block
        end_epoch(samples)
    return samples


class ObjectStoreHandOver:
    """Puts processed batches into Ray's object store in blocks of ~`block_bytes` (None flushes)."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes, self.tables, self.bytes = block_bytes, [], 0
        self.puts = self.bytes_put = 0

    def __call__(self, batch: dict | None) -> None:
        import pyarrow as pa
        import ray
        from ray.data.block import BlockAccessor

        if batch is not None:
            table = BlockAccessor.batch_to_block(batch)
            self.tables.append(table)
            self.bytes += table.nbytes
        if self.tables and (batch is None or self.bytes >= self.block_bytes):
            ray.put(pa.concat_tables(self.tables))  # the reference is dropped: freed at once
            self.puts, self.bytes_put = self.puts + 1, self.bytes_put + self.bytes
            self.tables, self.bytes = [], 0


def ray_run(data: TrainData, consumers: int, epochs: int = 1, end_epoch=lambda n: None) -> int:
    """Consumes `epochs` passes the way training workers do (`iter_epoch_batches`, rank i of
    `consumers`; `data.global_batch` rows per step over all consumers)."""
    counts = [0] * consumers
    barrier = threading.Barrier(consumers, action=lambda: end_epoch(sum(counts)))

    def consume(index: int) -> None:
        for epoch in range(epochs):
            for batch in iter_epoch_batches(data, epoch, index, consumers):
                counts[index] += len(batch["key_id"])
            barrier.wait()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts)


def lookahead_run(data: TrainData, consumers: int, epochs: int, step_seconds: float, lookahead: bool) -> dict:
    """Consumers pulling `epochs` epochs through `batch_stream` at `step_seconds` per step: the wall
    time and the largest consumer's wait for data (the steps are in lock-step in training)."""
    from sde_ray.train.data import batch_stream

    steps = sum(data.order(epoch).steps for epoch in range(epochs))
    waits = [0.0] * consumers

    def consume(index: int) -> None:
        stream = batch_stream(data, index, consumers, 0, 0, lookahead=lookahead, batches_left=steps)
        for _ in range(steps):
            began = time.perf_counter()
            stream.next()
            waits[index] += time.perf_counter() - began
            time.sleep(step_seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(consumers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"lookahead": lookahead, "steps": steps, "step_seconds": step_seconds, "seconds": seconds,
            "wait_seconds": max(waits), "wait_seconds_per_epoch": max(waits) / epochs,
            "compute_seconds": steps * step_seconds}


def main(json_path: str | None = None, config: Config | None = None, quick: bool = False,
         epochs: int = 3) -> dict:
    """Two scenarios: the synthetic default (`data.synth.image_size`, tiny images: Ray's fixed costs
    weigh most) and photo-sized 224 px JPEGs decoded to 224 px, as a CLIP processor would."""
    import ray
    import torch

    config = config or Config()
    # The consumers stand in for 1-CPU training workers, which Ray Train starts with
    # OMP_NUM_THREADS=1; with more intra-op threads, idle OpenMP threads spin between the small
    # batch-cutting ops and burn CPU that no training worker would.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started_ray = start_local(4, log_to_driver=False, fresh=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    scenarios = {f"synthetic_{config.data.synth.image_size}px": (config.data.synth.image_size, 48 if quick else 768),
                 "photo_224px": (224, 8 if quick else 192)}
    report = {"benchmark": "data", "quick": quick, "epochs": epochs, "target_ratio_per_cpu": 0.8, "scenarios": {}}
    try:
        # Warm Ray's worker pool so that no run pays for the first process start-ups, and import
        # webdataset (which imports torch) outside the floor's timing.
        import webdataset  # noqa: F401

        ray.data.range(8).map_batches(lambda batch: batch).take_all()
        idle = _measure(lambda end: (time.sleep(3.0), 0)[1])
        report["idle_cluster_cpu_per_s"] = idle["cpu_seconds"] / idle["seconds"]
        for name, (image_size, per_subset) in scenarios.items():
            scenario = _scenario(config.data, image_size, per_subset, epochs, report["idle_cluster_cpu_per_s"],
                                 lookahead=name.startswith("synthetic"))
            report["scenarios"][name] = scenario
            print(_table(name, scenario, epochs, report["idle_cluster_cpu_per_s"]), flush=True)
    finally:
        torch.set_num_threads(threads)
        if started_ray:
            ray.shutdown()
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _scenario(data, image_size: int, per_subset: int, epochs: int, idle_cpu_per_s: float,
              lookahead: bool = False, step_seconds: float = 0.02) -> dict:
    """Floor, ray-1 and ray-2 on freshly generated shards of `image_size` px images; with
    `lookahead`, also 2 consumers at `step_seconds` per step without and with epoch look-ahead."""
    processor = functools.partial(SimpleProcessor, image_size=image_size)
    batch_size = 32
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="sde_ray_bench_data_") as tmp:
        write_synthetic_mmeb(tmp, seed=0, train_per_subset=per_subset, eval_per_dataset=2, image_size=image_size)
        manifest = convert_mmeb(Path(tmp) / "MMEB-train", Path(tmp) / "shards",
                                samples_per_shard=data.samples_per_shard, progress=False)
        check = check_shards(str(Path(tmp) / "shards"), manifest)

        def train_data(consumers: int) -> TrainData:
            return TrainData(
                paths=tuple(check.paths), counts=tuple(check.samples[p] for p in check.paths),
                processor_factory=processor, seed=0, global_batch=batch_size * consumers,
                window_rows=data.shuffle_window, data_cpus=data.data_cpus, concurrency=data.preprocess_concurrency,
                preprocess_batch_size=data.preprocess_batch_size, target_block_mb=data.target_block_mb)

        results["floor"] = _measure(
            lambda end: floor_run(check.paths, processor(), data.preprocess_batch_size, epochs, end))
        results["floor_to_object_store"] = _measure(
            lambda end: floor_run(check.paths, processor(), data.preprocess_batch_size, epochs, end,
                                  transfer_block_bytes=int(data.target_block_mb * 2**20)))
        for name, consumers in (("ray_1_consumer", 1), ("ray_2_consumers", 2)):
            results[name] = _measure(
                lambda end, n=consumers: ray_run(train_data(n), n, epochs, end))
        if lookahead:
            results["lookahead"] = [lookahead_run(train_data(2), 2, epochs, step_seconds, on) for on in (False, True)]
    floor, transfer = results["floor"], results["floor_to_object_store"]
    for name in ("floor_to_object_store", "ray_1_consumer", "ray_2_consumers"):
        run = results[name]
        run["ratio_throughput"] = run["samples_per_s"] / floor["samples_per_s"]
        run["ratio_per_cpu"] = run["samples_per_cpu_s"] / floor["samples_per_cpu_s"]
        if "later_epochs" in run:
            later, floor_later = run["later_epochs"], floor["later_epochs"]
            later["ratio_per_cpu"] = later["samples_per_cpu_s"] / floor_later["samples_per_cpu_s"]
            later["ratio_throughput"] = later["samples_per_s"] / floor_later["samples_per_s"]
    for name in ("ray_1_consumer", "ray_2_consumers"):
        run = results[name]
        # The idle Ray node (raylet, GCS, idle workers) burns CPU whatever the pipeline does; this
        # figure charges the pipeline only for what it adds on top.
        busy_cpu = max(run["cpu_seconds"] - idle_cpu_per_s * run["seconds"], 1e-9)
        run["samples_per_busy_cpu_s"] = run["samples"] / busy_cpu
        run["ratio_per_busy_cpu"] = run["samples_per_busy_cpu_s"] / floor["samples_per_cpu_s"]
        run["samples_per_s_per_reserved_cpu"] = run["samples_per_s"] / data.data_cpus
        run["ratio_per_reserved_cpu"] = run["samples_per_s_per_reserved_cpu"] / floor["samples_per_s"]
        if "later_epochs" in run:
            # Against the floor that also hands its output to the object store: Ray Data's own
            # cost on top of what any out-of-process preprocessing pays.
            run["later_epochs"]["ratio_per_cpu_vs_floor_to_object_store"] = (
                run["later_epochs"]["samples_per_cpu_s"] / transfer["later_epochs"]["samples_per_cpu_s"])
    if lookahead:
        off, on = results["lookahead"]
        results["lookahead_ratio_wall"] = on["seconds"] / off["seconds"]
    return {"image_size": image_size, "num_samples": manifest["num_samples"], "num_shards": manifest["num_shards"],
            "batch_size": batch_size, "shuffle_window": data.shuffle_window,
            "preprocess_batch_size": data.preprocess_batch_size, "data_cpus": data.data_cpus,
            "preprocess_concurrency": data.preprocess_concurrency, "results": results}


def _table(name: str, scenario: dict, epochs: int, idle_cpu_per_s: float) -> str:
    nan = float("nan")
    lines = [(f"data bench [{name}]: {scenario['num_samples']} samples in {scenario['num_shards']} shards x {epochs} "
              f"epochs, data_cpus={scenario['data_cpus']}, preprocess_concurrency="
              f"{scenario['preprocess_concurrency']}, preprocess_batch_size={scenario['preprocess_batch_size']}"),
             (f"{'run':<22}{'samples/s':>10}{'cpu-s':>7}{'samples/cpu-s':>14}{'x floor':>8}{'x floor/cpu':>12}"
              f"{'epoch 1 s':>10}{'later: x floor':>15}{'x floor/cpu':>12}{'x floor/busy cpu':>17}")]
    floor = scenario["results"]["floor"]
    for run_name, run in scenario["results"].items():
        if run_name.startswith("lookahead"):
            continue
        later, floor_later = run.get("later_epochs", {}), floor.get("later_epochs", {})
        busy = run.get("ratio_per_busy_cpu")  # Ray runs only: the floors start no Ray process
        lines.append(f"{run_name:<22}{run['samples_per_s']:>10.1f}{run['cpu_seconds']:>7.1f}"
                     f"{run['samples_per_cpu_s']:>14.1f}"
                     f"{run['samples_per_s'] / floor['samples_per_s']:>8.2f}"
                     f"{run['samples_per_cpu_s'] / floor['samples_per_cpu_s']:>12.2f}"
                     f"{run['epochs'][0]['seconds']:>10.2f}"
                     f"{later.get('samples_per_s', nan) / floor_later.get('samples_per_s', nan):>15.2f}"
                     f"{later.get('samples_per_cpu_s', nan) / floor_later.get('samples_per_cpu_s', nan):>12.2f}"
                     + (f"{busy:>17.2f}" if busy is not None else f"{'-':>17}"))
    lines.append(f"idle Ray node: {idle_cpu_per_s:.2f} CPU-s/s (subtracted in the last column); "
                 f"'later' = epochs 2..{epochs}, what each epoch after the start-up costs")
    if "lookahead" in scenario["results"]:
        off, on = scenario["results"]["lookahead"]
        lines.append(f"epoch look-ahead, 2 consumers, {off['steps']} steps of {1000 * off['step_seconds']:.0f} ms: "
                     f"wall {off['seconds']:.1f} s -> {on['seconds']:.1f} s "
                     f"(x{scenario['results']['lookahead_ratio_wall']:.2f}); waiting for data "
                     f"{off['wait_seconds_per_epoch']:.2f} -> {on['wait_seconds_per_epoch']:.2f} s per epoch")
    return "\n".join(lines)
