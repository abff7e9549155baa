"""Planned epoch orders (`data.batching=same_subset | teacher_cluster`) through the real data path:
synthetic MMEB converted to .tar shards, the driver's `train_data_from_config`, `WorkerPlan` reads
and the Ray-free tar reader (`read_samples`). What a batch holds is read back from the samples'
own json members, not from the planner's inputs; the Ray stream is tested in tests/train/test_data.py.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from sde_ray.bench.data import SimpleProcessor
from sde_ray.config import ConfigError, load_config
from sde_ray.data.batching import cluster_rows
from sde_ray.data.order import EpochOrder, WorkerPlan
from sde_ray.data.shards import check_shards, read_samples
from sde_ray.train.data import train_data_from_config

PER_SUBSET = 20  # 11 subsets x 20 rows; with G = 8 each subset fills 2 batches and leaves 4 out
SHARD = 16
G = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from sde_ray.data.convert import convert_mmeb
    from sde_ray.data.synthetic import write_synthetic_mmeb

    root = tmp_path_factory.mktemp("planned")
    summary = write_synthetic_mmeb(root / "synth", seed=0, train_per_subset=PER_SUBSET, eval_per_dataset=2)
    manifest = convert_mmeb(summary["train_dir"], root / "shards", samples_per_shard=SHARD, progress=False)
    check = check_shards(str(root / "shards"), manifest)
    return SimpleNamespace(check=check, shards=list(check.paths), root=root)


def _config(*overrides: str):
    return load_config(None, [f"train.global_batch_size={G}", "data.shuffle_window=24", *overrides])


def _train_data(corpus, *overrides: str):
    return train_data_from_config(_config(*overrides), corpus, SimpleProcessor)


def _global_batches(order: EpochOrder, paths, world: int, start_step: int = 0) -> list[list[tuple[str, str]]]:
    """Each step's (key, subset) rows, read from the tars as every rank's plan asks; the subset is
    the sample's json field. Checks that every rank gets the same number of full local batches."""
    steps: dict[int, list] = {}
    counts = []
    for rank in range(world):
        index = start_step
        for window in WorkerPlan(order, rank, world, start_step).windows():
            at = {}
            for task in window.tasks:
                columns = read_samples(paths[task.shard], task.rows.tolist())
                for position, key, meta in zip(task.positions, columns["__key__"], columns["json"]):
                    at[int(position)] = (key, json.loads(meta)["subset"])
            for batch in window.batches:
                assert len(batch) == order.global_batch // world
                steps.setdefault(index, []).extend(at[int(p)] for p in batch)
                index += 1
        counts.append(index - start_step)
    assert len(set(counts)) == 1, counts  # equal batch counts per worker
    return [steps[s] for s in sorted(steps)]


