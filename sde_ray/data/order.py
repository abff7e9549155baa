"""The data order of an epoch: a pure function of (shards, seed, epoch, global batch, window, batching).

Nothing here depends on Ray, on the world size, or on how many times a run was restarted, so a
resumed or resized run sees exactly the rows the uninterrupted run would have seen. An epoch is a
*stream*: the (shard, row) of every stream position, a function of (seed, epoch). Global step s
takes stream positions [s·G, (s+1)·G) (G = global batch); worker r of W takes the slice
[s·G + r·L, s·G + (r+1)·L), L = G / W. Every worker therefore gets the same number of batches, and a
step is the same set of rows for every W that divides G. Two ways to build the stream
(`data.batching`):

- `random` (the default), a windowed shuffle of the shard-ordered stream:
  1. shard order: a permutation of the shards drawn from `epoch_seed(seed, epoch)`;
  2. every row of every shard, shard after shard in that order;
  3. that stream cut into windows of `window_rows` consecutive rows (whole global batches), each
     window permuted by its own generator (seed, epoch, window). A window spans many shards, so a
     batch mixes rows of many shards and which rows share a batch changes every epoch.
  The last G-incomplete rows of the stream are not trained in that epoch (a different tail every
  epoch).
- a planner of `sde_ray.data.batching` (`same_subset`, `teacher_cluster`): the epoch's global
  batches are `plan_epoch(groups, seed, epoch, G)` over the rows' group ids (`groups[i]` for the
  i-th row of the shards laid end to end in `counts` order: the subset, or the teacher cluster),
  and the stream is those batches one after the other. The planner's remainder rule is `drop`:
  rows that fill no whole batch (per subset for `same_subset`, over the epoch for
  `teacher_cluster`) sit out the epoch, so every row is trained at most once per epoch;
  `EpochOrder.dropped_rows` counts them (the same number every epoch: it depends on the group
  sizes only). A planned batch draws its rows from anywhere in the corpus, so a window of it reads
  from many shards (each shard once per window, its wanted rows only).

`WorkerPlan` turns a stream into what one worker has to read from a given step on: per window
(`window_rows` consecutive stream positions), the rows of each shard it needs (sorted, so a reader
skips the others without decoding them) and its batches as stream positions. Consumed windows are
not in the plan at all, so their shards are never opened; inside the window the resume falls in,
the consumed rows are left out of the reads. Both stream kinds are positioned the same way.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from sde_ray.data.batching import GROUP_COLUMN, plan_epoch


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed for (seed, epoch), the same on every platform and process."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little")


def window_size(window_rows: int, global_batch: int) -> int:
    """`window_rows` rounded down to whole global batches, at least one (windows align with steps)."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    return max(1, window_rows // global_batch) * global_batch


@dataclass(frozen=True)
class EpochOrder:
    """The order of one epoch (see the module docstring). `counts[i]` rows in shard i; `groups`:
    one group id per row (shards end to end), needed by every `batching` but `random`."""

    counts: tuple[int, ...]
    seed: int
    epoch: int
    global_batch: int
    window_rows: int
    batching: str = "random"
    groups: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if any(c < 0 for c in self.counts):
            raise ValueError(f"shard row counts must be >= 0, got {self.counts}")
        if self.batching != "random":
            if self.batching not in GROUP_COLUMN:
                raise ValueError(f"unknown batching {self.batching!r}; valid: random, {', '.join(GROUP_COLUMN)}")
            if self.groups is None or len(self.groups) != self.num_rows:
                raise ValueError(f"batching={self.batching} needs one group id per row ({self.num_rows}), got "
                                 f"{None if self.groups is None else len(self.groups)}")
        object.__setattr__(self, "window_rows", window_size(self.window_rows, self.global_batch))

    @property
    def num_rows(self) -> int:
        return int(sum(self.counts))

    @property
    def steps(self) -> int:
        """Optimizer steps in this epoch (the same for every world size that divides G)."""
        return len(self._stream[0]) // self.global_batch

    @property
    def dropped_rows(self) -> int:
        """Rows of the shards that no step of this epoch trains (the remainder)."""
        return self.num_rows - self.steps * self.global_batch

    def shard_order(self) -> np.ndarray:
        return np.random.default_rng(epoch_seed(self.seed, self.epoch)).permutation(len(self.counts))

    def stream(self) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row index in shard) of every stream position of the epoch."""
        return self._stream

    @cached_property
    def _stream(self) -> tuple[np.ndarray, np.ndarray]:
        # Computed once per order (WorkerPlan reads it for every window); frozen dataclasses allow it.
        return self._windowed_stream() if self.batching == "random" else self._planned_stream()

    def _windowed_stream(self) -> tuple[np.ndarray, np.ndarray]:
        order = self.shard_order()
        counts = np.asarray(self.counts, dtype=np.int64)
        shard = np.repeat(order, counts[order])
        row = np.concatenate([np.arange(counts[i]) for i in order]) if len(order) else np.zeros(0, np.int64)
        for start in range(0, len(shard), self.window_rows):
            stop = min(start + self.window_rows, len(shard))
            perm = np.random.default_rng([epoch_seed(self.seed, self.epoch), start // self.window_rows])
            perm = start + perm.permutation(stop - start)
            shard[start:stop], row[start:stop] = shard[perm], row[perm]
        return shard, row.astype(np.int64)

    def _planned_stream(self) -> tuple[np.ndarray, np.ndarray]:
        # world=1: the plan must not depend on the world size (an elastic resume sees the same batches);
        # WorkerPlan checks that its world divides G.
        plan = plan_epoch({GROUP_COLUMN[self.batching]: self.groups}, self.seed, self.epoch, self.global_batch,
                          world=1, mode=self.batching, remainder="drop")
        flat = plan.reshape(-1)
        starts = np.concatenate([[0], np.cumsum(np.asarray(self.counts, dtype=np.int64))])
        shard = np.searchsorted(starts, flat, side="right") - 1
        return shard.astype(np.int64), (flat - starts[shard]).astype(np.int64)


@dataclass(frozen=True)
class ReadTask:
    """Rows `rows` (ascending) of shard `shard`; `positions[i]` is the stream position of `rows[i]`."""

    shard: int
    rows: np.ndarray
    positions: np.ndarray
    window: int


@dataclass(frozen=True)
class Window:
    """One window's reads for one worker and its batches (stream positions, `local_batch` each)."""

    index: int
    tasks: list[ReadTask]
    batches: list[np.ndarray]


