"""The Ray Data side of training: each worker's batches of an epoch, read in an order our code computes.

Why not one dataset and `streaming_split`: streaming_split hands blocks to whichever worker asks
first, and the shard order of `read_webdataset(shuffle=FileShuffleConfig(...))` is re-drawn from
Ray's internal execution counter, which restarts at 0 with every new worker group. Neither is a
function of (seed, epoch), so a restarted or resized run trained other rows than the run it resumed.

Here every worker builds, per epoch, its own small Ray Data dataset from the read tasks of
`sde_ray.data.order.WorkerPlan` (one per (window, shard): the rows of that shard this worker
needs, ascending): `from_items(tasks) -> map_batches(read_task)`, where `read_task` reads only
those samples of the tar (`iter_samples`: one pass per task, at the offsets of the shard's member
index, which each process keeps; the other samples are never read) and runs the model's batch
processor on them in chunks, in CPU tasks of the data stage's reservation (`data_resources`, split
over the workers). The worker regroups the blocks of one window and gathers its batches from them
(`gather_rows`, one copy per row), in the plan's order.

So the rows of global step s are the same whatever the world size or the number of restarts, and
a resume at step k starts at the window holding k: earlier windows' shards are never opened. With
`data.batching=same_subset | teacher_cluster` the order's stream is the planner's batches
(`EpochOrder`); `train_data_from_config` reads the per-row group ids on the driver (sample keys from
the tar headers, teacher clusters from the mined sidecar) and refuses a mode whose inputs are
missing before any worker starts.

`BatchStream` drives that epoch after epoch and keeps the position that checkpoints save.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from sde_ray.data.batches import gather_rows, process_rows
from sde_ray.data.mmeb import stable_id
from sde_ray.data.order import EpochOrder, Window, WorkerPlan, order_spec, window_size
from sde_ray.data.shards import iter_samples

logger = logging.getLogger(__name__)

POSITION = "__pos__"  # stream position of a row (the order's coordinate), dropped from batches
WINDOW = "__window__"
SAMPLE_ID = "sample_id"  # stable_id of the WebDataset key: lets tests and logs count rows
# Per row of a batch: True where the row stands in for one the processor rejected at read time
# (the training loop pops it and counts the replacements into metrics.jsonl and results.json).
REPLACED = "__replaced__"

# A window's small pieces (one per processor chunk) are concatenated into runs of up to this many
# bytes before gathering: a memcpy costs less than gathering each batch from many small pieces (a
# torch op per piece and column). Measured on the consumer alone (one later epoch, 8,448 rows, in
# process, 2026-12-01): 32 px, 128 pieces of 0.4 MB per window: 0.38 CPU-s gathering from the
# pieces, 0.11 in runs of 8 MB, 0.08 of 16 MB, 0.05 all merged; 224 px chunks (9.6 MB) stay as
# they are (0.15-0.22 CPU-s either way, no extra copy of the 600 MB window).
MERGE_CHUNK_BYTES = 16 * 2**20


# ---------------------------------------------------------------------------------------------
# CPU reservation for the data stage


@dataclass(frozen=True)
class DataResources:
    """How the data stage's CPUs are spent: `concurrency` read+preprocess tasks of `task_cpus` each."""

    task_cpus: float
    concurrency: int

    @property
    def total(self) -> float:
        return self.task_cpus * self.concurrency


def data_resources(data_cpus: float, preprocess_concurrency: int) -> DataResources:
    """Splits `data_cpus` evenly over `preprocess_concurrency` concurrent read+preprocess tasks.

    The trap (DESIGN.md): Ray Data's read tasks ask for 1 CPU by default, and once the training
    workers hold the rest of the cluster a read that cannot be scheduled stalls forever. Sizing the
    tasks to fit inside `data_cpus` (which the train driver keeps out of the training workers' share)
    means the whole stage always fits. The concurrency is capped too: fractional tasks without a
    cap start many cold worker processes at once (measured here: 7x slower on 2 cores).
    """
    if data_cpus <= 0:
        raise ValueError(f"data.data_cpus must be > 0 for a Ray Data pipeline, got {data_cpus}")
    if preprocess_concurrency < 1:
        raise ValueError(f"data.preprocess_concurrency must be >= 1, got {preprocess_concurrency}")
    return DataResources(task_cpus=data_cpus / preprocess_concurrency, concurrency=preprocess_concurrency)


