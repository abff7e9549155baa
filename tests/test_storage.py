"""`sde_ray.storage` against a real S3 server (moto's, on loopback: tests/s3_server.py), checked with an
independent S3 client (boto3) and, for the shard reader, against the local tar read by `tarfile`.
Location checks are pure functions: a malformed URL is a config error before Ray starts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from sde_ray import storage
from sde_ray.config import ConfigError, load_config


@pytest.fixture
def s3(s3_server):
    """boto3's client of the same server: the reference for what our pyarrow-based layer wrote."""
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


@pytest.mark.parametrize("location, problem", [
    ("s3:/bucket/run", "not a s3:// URL with a bucket"),  # became the relative folder `s3:/bucket/run`
    ("s3:bucket/run", "not a s3:// URL with a bucket"),
    ("s3://", "not a s3:// URL with a bucket"),
    ("hdfs://namenode/run", "unsupported scheme hdfs://"),
    ("http://host/run", "unsupported scheme http://"),
    ("file://relative/run", "must be absolute"),
])
def test_malformed_or_unsupported_locations_are_config_errors(location, problem) -> None:
    with pytest.raises(ConfigError, match=f"train.output_dir: .*{problem}"):
        storage.check_location(location, "train.output_dir")
    for fine in ("s3://bucket", "s3://bucket/a/b", "gs://bucket/x", "/abs/path", "runs/x", "file:///abs", ""):
        storage.check_location(fine, "train.output_dir")


def test_the_driver_refuses_them_before_ray_starts() -> None:
    from sde_ray.train.driver import resolve_paths

    with pytest.raises(ConfigError, match=r"train.output_dir: 's3:/b/x'"):
        resolve_paths(load_config(None, ["train.output_dir=s3:/b/x"]))
    with pytest.raises(ConfigError, match=r"data.shards\[1\]: 'gcs://b/s'"):
        resolve_paths(load_config(None, ["data.shards=[/tmp/a.tar, 'gcs://b/s']"]))
    with pytest.raises(ConfigError, match="data.cache_dir: .*local or shared-mount path"):
        resolve_paths(load_config(None, ["data.cache_dir=s3://b/cache"]))
    with pytest.raises(ConfigError, match="sde-ray tune --output-dir: 's3://b/sweep': must be a local"):
        storage.require_local("s3://b/sweep", "sde-ray tune --output-dir")  # sweeps write with local APIs
    resolved = resolve_paths(load_config(None, ["train.output_dir=s3://b/run"]))
    assert (resolved.train.output_dir, resolved.train.storage_path) == ("s3://b/run", "s3://b/run/ray")