@dataclass(frozen=True)
class WorkerPlan:
    """What worker `rank` of `world_size` reads and trains on in `order`, from `start_step` on."""

    order: EpochOrder
    rank: int
    world_size: int
    start_step: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if self.order.global_batch % self.world_size:
            raise ValueError(f"global batch {self.order.global_batch} is not divisible by world size {self.world_size}")
        if not 0 <= self.start_step <= self.order.steps:
            raise ValueError(f"start step {self.start_step} outside the epoch's {self.order.steps} steps")

    @property
    def local_batch(self) -> int:
        return self.order.global_batch // self.world_size

    def windows(self) -> Iterator[Window]:
        order, local = self.order, self.local_batch
        shard, row = order.stream()
        steps_per_window = order.window_rows // order.global_batch
        for first in range(self.start_step - self.start_step % steps_per_window, order.steps, steps_per_window):
            steps = range(max(first, self.start_step), min(first + steps_per_window, order.steps))
            batches = [np.arange(s * order.global_batch + self.rank * local,
                                 s * order.global_batch + (self.rank + 1) * local) for s in steps]
            if not batches:  # resumed at the very end of the epoch
                continue
            positions = np.concatenate(batches)
            tasks = []
            by_shard = np.lexsort((row[positions], shard[positions]))  # shard, then row ascending
            positions = positions[by_shard]
            cuts = np.flatnonzero(np.diff(shard[positions])) + 1
            for piece in np.split(positions, cuts):
                tasks.append(ReadTask(shard=int(shard[piece[0]]), rows=row[piece], positions=piece,
                                      window=first // steps_per_window))
            yield Window(index=first // steps_per_window, tasks=tasks, batches=batches)


def order_spec(paths: Sequence[str], counts: Sequence[int], seed: int, global_batch: int, window_rows: int,
               batching: str = "random", groups: np.ndarray | None = None) -> dict:
    """What the order depends on besides the epoch (checkpointed, compared on resume). A planned
    order adds its planner and a digest of the group ids (a random order's spec is unchanged)."""
    digest = hashlib.sha256("\n".join(f"{p}:{c}" for p, c in zip(paths, counts)).encode()).hexdigest()[:16]
    spec = {"shards": digest, "seed": seed, "global_batch": global_batch,
            "window_rows": window_size(window_rows, global_batch)}
    if batching != "random":
        labels = np.ascontiguousarray(np.asarray(groups, dtype=np.int64))
        spec.update(batching=batching, groups=hashlib.sha256(labels.tobytes()).hexdigest()[:16])
    return spec


def batch_pair_overlap(batches_a: list[np.ndarray], batches_b: list[np.ndarray], num_rows: int) -> float:
    """Share of the sample pairs sharing a batch in epoch A that share one again in epoch B.

    Batches hold sample ids in [0, num_rows). Pairs are counted exactly: for each batch of A, the
    pairs of its members that B's batch assignment puts together.
    """
    where = np.full(num_rows, -1, dtype=np.int64)
    for index, batch in enumerate(batches_b):
        where[batch] = index
    together = total = 0
    for batch in batches_a:
        labels = where[batch]
        labels = labels[labels >= 0]
        _, sizes = np.unique(labels, return_counts=True)
        together += int((sizes * (sizes - 1) // 2).sum())
        total += len(batch) * (len(batch) - 1) // 2
    return together / max(total, 1)
