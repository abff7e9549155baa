"""The Ray Data pipeline on a local Ray cluster: 2 consumers, equal batches, every sample once, corrupt shard."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_ray.config import load_config
from sde_ray.data.convert import convert_mmeb
from sde_ray.data.pipeline import (
    SimpleProcessor,
    batches_per_epoch,
    build_train_dataset,
    check_shards,
    data_resources,
    epoch_seed,
    gather_rows,
    iter_worker_batches,
    cached_processor,
    prepare_data,
    preprocess_shard,
    processor_key,
    raw_batch_from_rows,
    stable_id,
    stream_chunks,
    synthetic_eval_dir,
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
                assert batch["qry_pixel_values"].dtype == torch.uint8  # normalised by the model
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


def test_synthetic_eval_dir_generates_the_data_but_converts_no_shards(tmp_path) -> None:
    overrides = [f"data.cache_dir={tmp_path}/cache", "data.synth.train_per_subset=4", "data.synth.eval_per_dataset=2"]
    eval_dir = Path(synthetic_eval_dir(load_config(None, overrides)))
    assert (eval_dir / "mmeb_datasets.json").is_file() and (eval_dir / "images.zip").is_file()
    assert not list((tmp_path / "cache").glob("synth-*/shards-*"))  # evaluation converts nothing
    assert str(eval_dir) == prepare_data(load_config(None, overrides)).eval_dir  # the same cache entry


def test_cpu_reservation_rule() -> None:
    resources = data_resources(1.0, 2)
    assert resources.total == pytest.approx(1.0) and resources.concurrency == 2
    assert resources.task_cpus == pytest.approx(0.5)
    with pytest.raises(ValueError, match="data_cpus"):
        data_resources(0, 1)


@pytest.mark.ray
@pytest.mark.slow
def test_data_bench_quick(ray_cluster, tmp_path) -> None:
    from sde_ray.bench.data import main

    report = main(json_path=str(tmp_path / "bench.json"), quick=True, epochs=2)
    assert (tmp_path / "bench.json").is_file()
    assert set(report["scenarios"]) == {"synthetic_32px", "photo_224px"}
    for scenario in report["scenarios"].values():
        runs = scenario["results"]
        assert set(runs) == {"floor", "floor_to_object_store", "ray_1_consumer", "ray_2_consumers"}
        n = scenario["num_samples"]
        assert runs["floor"]["samples"] == runs["floor_to_object_store"]["samples"] == 2 * n
        # Per epoch, ray-1 drops at most the rows that fill no batch of 32; ray-2 at most one
        # partial batch per consumer plus the split remainder.
        assert 2 * (n - 32) < runs["ray_1_consumer"]["samples"] <= 2 * n
        assert 2 * (n - 2 * 32 - 1) < runs["ray_2_consumers"]["samples"] <= 2 * n
        for run in runs.values():
            assert run["samples_per_s"] > 0 and run["cpu_seconds"] > 0
            assert [e["samples"] for e in run["epochs"]] == [run["samples"] // 2] * 2  # equal epochs
            assert run["later_epochs"]["samples"] == run["samples"] // 2


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
    assert len(set(first)) == 96 and set(first) <= set(range(100))  # each row at most once, 4 dropped
    assert first[:32] != sorted(first[:32]) and set(first[:32]) == set(range(32))  # shuffled within a buffer


def _row_pieces(sizes: list[int], seed: int = 0) -> list[dict]:
    """Pieces of a stream whose row r holds `id` r and an image-like uint8 block of r's value."""
    generator = torch.Generator().manual_seed(seed)
    pieces, start = [], 0
    for size in sizes:
        ids = torch.arange(start, start + size)
        pieces.append({"id": ids, "pixels": torch.randint(0, 256, (size, 3, 4, 4), generator=generator,
                                                          dtype=torch.uint8)})
        start += size
    return pieces