# ---------------------------------------------------------------------------------------------
# Processors, cached per Ray worker process

# Each Ray worker process keeps the processors it has built (keyed by their factory's pickled
# bytes): a tokenizer and image processor are built once per process and reused by every later
# task and epoch, which is what an actor pool would buy, without an actor start per epoch.
_PROCESSORS: OrderedDict[str, Callable[[dict], dict]] = OrderedDict()
_PROCESSORS_KEPT = 4


def processor_key(processor_factory: Callable[[], Callable[[dict], dict]]) -> str:
    """A stable name for a processor factory: the sha256 of its cloudpickled bytes."""
    from ray import cloudpickle

    return hashlib.sha256(cloudpickle.dumps(processor_factory)).hexdigest()


def cached_processor(key: str, processor_factory: Callable[[], Callable[[dict], dict]]) -> Callable[[dict], dict]:
    """This process's processor for `key`, built by `processor_factory()` on first use."""
    processor = _PROCESSORS.get(key)
    if processor is None:
        processor = _PROCESSORS[key] = processor_factory()
        while len(_PROCESSORS) > _PROCESSORS_KEPT:
            _PROCESSORS.popitem(last=False)
    _PROCESSORS.move_to_end(key)
    return processor


# ---------------------------------------------------------------------------------------------
# The epoch's data for one worker


@dataclass(frozen=True)
class TrainData:
    """Everything a worker needs to read any epoch (picklable; built on the driver).

    `paths`/`counts`: the usable shards (after `check_shards`) and their sample counts, in the
    check's order (the order function permutes them per epoch). `batching`/`groups`: the planner
    of `data.batching` and its per-row ids (rows of `paths` end to end; None for `random`).
    """

    paths: tuple[str, ...]
    counts: tuple[int, ...]
    processor_factory: Callable[[], Callable[[dict], dict]]
    seed: int
    global_batch: int
    window_rows: int
    data_cpus: float = 1.0
    concurrency: int = 1
    preprocess_batch_size: int = 64
    target_block_mb: float = 32.0
    batching: str = "random"
    groups: np.ndarray | None = field(default=None, compare=False, repr=False)

    def order(self, epoch: int) -> EpochOrder:
        return EpochOrder(self.counts, self.seed, epoch, self.global_batch, self.window_rows,
                          self.batching, self.groups)

    def window_steps(self) -> int:
        """Global steps per shuffle window (the window is rounded down to whole global batches)."""
        return window_size(self.window_rows, self.global_batch) // self.global_batch

    def spec(self) -> dict:
        return order_spec(self.paths, self.counts, self.seed, self.global_batch, self.window_rows,
                          self.batching, self.groups)


