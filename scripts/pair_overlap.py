"""How often a pair of samples that shares a global batch in epoch 0 shares one again in epoch 1.

Old shuffle (before the epoch order): the shard order permuted per epoch, shards dealt to the
workers in turn (what a balanced streaming_split does), each worker permuting runs of
max(1, 256 // micro)·micro consecutive rows. New: `sde_ray.data.order.EpochOrder` with an 8192-row
window. Printed next to the expectation for batches drawn uniformly at random, (G−1)/(N−1).
Run: `python scripts/pair_overlap.py` (figures in docs/data.md).
"""
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from sde_ray.data.order import EpochOrder, WorkerPlan, batch_pair_overlap, epoch_seed

def old_batches(counts, epoch, world, micro, buffer=256, seed=0):
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(counts))
    streams = [[] for _ in range(world)]
    for i, s in enumerate(order):  # blocks dealt to workers in turn (streaming_split, balanced)
        streams[i % world].append(np.arange(offsets[s], offsets[s + 1]))
    chunk = max(1, buffer // micro) * micro
    per_worker = []
    for rank, parts in enumerate(streams):
        stream = np.concatenate(parts)
        rng = np.random.default_rng([epoch_seed(seed, epoch), rank])
        batches = []
        for start in range(0, len(stream), chunk):
            c = stream[start:start + chunk][rng.permutation(len(stream[start:start + chunk]))]
            batches += [c[i:i + micro] for i in range(0, len(c) - micro + 1, micro)]
        per_worker.append(batches)
    steps = min(len(b) for b in per_worker)
    return [np.concatenate([per_worker[r][s] for r in range(world)]) for s in range(steps)]

def new_batches(counts, epoch, world, micro, window, seed=0):
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = EpochOrder(tuple(counts), seed, epoch, micro * world, window)
    shard, row = order.stream()
    ids = offsets[shard] + row
    G = micro * world
    return [ids[s * G:(s + 1) * G] for s in range(order.steps)]

for shards, per, world, micro in ((64, 1024, 8, 128), (64, 1024, 4, 256), (16, 1024, 1, 64)):
    counts = [per] * shards
    n = shards * per
    G = world * micro
    old = batch_pair_overlap(old_batches(counts, 0, world, micro), old_batches(counts, 1, world, micro), n)
    new = batch_pair_overlap(new_batches(counts, 0, world, micro, 8192), new_batches(counts, 1, world, micro, 8192), n)
    print(f"{n} rows in {shards} shards of {per}, global batch {G} = {world} x {micro}: "
          f"old {100*old:.2f}%  new (window 8192) {100*new:.2f}%  random-batch expectation {100*(G-1)/(n-1):.2f}%")