def test_gather_rows_matches_indexing_the_concatenation() -> None:
    pieces = _row_pieces([5, 1, 0, 12, 7])
    whole = {name: torch.cat([piece[name] for piece in pieces]) for name in pieces[0]}
    for seed in range(5):
        index = torch.randperm(25, generator=torch.Generator().manual_seed(seed))[:9]
        batch = gather_rows([piece for piece in pieces if len(piece["id"])], index)
        expected = index.sort().values
        assert torch.equal(batch["id"], expected)
        assert torch.equal(batch["pixels"], whole["pixels"][expected])


def test_stream_chunks_cut_exact_runs_without_copying() -> None:
    pieces = _row_pieces([5, 3, 10, 7])
    chunks = list(stream_chunks(iter(pieces), 8))
    assert [sum(len(p["id"]) for p in chunk) for chunk in chunks] == [8, 8, 8, 1]
    assert torch.equal(torch.cat([p["id"] for chunk in chunks for p in chunk]), torch.arange(25))
    storages = {piece["pixels"].untyped_storage().data_ptr() for piece in pieces}
    assert all(p["pixels"].untyped_storage().data_ptr() in storages for chunk in chunks for p in chunk)


@pytest.mark.ray
@pytest.mark.parametrize("merge_chunk_bytes", [0, 2**40])  # always gather from pieces / always merge
def test_worker_batches_match_a_single_process_reference(ray_cluster, merge_chunk_bytes) -> None:
    import ray

    # 7 blocks of 30 rows with 3 record batches each: chunks of 32 rows straddle them.
    dataset = ray.data.range(210, override_num_blocks=7).map_batches(
        lambda batch: {"id": batch["id"], "image": np.repeat(batch["id"][:, None], 48, 1).astype(np.uint8)},
        batch_size=10)
    dataset.context.execution_options.preserve_order = True
    batches = list(iter_worker_batches(dataset.iterator(), 8, seed=3, epoch=2, rank=1, shuffle_buffer=32,
                                       merge_chunk_bytes=merge_chunk_bytes))
    # Reference: the stream in order, chunks of 32 rows, one permutation each, batches of 8.
    stream = torch.cat([torch.as_tensor(b["id"]) for b in dataset.iter_batches(batch_size=None)])
    generator = torch.Generator().manual_seed(epoch_seed(3, 2 * 1_000_003 + 1))
    expected = []
    for start in range(0, len(stream), 32):
        chunk = stream[start:start + 32]
        order = torch.randperm(len(chunk), generator=generator)
        expected += [chunk[order[i:i + 8]].sort().values for i in range(0, len(chunk) - 7, 8)]
    assert len(batches) == len(expected) == 210 // 8
    for batch, rows in zip(batches, expected):
        assert torch.equal(batch["id"], rows)
        assert torch.equal(batch["image"], (rows[:, None] % 256).to(torch.uint8).expand(-1, 48))


@pytest.mark.ray
def test_object_store_hand_over_puts_blocks_of_the_target_size(ray_cluster) -> None:
    from ray.data.block import BlockAccessor

    from sde_ray.bench.data import ObjectStoreHandOver

    hand_over = ObjectStoreHandOver(block_bytes=3000)
    batch = {"pixels": np.zeros((10, 100), dtype=np.uint8), "id": np.arange(10)}
    table_bytes = BlockAccessor.batch_to_block(batch).nbytes
    assert 1000 < table_bytes < 1500  # so that 3 batches fill a 3,000-byte block
    for _ in range(7):
        hand_over(batch)
    hand_over(None)
    assert (hand_over.puts, hand_over.bytes_put) == (3, 7 * table_bytes)  # 3 + 3 batches, then the flush of 1


class CountingProcessor(SimpleProcessor):
    """SimpleProcessor that leaves one file per construction (pid in the name) in `folder`."""

    def __init__(self, folder: str) -> None:
        import os
        import uuid

        super().__init__()
        Path(folder, f"{os.getpid()}-{uuid.uuid4().hex}").touch()


