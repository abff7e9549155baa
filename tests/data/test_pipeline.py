"""The Ray Data pipeline on a local Ray cluster: 2 consumers, equal batches, every sample once, corrupt shard."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sde_ray.config import load_config
from sde_ray.data.convert import convert_mmeb
from sde_ray.data.pipeline import (
    SimpleProcessor,
    batches_per_epoch,
    build_train_dataset,
    check_shards,
    data_resources,
    iter_worker_batches,
    prepare_data,
    stable_id,
)
from sde_ray.data.synthetic import write_synthetic_mmeb

PER_SUBSET = 16  # 11 subsets -> 176 rows -> 11 shards of 16
SHARD = 16
BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pipeline")
    write_synthetic_mmeb(root, seed=0, train_per_subset=PER_SUBSET, eval_per_dataset=2)
    manifest = convert_mmeb(root / "MMEB-train", root / "shards", samples_per_shard=SHARD, progress=False)
    return root / "shards", manifest


def all_keys(manifest: dict, shard_dir: Path, exclude: set[str]) -> set[int]:
    import tarfile

    keys = set()
    for entry in manifest["shards"]:
        if entry["name"] in exclude:
            continue
        with tarfile.open(shard_dir / entry["name"]) as archive:
            keys |= {stable_id(m.name.split(".", 1)[0]) for m in archive.getmembers()}
    return keys


@pytest.mark.ray
@pytest.mark.slow
def test_two_consumers_equal_batches_each_sample_once_corrupt_shard_skipped(ray_cluster, shards, tmp_path) -> None:
    shard_dir, manifest = shards
    assert manifest["num_samples"] == 11 * PER_SUBSET and manifest["num_shards"] == 11
    corrupt = shard_dir / manifest["shards"][3]["name"]
    data = corrupt.read_bytes()
    try:
        corrupt.write_bytes(data[: len(data) // 2])  # truncated mid-member
        # Without a manifest the tar structure gives it away; with one, its size does.
        without = check_shards(str(shard_dir / "*.tar")).skipped
        assert list(without) == [str(corrupt)] and "past the end" in without[str(corrupt)]
        check = check_shards(str(shard_dir / "*.tar"), manifest)
        assert list(check.skipped) == [str(corrupt)] and "manifest" in check.skipped[str(corrupt)]
        assert check.num_samples == 10 * SHARD  # 160 = 2 workers x 10 batches x 8: nothing dropped

        dataset = build_train_dataset(check.paths, SimpleProcessor, seed=0, check=check, preprocess_batch_size=16)
        iterators = dataset.streaming_split(2, equal=True)
        seen: dict[int, list[int]] = {}
        batch_counts: dict[int, int] = {}

        def consume(rank: int) -> None:
            keys, count = [], 0
            for batch in iter_worker_batches(iterators[rank], BATCH, seed=0, epoch=0, rank=rank):
                assert batch["qry_pixel_values"].shape == (BATCH, 3, 32, 32)
                keys.extend(batch["key_id"].tolist())
                count += 1
            seen[rank], batch_counts[rank] = keys, count

        threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        expected = batches_per_epoch(check.num_samples, 2, BATCH)
        assert expected == 10
        assert batch_counts == {0: expected, 1: expected}
        everything = seen[0] + seen[1]
        assert len(everything) == len(set(everything)) == check.num_samples
        assert set(everything) == all_keys(manifest, shard_dir, exclude={corrupt.name})
    finally:
        corrupt.write_bytes(data)


@pytest.mark.ray
def test_prepare_data_generates_once_and_returns_absolute_paths(ray_cluster, tmp_path) -> None:
    config = load_config(None, [f"data.cache_dir={tmp_path}/cache", "data.synth.train_per_subset=8",
                                "data.synth.eval_per_dataset=2", "data.samples_per_shard=32"])
    prepared = prepare_data(config)
    assert prepared.num_samples == 11 * 8 and not prepared.skipped_shards
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in prepared.shards)
    assert (Path(prepared.eval_dir) / "mmeb_datasets.json").is_file()
    manifest_file = Path(prepared.shards[0]).parent / "manifest.json"
    stamp = manifest_file.stat().st_mtime_ns
    again = prepare_data(config)
    assert again.shards == prepared.shards and manifest_file.stat().st_mtime_ns == stamp
    other = prepare_data(load_config(None, [f"data.cache_dir={tmp_path}/cache", "data.synth.train_per_subset=8",
                                            "data.synth.eval_per_dataset=2", "data.samples_per_shard=32",
                                            "data.synth.seed=1"]))
    assert Path(other.shards[0]).parent != Path(prepared.shards[0]).parent  # the cache is keyed by settings


def test_cpu_reservation_rule() -> None:
    resources = data_resources(1.0, 2)
    assert resources.total == pytest.approx(1.0) and resources.concurrency == 2
    with pytest.raises(ValueError, match="data_cpus"):
        data_resources(0, 1)


@pytest.mark.ray
@pytest.mark.slow
def test_data_bench_quick(ray_cluster, tmp_path) -> None:
    from sde_ray.bench.data import main

    report = main(json_path=str(tmp_path / "bench.json"), quick=True)
    assert (tmp_path / "bench.json").is_file()
    runs = report["results"]
    assert set(runs) == {"floor", "ray_1_consumer", "ray_2_consumers"}
    # ray-1 drops at most the last partial batch; ray-2 at most one per consumer plus the split remainder.
    assert report["num_samples"] - 32 < runs["ray_1_consumer"]["samples"] <= report["num_samples"]
    assert runs["floor"]["samples"] == report["num_samples"]
    assert all(run["samples_per_s"] > 0 and run["cpu_seconds"] > 0 for run in runs.values())


@pytest.mark.ray
def test_worker_batches_reshuffle_per_epoch_reproducibly(ray_cluster) -> None:
    import ray

    dataset = ray.data.range(100)

    def order(epoch: int, rank: int = 0) -> list[int]:
        batches = list(iter_worker_batches(dataset.iterator(), 8, seed=5, epoch=epoch, rank=rank, shuffle_buffer=32))
        assert all(len(b["id"]) == 8 for b in batches) and len(batches) == 100 // 8
        return [int(i) for b in batches for i in b["id"]]

    first = order(0)
    assert first == order(0)  # reproducible from (seed, epoch, rank)
    assert first != order(1) and first != order(0, rank=1)
    assert sorted(first) == list(range(96))  # a permutation of what drop_last keeps (the stream is ordered)