def batch_groups(config, paths: list[str], counts: list[int]) -> np.ndarray | None:
    """The per-row group ids `data.batching` plans by, for the shards `paths` (None for `random`).

    On the driver: the sample keys come from the local shards' tar headers, in the order the
    readers count rows; teacher clusters from `data.negatives_sidecar`. Raises ConfigError for a
    mode whose inputs are missing: remote shards, keys that name no subset, no sidecar, a sidecar
    without clusters or with clusters that do not divide the global batch.
    """
    from sde_ray.config import ConfigError
    from sde_ray.data.batching import row_groups
    from sde_ray.data.negatives import load_sidecar, shard_keys

    mode = config.data.batching
    if mode == "random":
        return None
    remote = [p for p in paths if "://" in p and not p.startswith("file://")]
    if remote:
        raise ConfigError(f"data.batching={mode} reads every row's sample key from the shards' tar headers on the "
                          f"driver: local shards only, got {remote[:2]}...")
    keys = shard_keys(paths)
    if len(keys) != sum(counts):
        raise ConfigError(f"data.batching={mode}: the shards hold {len(keys)} distinct sample keys but "
                          f"{sum(counts)} samples (a key repeated within or across shards?)")
    clusters, size = None, 0
    if mode == "teacher_cluster":
        if not config.data.negatives_sidecar:
            raise ConfigError("data.batching=teacher_cluster needs data.negatives_sidecar (a `sde-ray mine` output "
                              "mined with mine.cluster_size > 0)")
        sidecar = load_sidecar(config.data.negatives_sidecar)
        size, batch = int(sidecar.meta.get("cluster_size") or 0), config.train.global_batch_size
        if size <= 0:
            raise ConfigError(f"data.negatives_sidecar={config.data.negatives_sidecar} was mined without teacher "
                              "clusters (mine.cluster_size=0): mine again with mine.cluster_size > 0")
        if batch % size:
            raise ConfigError(f"data.batching=teacher_cluster: the sidecar's clusters of ~{size} rows (mine.cluster_size) "
                              f"do not divide train.global_batch_size={batch}: a batch would hold a fraction of a "
                              "cluster; mine with a cluster_size that divides the global batch")
        clusters = sidecar.clusters
    try:
        return row_groups(mode, keys, clusters, cluster_size=size)
    except ValueError as exc:
        raise ConfigError(f"data.batching={mode}: {exc}") from None


class ProcessorFactory:
    """Builds the model's BatchProcessor (with mined negatives when asked) inside a Ray Data task or
    a training worker; picklable: a config dataclass and paths. It lives here, not in the driver, so
    that unpickling it in a worker imports no driver-side module (the evaluation runner pulls in
    matplotlib and wandb: seconds of every worker's start, before its first step)."""

    def __init__(self, model_config, negatives_per_query: int = 0, sidecar: str = "",
                 shards: list[str] | None = None):
        self.model_config = model_config
        self.negatives_per_query, self.sidecar, self.shards = negatives_per_query, sidecar, shards or []

    def __call__(self):
        from sde_ray.models import BatchProcessor

        processor = BatchProcessor(self.model_config, self.negatives_per_query)
        if self.sidecar and self.negatives_per_query:
            from sde_ray.data.negatives import MinedNegatives

            return MinedNegatives(processor, self.sidecar, self.shards, self.negatives_per_query)
        return processor


def train_data_from_config(config, prepared, processor_factory) -> TrainData:
    """The `TrainData` of `config.data` / `config.train` and a `PreparedData` (the driver calls it)."""
    check = prepared.check
    counts = [check.samples.get(p) for p in check.paths] if check is not None else [None]
    if check is None or any(c is None for c in counts):
        raise ValueError("the epoch order needs every shard's sample count: give local shards or a manifest "
                         f"with num_samples for each of data.shards ({prepared.shards[:3]}...)")
    data = config.data
    if data.shuffle_window < 1:
        raise ValueError(f"data.shuffle_window must be >= 1 row, got {data.shuffle_window}")
    if data.preprocess_batch_size < 1:
        raise ValueError(f"data.preprocess_batch_size must be >= 1, got {data.preprocess_batch_size}")
    data_resources(data.data_cpus, data.preprocess_concurrency)  # validates
    counts = [int(c) for c in counts]
    groups = batch_groups(config, list(check.paths), counts)
    train_data = TrainData(paths=tuple(check.paths), counts=tuple(counts),
                           processor_factory=processor_factory, seed=data.shuffle_seed,
                           global_batch=config.train.global_batch_size, window_rows=data.shuffle_window,
                           data_cpus=data.data_cpus, concurrency=data.preprocess_concurrency,
                           preprocess_batch_size=data.preprocess_batch_size, target_block_mb=data.target_block_mb,
                           batching=data.batching, groups=None if groups is None else groups.astype(np.int32))
    if not train_data.order(0).steps:
        raise ValueError(f"data.batching={data.batching}: an epoch of these {sum(counts)} rows holds no full global "
                         f"batch of {config.train.global_batch_size} (same_subset: no subset has that many rows); "
                         "add data or lower train.global_batch_size")
    return train_data