def test_reads_and_writes_agree_with_an_independent_client(s3_bucket, s3, tmp_path) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    run = storage.join(s3_bucket, "run")
    storage.write_text(storage.join(run, "config.yaml"), "a: 1\n")
    storage.append_text(storage.join(run, "metrics.jsonl"), '{"step": 1}\n')
    storage.append_text(storage.join(run, "metrics.jsonl"), '{"step": 2}\n')
    body = s3.get_object(Bucket=bucket, Key="run/metrics.jsonl")["Body"].read()
    assert body == b'{"step": 1}\n{"step": 2}\n'
    assert s3.get_object(Bucket=bucket, Key="run/config.yaml")["Body"].read() == b"a: 1\n"
    s3.put_object(Bucket=bucket, Key="run/plots/from_boto.bin", Body=bytes(range(256)) * 4)
    blob = storage.join(run, "plots", "from_boto.bin")
    assert storage.read_bytes(blob) == bytes(range(256)) * 4
    assert storage.size(blob) == 1024 and storage.is_file(blob) and storage.is_dir(storage.join(run, "plots"))
    with storage.open_input(blob) as handle:  # ranged reads: seek + read, and read_at
        handle.seek(300)
        assert handle.read(10) == bytes(range(44, 54)) and handle.read_at(4, 1020) == bytes(range(252, 256))
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/")["Contents"])
    # (pyarrow also leaves `run/` and `run/plots/` folder markers, which are not files)
    assert [f"{bucket}/{key}" for key in listed if key.count("/") == 1 and not key.endswith("/")] == \
        [path.removeprefix("s3://") for path in storage.list_files(run)]
    assert not storage.exists(storage.join(run, "missing")) and not storage.is_file(run)
    with pytest.raises(FileNotFoundError, match="missing"):
        storage.read_text(storage.join(run, "missing"))
    # A folder up and back down (the export, a wandb directory): same tree, same bytes.
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text(json.dumps({"x": 1}))
    (source / "sub" / "weights.bin").write_bytes(b"\x00\x01" * 5000)
    with storage.writable_dir(storage.join(run, "model")) as staging:
        for path in source.rglob("*"):
            if path.is_file():
                (staging / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                (staging / path.relative_to(source)).write_bytes(path.read_bytes())
        staged = staging
    assert not staged.exists()  # scratch is cleaned up once uploaded
    assert s3.get_object(Bucket=bucket, Key="run/model/sub/weights.bin")["Body"].read() == b"\x00\x01" * 5000
    with storage.readable_dir(storage.join(run, "model")) as copy:
        assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == \
            ["config.json", "sub/weights.bin"]
        assert (copy / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 5000


def _tar_rows(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a local tar read with `tarfile` (the reference reader)."""
    rows: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as archive:
        for member in archive:
            if not member.isreg():
                continue
            key, suffix = member.name.split(".", 1)
            if not rows or rows[-1][0] != key:
                rows.append((key, {}))
            rows[-1][1][suffix] = archive.extractfile(member).read()
    return rows


def test_shards_in_the_bucket_read_like_local_ones(s3_bucket, synthetic_mmeb, tmp_path) -> None:
    from sde_ray.data.convert import convert_mmeb, load_manifest
    from sde_ray.data.shards import build_shard_index, check_shards, expand_shards, iter_samples

    local = tmp_path / "shards"
    train_dir = Path(synthetic_mmeb["eval_dir"]).parent / "MMEB-train"
    manifest = convert_mmeb(train_dir, local, samples_per_shard=8, progress=False)
    prefix = storage.join(s3_bucket, "data", "shards")
    storage.upload_dir(local, prefix)  # the converted shards and their manifest, as a user uploads them
    names = [entry["name"] for entry in manifest["shards"]]
    remote = expand_shards([prefix])
    assert [storage.basename(p) for p in remote] == sorted(n for n in names)
    assert names[:2] == ["shard-000000.tar", "shard-000001.tar"]
    assert expand_shards([storage.join(prefix, "shard-00000[01].tar")]) == [storage.join(prefix, n) for n in names[:2]]
    # Counts come from the manifest beside the shards; no shard is opened for them.
    check = check_shards(remote, load_manifest(prefix))
    assert [check.samples[p] for p in check.paths] == [e["num_samples"] for e in sorted(
        manifest["shards"], key=lambda e: e["name"])]
    # The member index of a shard in the bucket (headers read ahead 256 KiB per request) is the local one's.
    path = storage.join(prefix, names[0])
    remote_index, local_index = build_shard_index(path), build_shard_index(str(local / names[0]))
    assert remote_index.keys == local_index.keys and remote_index.suffixes == local_index.suffixes
    for field in ("starts", "suffix_ids", "offsets", "sizes"):
        assert (getattr(remote_index, field) == getattr(local_index, field)).all(), field
    # Each worker's rows, by ranged reads, equal tarfile's reading of the local file.
    reference = _tar_rows(local / names[0])
    wanted = [1, 2, len(reference) - 1]
    chunks = list(iter_samples(path, wanted, chunk_rows=2))
    assert [len(c["__key__"]) for c in chunks] == [2, 1]
    got = {k: sum((c.get(k, [None] * len(c["__key__"])) for c in chunks), []) for k in chunks[0]}
    assert got["__key__"] == [reference[i][0] for i in wanted]
    for suffix in reference[0][1]:
        assert got[suffix] == [reference[i][1].get(suffix) for i in wanted], suffix
    # A shard whose object disagrees with the manifest's size is dropped with its reason.
    storage.write_bytes(path, (local / names[0]).read_bytes()[:-512])
    check = check_shards(remote, load_manifest(prefix))
    assert path not in check.paths and "!= manifest" in check.skipped[path]
    with pytest.raises(ValueError, match="fewer than"):
        list(iter_samples(storage.join(prefix, names[1]), [10_000], chunk_rows=1))