def test_processor_cache_builds_once_per_key_and_keeps_the_newest() -> None:
    import functools

    built = []

    def factory(tag: str):
        built.append(tag)
        return SimpleProcessor()

    first = cached_processor("a", functools.partial(factory, "a"))
    assert cached_processor("a", functools.partial(factory, "a")) is first and built == ["a"]
    for tag in "bcde":  # the cache keeps 4 processors: "a" is evicted by the fifth key
        cached_processor(tag, functools.partial(factory, tag))
    cached_processor("a", functools.partial(factory, "a"))
    assert built == ["a", "b", "c", "d", "e", "a"]
    # Keys name factories by their pickled bytes: equal settings share a processor, others do not.
    assert processor_key(functools.partial(SimpleProcessor, 32)) == processor_key(functools.partial(SimpleProcessor, 32))
    assert processor_key(functools.partial(SimpleProcessor, 32)) != processor_key(functools.partial(SimpleProcessor, 16))


def first_shard_rows(shards) -> dict[str, list]:
    """The first shard's raw members by column, read with webdataset (the columns Ray's reader yields)."""
    import webdataset as wds

    shard_dir, manifest = shards
    rows = {"__key__": [], "json": [], "qry.img": [], "pos.img": []}
    for sample in wds.WebDataset(str(shard_dir / manifest["shards"][0]["name"]), shardshuffle=False, empty_check=False):
        for name in rows:
            rows[name].append(sample.get(name))
    return rows


def test_preprocess_shard_yields_bounded_chunks_in_order(shards) -> None:
    import pandas as pd

    rows = first_shard_rows(shards)
    frame = pd.DataFrame(rows)  # what Ray's WebDataset reader hands over
    chunks = list(preprocess_shard(frame, processor_factory=SimpleProcessor, cache_key="test-chunks", chunk_rows=5))
    assert [len(c["key_id"]) for c in chunks] == [5, 5, 5, 1]  # 16 rows
    whole = SimpleProcessor()(raw_batch_from_rows(rows))
    for name, value in whole.items():
        assert (np.concatenate([c[name] for c in chunks]) == value).all(), name


def test_a_sample_the_processor_rejects_is_skipped_and_logged_not_fatal(shards, caplog) -> None:
    import pandas as pd

    rows = first_shard_rows(shards)
    with_image = next(i for i, image in enumerate(rows["qry.img"]) if image is not None)
    broken_json = (with_image + 1) % len(rows["json"])
    rows["qry.img"][with_image] = b"\xff\xd8 not a jpeg"
    rows["json"][broken_json] = b"{not json"
    bad_keys = {rows["__key__"][with_image], rows["__key__"][broken_json]}
    frame = pd.DataFrame(rows)
    with caplog.at_level("WARNING", logger="sde_ray.data.pipeline"):
        chunks = list(preprocess_shard(frame, processor_factory=SimpleProcessor, cache_key="test-skip", chunk_rows=5))
    kept = {int(k) for c in chunks for k in c["key_id"]}
    assert kept == {stable_id(k) for k in rows["__key__"]} - {stable_id(k) for k in bad_keys}
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert all(key in logged for key in bad_keys)
    assert sum(int(n) for n in re.findall(r"skipped (\d+) of", logged)) == 2  # counted


@pytest.mark.ray
def test_read_and_preprocess_fuse_into_one_task_and_processors_are_reused(ray_cluster, shards, tmp_path) -> None:
    import functools

    shard_dir, manifest = shards
    folder = tmp_path / "built"
    folder.mkdir()
    check = check_shards(str(shard_dir), manifest)
    factory = functools.partial(CountingProcessor, str(folder))
    for epoch in range(2):
        dataset = build_train_dataset(check.paths, factory, seed=0, epoch=epoch, check=check, preprocess_batch_size=8)
        keys = [int(k) for batch in dataset.iter_batches(batch_size=None) for k in batch["key_id"]]
        assert len(keys) == len(set(keys)) == manifest["num_samples"]
        # Read and preprocessing ran as one operator: the raw bytes never crossed the object store.
        assert "ReadWebDataset->MapBatches(preprocess_shard)" in dataset.stats()
    builds = [name.split("-")[0] for name in os.listdir(folder)]
    # One construction per worker process over 2 epochs x 11 shards (not one per task or epoch).
    assert len(builds) == len(set(builds)) < len(check.paths)
