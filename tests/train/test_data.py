"""The training data path on a local Ray cluster (`sde_ray.train.data`) and its Ray-free parts:
2 consumers, equal batches in the epoch order, every sample once, corrupt shards and bad samples,
selective tar reads, and a resume that starts as fast late in an epoch as early in it."""

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
from sde_ray.bench.data import SimpleProcessor
from sde_ray.data.batches import gather_rows, process_rows
from sde_ray.data.mmeb import stable_id
from sde_ray.data.cache import prepare_data, synthetic_eval_dir
from sde_ray.data.order import WorkerPlan
from sde_ray.data.shards import check_shards, iter_samples, read_samples
from sde_ray.train.data import (
    TrainData,
    batches_per_epoch,
    cached_processor,
    data_resources,
    iter_epoch_batches,
    processor_key,
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


def train_data(check, factory, global_batch: int, window_rows: int, seed: int = 0) -> TrainData:
    return TrainData(paths=tuple(check.paths), counts=tuple(check.samples[p] for p in check.paths),
                     processor_factory=factory, seed=seed, global_batch=global_batch, window_rows=window_rows,
                     preprocess_batch_size=8)


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

        plan = train_data(check, SimpleProcessor, global_batch=2 * BATCH, window_rows=64)
        seen: dict[int, list[int]] = {}
        batch_counts: dict[int, int] = {}

        def consume(rank: int) -> None:
            keys, count = [], 0
            for batch in iter_epoch_batches(plan, 0, rank, 2):
                assert batch["qry_pixel_values"].shape == (BATCH, 3, 32, 32)
                assert batch["qry_pixel_values"].dtype == torch.uint8  # normalised by the model
                assert torch.equal(batch["key_id"], batch["sample_id"])  # the pipeline's id is the key's
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
        runs = dict(scenario["results"])
        lookahead = [runs.pop(k, None) for k in ("lookahead", "lookahead_ratio_wall")]
        assert set(runs) == {"floor", "floor_to_object_store", "ray_1_consumer", "ray_2_consumers"}
        if scenario["image_size"] == 32:  # off, then on: the same steps; no more data wait than the steps take
            (off, on), ratio = lookahead
            assert off["steps"] == on["steps"] > 0 and ratio == on["seconds"] / off["seconds"]
            assert on["seconds"] >= on["compute_seconds"] and 0 <= on["wait_seconds"] <= on["seconds"]
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


def test_merged_pieces_are_the_same_rows_in_runs_under_the_limit() -> None:
    from sde_ray.train.data import merge_pieces

    generator = torch.Generator().manual_seed(0)
    sizes = [3, 5, 1, 40, 2, 2, 7]  # rows; 16 bytes per row (two int64 columns)
    pieces = [{"a": torch.randint(0, 99, (n,), generator=generator),
               "b": torch.randint(0, 99, (n, 1), generator=generator)} for n in sizes]
    merged = merge_pieces(pieces, merge_chunk_bytes=16 * 10)
    for name in ("a", "b"):
        assert torch.equal(torch.cat([p[name] for p in merged]), torch.cat([p[name] for p in pieces]))
    # runs of whole consecutive pieces, each within 10 rows unless one piece alone is larger
    assert [len(p["a"]) for p in merged] == [9, 40, 4, 7]
    assert merged[1] is pieces[3]  # a piece over the limit is passed on, not copied
    assert len(merge_pieces(pieces, merge_chunk_bytes=0)) == len(pieces)


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


def test_a_sample_the_processor_rejects_is_skipped_and_logged_not_fatal(shards, caplog) -> None:
    rows = first_shard_rows(shards)
    with_image = next(i for i, image in enumerate(rows["qry.img"]) if image is not None)
    broken_json = (with_image + 1) % len(rows["json"])
    rows["qry.img"][with_image] = b"\xff\xd8 not a jpeg"
    rows["json"][broken_json] = b"{not json"
    bad_keys = {rows["__key__"][with_image], rows["__key__"][broken_json]}
    with caplog.at_level("WARNING", logger="sde_ray.data.batches"):
        out, kept_rows = process_rows(rows, SimpleProcessor(), "shard-0")
    kept = {int(k) for k in out["key_id"]}
    assert kept == {stable_id(k) for k in rows["__key__"]} - {stable_id(k) for k in bad_keys}
    assert [stable_id(rows["__key__"][i]) for i in kept_rows] == out["key_id"].tolist()  # which rows survived
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert all(key in logged for key in bad_keys)
    assert sum(int(n) for n in re.findall(r"skipped (\d+) of", logged)) == 2  # counted




def test_read_samples_matches_webdataset_and_never_decodes_the_other_rows(shards, tmp_path) -> None:
    import tarfile

    shard_dir, manifest = shards
    reference = first_shard_rows(shards)
    path = str(shard_dir / manifest["shards"][0]["name"])
    wanted = [1, 4, 9, 15]
    got = read_samples(path, wanted)
    for name in ("__key__", "json", "qry.img", "pos.img"):
        assert got.get(name, [None] * len(wanted)) == [reference[name][i] for i in wanted], name
    # Garble the image bytes of every other sample in a copy: reading and processing the wanted
    # rows still works, so the other rows' bytes were never decoded.
    copy = tmp_path / "garbled.tar"
    data = bytearray(Path(path).read_bytes())
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            index = reference["__key__"].index(member.name.split(".", 1)[0])
            if index not in wanted and member.name.endswith(".img"):
                data[member.offset_data:member.offset_data + member.size] = b"\x00" * member.size
    copy.write_bytes(bytes(data))
    out, kept = process_rows(read_samples(str(copy), wanted), SimpleProcessor())
    assert kept == list(range(len(wanted)))
    assert out["key_id"].tolist() == [stable_id(reference["__key__"][i]) for i in wanted]
    with pytest.raises(ValueError, match="fewer than"):
        read_samples(path, [SHARD + 3])


def test_chunked_reads_equal_one_read_and_a_rewritten_shard_is_indexed_again(shards, tmp_path) -> None:
    import shutil

    shard_dir, manifest = shards
    first, second = (str(shard_dir / manifest["shards"][i]["name"]) for i in (0, 1))
    wanted = [0, 2, 3, 7, 11, 15]
    whole = read_samples(first, wanted)
    chunks = list(iter_samples(first, wanted, 4))
    assert [len(c["__key__"]) for c in chunks] == [4, 2]
    for name in whole:
        # a chunk has the columns of the members its samples have (None where one sample lacks it)
        assert sum((c.get(name, [None] * len(c["__key__"])) for c in chunks), []) == whole[name], name
    # The per-process member index must not outlive the file it indexes: the same path rewritten
    # with another shard's samples reads those samples, not the old offsets.
    copy = str(tmp_path / "rewritten.tar")
    shutil.copyfile(first, copy)
    assert read_samples(copy, wanted)["__key__"] == whole["__key__"]
    shutil.copyfile(second, copy)
    os.utime(copy, ns=(1, 1))  # a different mtime even on a coarse-clock file system
    assert read_samples(copy, wanted)["json"] == read_samples(second, wanted)["json"]
    assert read_samples(copy, wanted)["__key__"] != whole["__key__"]
    with pytest.raises(ValueError, match="fewer than"):
        list(iter_samples(first, [1, SHARD], 1))


@pytest.mark.ray
@pytest.mark.slow
def test_batches_follow_the_order_and_a_late_resume_starts_as_fast_as_an_early_one(ray_cluster, shards) -> None:
    import time

    shard_dir, manifest = shards
    check = check_shards(str(shard_dir), manifest)
    data = train_data(check, SimpleProcessor, global_batch=8, window_rows=16, seed=4)
    # Reference keys by (shard, row), read with webdataset.
    import webdataset as wds

    keys = {(i, r): stable_id(sample["__key__"]) for i, p in enumerate(check.paths)
            for r, sample in enumerate(wds.WebDataset(p, shardshuffle=False, empty_check=False))}
    for rank in range(2):
        plan = WorkerPlan(data.order(1), rank, 2)
        expected = []
        for window in plan.windows():
            where = {int(q): (t.shard, int(r)) for t in window.tasks for q, r in zip(t.positions, t.rows)}
            expected += [sorted(keys[where[int(q)]] for q in batch) for batch in window.batches]
        full = [sorted(b["key_id"].tolist()) for b in iter_epoch_batches(data, 1, rank, 2)]
        assert full == expected and len(full) == data.order(1).steps == 176 // 8
        assert [sorted(b["key_id"].tolist()) for b in iter_epoch_batches(data, 1, rank, 2, start_step=15)] == full[15:]
    # Time from "resume" to the first batch, early and late in the epoch (printed for the report):
    # interleaved, best of 3 each, so one slow Ray task start-up does not decide it.
    times = {1: [], 20: []}
    for _ in range(3):
        for start in times:
            began = time.perf_counter()
            next(iter_epoch_batches(data, 1, 0, 2, start_step=start))
            times[start].append(time.perf_counter() - began)
    early, late = min(times[1]), min(times[20])
    print(f"resume-to-first-batch (best of 3): step 1 of 22: {early:.2f} s; step 20 of 22: {late:.2f} s")
    assert late < 2 * early + 0.5


@pytest.mark.ray
def test_the_stream_reads_the_next_epoch_ahead_on_ray_and_gives_the_same_batches(ray_cluster, shards) -> None:
    """`batch_stream` with look-ahead: the next epoch's Ray dataset is opened on a background
    thread during the last window; the batches are the ones each epoch gives read on its own."""
    from sde_ray.train.data import batch_stream

    shard_dir, manifest = shards
    data = train_data(check_shards(str(shard_dir), manifest), SimpleProcessor, global_batch=8, window_rows=48, seed=3)
    steps = data.order(0).steps
    expected = [sorted(b["key_id"].tolist()) for epoch in (0, 1) for b in iter_epoch_batches(data, epoch, 1, 2)]
    stream = batch_stream(data, 1, 2, epoch=0, epoch_rows=0, lookahead=True, batches_left=2 * steps)
    got, opened_ahead_at = [], None
    for _ in range(2 * steps):
        got.append(sorted(stream.next()["key_id"].tolist()))
        if opened_ahead_at is None and stream.ahead is not None:
            opened_ahead_at = len(got)
    assert got == expected and (stream.epoch, stream.epoch_rows) == (1, steps * 8)
    assert opened_ahead_at == steps - data.window_steps()  # during epoch 0's last window
    assert stream.ahead is None  # nothing opened past the batches asked for


@pytest.mark.ray
@pytest.mark.slow
def test_same_subset_batches_through_the_ray_stream_and_a_resume_yields_the_rest(ray_cluster, shards) -> None:
    import dataclasses

    from sde_ray.data.batching import row_groups
    from sde_ray.data.negatives import read_shard, shard_keys
    from sde_ray.train.data import BatchStream, open_epoch_fn

    shard_dir, manifest = shards
    check = check_shards(str(shard_dir), manifest)
    data = dataclasses.replace(train_data(check, SimpleProcessor, global_batch=BATCH, window_rows=24, seed=2),
                               batching="same_subset", groups=row_groups("same_subset", shard_keys(check.paths)))
    # Each row's subset from its own json member, keyed like the pipeline's sample_id.
    subset_of = {stable_id(k): s for p in check.paths for k, s in zip(*(read_shard(p)[c] for c in ("key", "subset")))}
    steps = data.order(0).steps
    assert steps == 11 * PER_SUBSET // BATCH and data.order(0).dropped_rows == 0
    seen: dict[int, list[list[int]]] = {}

    def consume(rank: int, epoch_rows: int = 0, into: dict = seen) -> None:
        stream = BatchStream(open_epoch_fn(data, rank, 2), BATCH, epoch=0, epoch_rows=epoch_rows)
        into[rank] = [stream.next()["key_id"].tolist() for _ in range(steps - epoch_rows // BATCH)]
        assert (stream.epoch, stream.epoch_rows) == (0, steps * BATCH)  # exactly the epoch, no more

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert {rank: len(batches) for rank, batches in seen.items()} == {0: steps, 1: steps}  # equal per worker
    global_batches = [a + b for a, b in zip(seen[0], seen[1])]
    for batch in global_batches:
        assert len({subset_of[k] for k in batch}) == 1
    everything = [k for batch in global_batches for k in batch]
    assert len(everything) == len(set(everything)) == 11 * PER_SUBSET  # every row once
    # Resumed mid-epoch (the position a checkpoint saves): the remaining batches, row for row.
    resumed: dict[int, list[list[int]]] = {}
    for rank in range(2):
        consume(rank, epoch_rows=15 * BATCH, into=resumed)
        assert resumed[rank] == seen[rank][15:]