def read_task(batch: dict, *, paths: tuple[str, ...], processor_factory, cache_key: str,
              chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: the rows of each read task in `batch` -> processed chunks with positions.

    Only the wanted samples are read from the tar; the processor runs on `chunk_rows` of them at a
    time (a task's memory stays at one chunk of decoded pixels). Rows it rejects are dropped and
    logged (`process_rows`); the positions column tells the consumer which ones survived.
    """
    processor = cached_processor(cache_key, processor_factory)
    for shard, rows, positions, window in zip(batch["shard"], batch["rows"], batch["positions"], batch["window"]):
        rows, positions = np.frombuffer(rows, dtype=np.int64), np.frombuffer(positions, dtype=np.int64)
        path = paths[int(shard)]
        for start, columns in zip(range(0, len(rows), chunk_rows), iter_samples(path, rows, chunk_rows)):
            out, kept = process_rows(columns, processor, path)
            if out is None:
                continue
            out[SAMPLE_ID] = np.array([stable_id(columns["__key__"][i]) for i in kept], dtype=np.int64)
            out[POSITION] = positions[start:start + chunk_rows][kept].astype(np.int64)
            out[WINDOW] = np.full(len(kept), int(window), dtype=np.int64)
            yield out


def epoch_dataset(data: TrainData, windows: list[Window], world_size: int):
    """This worker's Ray Dataset for the given windows: one block and one CPU task per read task."""
    import ray.data

    tasks = [{"shard": t.shard, "rows": t.rows.astype(np.int64).tobytes(),
              "positions": t.positions.astype(np.int64).tobytes(), "window": t.window}
             for window in windows for t in window.tasks]
    # Each worker drives its own dataset: the data stage's CPUs are split over the workers.
    resources = data_resources(data.data_cpus / world_size, data.concurrency)
    dataset = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    dataset = dataset.map_batches(
        read_task,
        fn_kwargs={"paths": data.paths, "processor_factory": data.processor_factory,
                   "cache_key": processor_key(data.processor_factory), "chunk_rows": data.preprocess_batch_size},
        batch_size=None,
        batch_format="numpy",
        num_cpus=resources.task_cpus,
        compute=ray.data.TaskPoolStrategy(size=resources.concurrency),
    )
    dataset.context.execution_options.preserve_order = True  # blocks arrive in plan order
    dataset.context.target_max_block_size = int(data.target_block_mb * 2**20)
    dataset.context.enable_progress_bars = False
    return dataset


def iter_epoch_batches(data: TrainData, epoch: int, rank: int, world_size: int, start_step: int = 0,
                       prefetch_batches: int = 1, merge_chunk_bytes: int | None = None) -> Iterator[dict]:
    """This worker's local batches (global batch / world size rows each) of `epoch` from
    `start_step` on, as CPU torch tensors, exactly `order.steps - start_step` of them."""
    plan = WorkerPlan(data.order(epoch), rank, world_size, start_step)
    windows = list(plan.windows())
    if not windows:
        return
    merge_chunk_bytes = MERGE_CHUNK_BYTES if merge_chunk_bytes is None else merge_chunk_bytes
    blocks = epoch_dataset(data, windows, world_size).iter_batches(
        batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    pieces = (piece for block in blocks for piece in torch_pieces(block))
    pending = None
    for window in windows:
        held = [pending] if pending is not None and int(pending[WINDOW][0]) == window.index else []
        pending = None if held else pending
        if pending is None:
            for piece in pieces:
                if int(piece[WINDOW][0]) != window.index:
                    pending = piece
                    break
                held.append(piece)
        yield from window_batches(window, held, merge_chunk_bytes)


def window_batches(window: Window, pieces: list[dict], merge_chunk_bytes: int = MERGE_CHUNK_BYTES) -> Iterator[dict]:
    """The window's batches gathered from its pieces, by stream position.

    A row the processor rejected is missing: its place in the batch is taken by another row of the
    same batch (logged), so every worker's batch stays full and the collectives stay in step.
    """
    import torch

    if not pieces:
        raise RuntimeError(f"window {window.index}: the processor rejected every row of this worker's share")
    pieces = merge_pieces(pieces, merge_chunk_bytes)
    positions = torch.cat([p[POSITION] for p in pieces]).numpy()
    by_position = np.argsort(positions, kind="stable")
    ordered = positions[by_position]
    pieces = [{k: v for k, v in p.items() if k not in (POSITION, WINDOW)} for p in pieces]
    for wanted in window.batches:
        slot = np.minimum(np.searchsorted(ordered, wanted), len(ordered) - 1)
        found = ordered[slot] == wanted
        if not found.all():
            present = slot[found]
            if not len(present):
                raise RuntimeError(f"window {window.index}: every row of a batch was rejected by the processor")
            logger.warning("%d rejected row(s) of a batch replaced by other rows of the same batch", int((~found).sum()))
            slot = np.where(found, slot, present[np.arange(len(slot)) % len(present)])
        # gather_rows returns the batch sorted by slot; the flags follow the same sort.
        by_slot = np.argsort(by_position[slot], kind="stable")
        batch = gather_rows(pieces, torch.as_tensor(by_position[slot], device="cpu"))
        batch[REPLACED] = torch.as_tensor(~found[by_slot], device="cpu")
        yield batch


def merge_pieces(pieces: list[dict], merge_chunk_bytes: int = MERGE_CHUNK_BYTES) -> list[dict]:
    """Consecutive pieces concatenated into runs of at most `merge_chunk_bytes` (a larger piece
    stays as it is): a gathered batch then touches a few pieces instead of one per chunk."""
    import torch

    merged, run, run_bytes = [], [], 0

    def flush() -> None:
        if run:
            merged.append(run[0] if len(run) == 1 else {name: torch.cat([p[name] for p in run]) for name in run[0]})

    for piece in pieces:
        size = sum(v.nbytes for v in piece.values())
        if run and run_bytes + size > merge_chunk_bytes:
            flush()
            run, run_bytes = [], 0
        run.append(piece)
        run_bytes += size
    flush()
    return merged


def torch_pieces(table) -> list[dict]:
    """A pyarrow Table -> one dict of torch tensors per record batch, sharing the Arrow memory.

    The tensors are read-only views of the object store (never written: `gather_rows` copies out).
    """
    import warnings

    import pyarrow as pa
    import torch
    from ray.data.block import BlockAccessor

    pieces = []
    for record_batch in table.to_batches():
        if not record_batch.num_rows:
            continue
        arrays = BlockAccessor.for_block(pa.Table.from_batches([record_batch])).to_batch_format("numpy")
        with warnings.catch_warnings():  # torch warns that the object store's arrays are read-only
            warnings.simplefilter("ignore")
            pieces.append({name: torch.as_tensor(value, device="cpu") for name, value in arrays.items()})
    return pieces


# ---------------------------------------------------------------------------------------------
# Epoch after epoch, positioned


class BatchStream:
    """Endless local batches of this worker, epoch after epoch, each step the same rows as the
    uninterrupted run's.

    Position: (epoch, global rows of the epoch consumed), a multiple of the global batch, so it is
    the same for every world size; `open_epoch(epoch, start_step)` yields the rest of that epoch.
    Every worker gets exactly `steps` batches per epoch (the order is a pure function), so the
    workers change epochs at the same step without having to agree on it.

    Look-ahead (`epoch_steps` given, `lead_steps` > 0): once `lead_steps` or fewer batches of the
    epoch are left, the next epoch is opened on a background thread and its first batch pulled, so
    its Ray dataset starts and its first window is read while this epoch's last batches train.
    Without it every epoch began with a stall of the whole first window's read plus a dataset's
    start-up (~6 s per epoch of the synthetic default on 2 cores, docs/training.md). Only the
    reading moves earlier: the batches and the saved position are the same, and no epoch is opened
    ahead beyond the `batches_left` the caller will still ask for. Cost: one more window decoded
    per worker while the two epochs overlap.
    """

    def __init__(self, open_epoch: Callable[[int, int], Iterator], global_rows: int, epoch: int, epoch_rows: int,
                 epoch_steps: Callable[[int], int] | None = None, lead_steps: int = 0,
                 batches_left: int | None = None):
        if epoch_rows % global_rows:
            raise ValueError(f"epoch position {epoch_rows} is not a whole number of global batches of {global_rows} "
                             "(checkpointed under another train.global_batch_size?)")
        self.open_epoch, self.global_rows = open_epoch, global_rows
        self.epoch, self.epoch_rows = epoch, epoch_rows
        self.epoch_steps = epoch_steps if lead_steps > 0 else None  # no look-ahead: no order built for it
        self.lead_steps, self.batches_left = lead_steps, batches_left
        self.ahead: _OpenedAhead | None = None
        self.iterator = iter(self.open_epoch(self.epoch, self.epoch_rows // self.global_rows))
        self.steps_in_epoch = self.epoch_steps(self.epoch) if self.epoch_steps else None

    def next(self) -> dict:
        for _ in range(2):
            batch = next(self.iterator, None)
            if batch is not None:
                self.epoch_rows += self.global_rows
                if self.batches_left is not None:
                    self.batches_left -= 1
                self._maybe_open_ahead()
                return batch
            self.epoch, self.epoch_rows = self.epoch + 1, 0
            ahead, self.ahead = self.ahead, None
            self.iterator = ahead.take() if ahead is not None else iter(self.open_epoch(self.epoch, 0))
            self.steps_in_epoch = self.epoch_steps(self.epoch) if self.epoch_steps else None
        raise RuntimeError(f"the training data yields no full global batch of {self.global_rows} rows; "
                           "add data or lower train.global_batch_size")

    def _maybe_open_ahead(self) -> None:
        if self.ahead is not None or self.steps_in_epoch is None:
            return
        left_in_epoch = self.steps_in_epoch - self.epoch_rows // self.global_rows
        if left_in_epoch > self.lead_steps:
            return
        if self.batches_left is not None and self.batches_left <= left_in_epoch:
            return  # the caller stops within this epoch: the next one would be read for nothing
        self.ahead = _OpenedAhead(self.open_epoch, self.epoch + 1)


class _OpenedAhead:
    """An epoch opened on a daemon thread that pulls its first batch; `take()` waits for it and
    hands over the whole epoch's iterator (an error on the thread is raised here)."""

    def __init__(self, open_epoch: Callable[[int, int], Iterator], epoch: int):
        self.first: dict | None = None
        self.rest: Iterator | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(open_epoch, epoch), daemon=True,
                                       name=f"sde_ray-epoch-{epoch}-ahead")
        self.thread.start()

    def _run(self, open_epoch: Callable[[int, int], Iterator], epoch: int) -> None:
        try:
            self.rest = iter(open_epoch(epoch, 0))
            self.first = next(self.rest, None)
        except BaseException as error:  # noqa: BLE001 - re-raised on the consuming thread
            self.error = error

    def take(self) -> Iterator:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return itertools.chain([] if self.first is None else [self.first], self.rest)


def open_epoch_fn(data: TrainData, rank: int, world_size: int) -> Callable[[int, int], Iterator]:
    def open_epoch(epoch: int, start_step: int) -> Iterator:
        return iter_epoch_batches(data, epoch, rank, world_size, start_step)

    return open_epoch


def batch_stream(data: TrainData, rank: int, world_size: int, epoch: int, epoch_rows: int, lookahead: bool = True,
                 batches_left: int | None = None) -> BatchStream:
    """This worker's `BatchStream` from (epoch, epoch_rows) on; with `lookahead` the next epoch is
    opened once the current one is in its last shuffle window (a window's steps ahead)."""
    return BatchStream(open_epoch_fn(data, rank, world_size), data.global_batch, epoch, epoch_rows,
                       epoch_steps=lambda e: data.order(e).steps,
                       lead_steps=data.window_steps() if lookahead else 0, batches_left=batches_left)


def batches_per_epoch(num_samples: int, num_workers: int, batch_size: int) -> int:
    """Local batches every worker gets per epoch: the epoch's global steps (rows // global batch)."""
    if num_workers < 1 or batch_size < 1:
        raise ValueError(f"num_workers and batch_size must be >= 1, got {num_workers}, {batch_size}")
    return num_samples // (num_workers * batch_size)