def test_same_subset_batches_hold_one_subset_and_every_row_once(corpus):
    data = _train_data(corpus, "data.batching=same_subset")
    order = data.order(1)
    batches = _global_batches(order, data.paths, world=2)
    # Reference counts from the manifest-free shards themselves: 11 subsets of 20 rows.
    assert len(batches) == order.steps == 11 * (PER_SUBSET // G)
    assert order.dropped_rows == 11 * (PER_SUBSET % G) == order.num_rows - len(batches) * G
    for batch in batches:
        assert len({subset for _, subset in batch}) == 1, batch
    keys = [key for batch in batches for key, _ in batch]
    assert len(keys) == len(set(keys))  # every row at most once
    per_subset = {}
    for batch in batches:
        per_subset[batch[0][1]] = per_subset.get(batch[0][1], 0) + len(batch)
    assert set(per_subset.values()) == {PER_SUBSET - PER_SUBSET % G}  # only each subset's tail sits out
    # Subsets interleave over the epoch, and the same steps come out for other world sizes.
    firsts = [batch[0][1] for batch in batches]
    assert sum(a != b for a, b in zip(firsts, firsts[1:])) > 3
    for world in (1, 4):
        assert [sorted(b) for b in _global_batches(order, data.paths, world)] == [sorted(b) for b in batches]
    assert [sorted(b) for b in _global_batches(data.order(2), data.paths, 2)] != [sorted(b) for b in batches]


def test_a_same_subset_resume_reads_the_remaining_batches_of_the_uninterrupted_epoch(corpus):
    data = _train_data(corpus, "data.batching=same_subset")
    order = data.order(0)
    full = _global_batches(order, data.paths, world=2)
    for start in (1, 5, 13, order.steps):
        # A resized resume (4 workers) too: the rows of a step do not depend on the world size.
        for world in (2, 4):
            assert [sorted(b) for b in _global_batches(order, data.paths, world, start)] == \
                [sorted(b) for b in full[start:]], (start, world)
        # Nothing consumed is read again.
        read = sum(len(t.rows) for w in WorkerPlan(order, 0, 2, start).windows() for t in w.tasks)
        assert read == (order.steps - start) * G // 2


def test_planned_orders_are_checkpointed_under_their_own_spec(corpus):
    random, planned = _train_data(corpus), _train_data(corpus, "data.batching=same_subset")
    assert "batching" not in random.spec()  # a random order's spec is what older checkpoints hold
    assert planned.spec()["batching"] == "same_subset" and planned.spec()["shards"] == random.spec()["shards"]


def test_random_order_is_the_windowed_shuffle_it_always_was():
    # Digests of streams computed by the order before planners were wired in (git fe3bed4):
    # resume tests and the numbers in docs/data.md depend on these orders staying put.
    counts = (16, 16, 9, 16, 16, 3, 16, 16)
    for args, digest in (((counts, 3, 2, 8, 32), "ef95c0bbbb6037a3"), (((1024,) * 20, 5, 0, 64, 8192), "d4a2fedfabf15d24")):
        stream = np.stack(EpochOrder(*args).stream())
        assert hashlib.sha256(stream.tobytes()).hexdigest()[:16] == digest


def _planted_sidecar(corpus, directory, cluster_size: int = 4, seed: int = 0):
    """A sidecar whose teacher clusters come from `cluster_rows` on planted target embeddings:
    groups of `cluster_size` rows scattered over the shards, each group near one random direction.
    Returns the planted groups as key sets."""
    from sde_ray.data.negatives import shard_keys, write_part

    keys = shard_keys(corpus.shards)
    rng = np.random.default_rng(seed)
    assignment = rng.permutation(len(keys)) // cluster_size  # group g: rows with assignment == g
    centres = rng.standard_normal((assignment.max() + 1, 64))
    targets = centres[assignment] + 0.05 * rng.standard_normal((len(keys), 64))
    clusters = cluster_rows(targets, len(keys) // cluster_size, seed=seed)
    write_part(directory / "parts" / "all.parquet", keys, [[] for _ in keys], [[] for _ in keys],
               np.ones(len(keys)), clusters)
    (directory / "sidecar.json").write_text(json.dumps({"complete": True, "embed_dim": 64,
                                                         "cluster_size": cluster_size}))
    return [{k for k, a in zip(keys, assignment) if a == g} for g in range(assignment.max() + 1)]


def test_planted_teacher_clusters_end_up_in_the_same_batch(corpus, tmp_path):
    planted = _planted_sidecar(corpus, tmp_path)
    data = _train_data(corpus, "data.batching=teacher_cluster", f"data.negatives_sidecar={tmp_path}")
    for epoch in (0, 1):
        batches = [{key for key, _ in batch} for batch in _global_batches(data.order(epoch), data.paths, world=2)]
        trained = set().union(*batches)
        # 220 rows = 55 clusters of 4 laid end to end in batches of 8: 27 batches, one cluster sits out.
        assert len(batches) == 220 // G and len(trained) == len(batches) * G
        for group in planted:
            if group & trained:
                assert any(group <= batch for batch in batches), group
        assert sum(not (group & trained) for group in planted) == 1


def test_a_mode_without_its_inputs_is_refused_before_any_worker_starts(corpus, tmp_path):
    with pytest.raises(ConfigError, match="teacher_cluster needs data.negatives_sidecar"):
        _config("data.batching=teacher_cluster")
    _planted_sidecar(corpus, tmp_path, cluster_size=4)
    meta = json.loads((tmp_path / "sidecar.json").read_text())
    for cluster_size, message in ((0, "mined without teacher clusters"), (3, "do not divide")):
        (tmp_path / "sidecar.json").write_text(json.dumps({**meta, "cluster_size": cluster_size}))
        with pytest.raises(ConfigError, match=message):
            _train_data(corpus, "data.batching=teacher_cluster", f"data.negatives_sidecar={tmp_path}")
    # No subset fills a global batch of 32: nothing would be trained.
    with pytest.raises(ValueError, match="no full global"):
        train_data_from_config(_config("data.batching=same_subset", "train.global_batch_size=32"), corpus,
                               SimpleProcessor)
    from sde_ray.data.convert import key_subset

    assert key_subset("MSCOCO_i2t-00000012") == "MSCOCO_i2t"
    with pytest.raises(ValueError, match="subset is unknown"):
        key_subset("000123")


def test_the_driver_accepts_planned_batching_and_a_sidecar_used_for_clusters_only(corpus, tmp_path):
    from sde_ray.train.driver import check_negatives

    check_negatives(_config("data.batching=same_subset"), corpus.shards)
    _planted_sidecar(corpus, tmp_path)
    check_negatives(_config("data.batching=teacher_cluster", f"data.negatives_sidecar={tmp_path}"), corpus.shards)
    with pytest.raises(ConfigError, match="would be unused"):
        check_negatives(_config(f"data.negatives_sidecar={tmp_path}"), corpus.shards)
