"""WebDataset shards on the driver and in the read tasks: expansion, validation, selective reads.

- `expand_shards`: files from paths, folders and globs (local, s3:// or gs://), made absolute.
- `check_shards`: drops shards that disagree with the manifest written at conversion (missing,
  or a byte size that differs: one stat / listing per shard, no shard opened; `SHARD_CHECKS` adds
  the tar headers and the sha256 for a one-time deep check), reporting each skipped shard with
  its reason. Shards without a manifest entry are parsed (their sample counts are only in their
  headers). Nothing is fatal but an empty result.
- `read_samples(path, rows)` / `iter_samples(path, rows, chunk_rows)`: the raw members of the
  samples at the given row indices of one shard (all at once / in chunks, one pass). The other
  samples' bytes are neither read nor decoded (what lets a resume start mid-epoch without
  replaying the consumed rows): a shard, local or in an object store (`sde_ray.storage`), is read
  at the member offsets of its `ShardIndex` (its tar headers, parsed once per process and kept):
  ranged reads on a store, never the whole object.

No Ray here: the Ray Data tasks of `sde_ray.train.data` call these functions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sde_ray import storage

logger = logging.getLogger(__name__)


def _is_remote(path: str) -> bool:
    return storage.is_remote(path)


def expand_shards(shards: list[str] | str) -> list[str]:
    """Files from paths, folders (their *.tar) and globs, local or in an object store (`s3://`,
    `gs://`: a prefix lists its *.tar, a glob matches within one prefix); local paths made absolute;
    order kept."""
    items = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for item in items:
        item = str(item)
        if _is_remote(item):
            if any(ch in item for ch in "*?["):
                pattern = storage.basename(item)
                out.extend(f for f in storage.list_files(storage.parent(item))
                           if fnmatch.fnmatchcase(storage.basename(f), pattern))
            elif storage.is_dir(item):
                out.extend(storage.list_files(item, ".tar"))
            else:
                out.append(item)
            continue
        local = os.path.abspath(os.path.expanduser(item.removeprefix("file://")))
        if os.path.isdir(local):
            out.extend(sorted(glob.glob(os.path.join(local, "*.tar"))))
        elif any(ch in local for ch in "*?["):
            out.extend(sorted(glob.glob(local)))
        else:
            out.append(local)
    if not out:
        raise FileNotFoundError(f"no WebDataset shards match {items}")
    return out


def tar_sample_count(path: str) -> int:
    """Samples in a local tar, reading headers only; raises ValueError for truncated or corrupt files."""
    size = os.path.getsize(path)
    keys = set()
    try:
        with tarfile.open(path, mode="r:") as archive:
            for member in archive:
                if member.offset_data + member.size > size:
                    raise ValueError(f"member {member.name!r} runs past the end of the file (truncated)")
                if member.isreg():
                    keys.add(sample_key(member.name))
    except tarfile.TarError as exc:
        raise ValueError(f"not a readable tar: {exc}") from None
    return len(keys)


@dataclass
class ShardCheck:
    """Shards that passed the checks, those skipped (path -> reason), and sample counts if known."""

    paths: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @property
    def num_samples(self) -> int | None:
        if any(p not in self.samples for p in self.paths):
            return None
        return sum(self.samples[p] for p in self.paths)


# How deeply `check_shards` looks at a shard that has a manifest entry (data.shard_check):
# - manifest: its byte size against the manifest (a stat, or one HEAD/listing on a store); the
#   sample count is the manifest's. What every launch does: a truncated or half-copied shard
#   changes size; a shard rewritten in place with the same size is the one thing it misses.
# - headers: also parses every tar header (the check every launch did before issue 28): catches a
#   shard whose structure is broken at the same size, at seconds per 100k samples (docs/benchmarks.md).
# - sha256: also hashes every byte against the checksum recorded at conversion (reads every
#   shard whole: `sde-ray data verify`, a one-time check after a copy, not a per-launch one).
SHARD_CHECKS = ("manifest", "headers", "sha256")


def check_shards(shards: list[str] | str, manifest: dict | None = None, depth: str = "manifest") -> ShardCheck:
    """Drops missing, truncated or manifest-mismatching shards, local or in an object store.

    A shard is checked against the manifest entry with the same file name (`depth`, one of
    `SHARD_CHECKS`: size; + tar headers and sample count; + sha256). A shard without an entry has
    its tar headers parsed for its sample count (local) or is taken on trust (remote). Empty shards
    are dropped silently, as they carry nothing. Raises only when no usable shard is left.
    """
    if depth not in SHARD_CHECKS:
        raise ValueError(f"shard check {depth!r} is not one of {SHARD_CHECKS}")
    expected = {entry["name"]: entry for entry in (manifest or {}).get("shards", [])}
    check = ShardCheck(paths=[])
    for path in expand_shards(shards):
        entry = expected.get(os.path.basename(path))
        try:
            count = _checked_count(path, entry, depth)
        except (OSError, ValueError) as exc:
            check.skipped[path] = str(exc)
            continue
        if count is None:  # a remote shard without a manifest entry: its count is unknown
            check.paths.append(path)
        elif count:
            check.paths.append(path)
            check.samples[path] = count
    if check.skipped:
        logger.warning("skipping %d corrupt shard(s): %s", len(check.skipped),
                       "; ".join(f"{p}: {r}" for p, r in check.skipped.items()))
    if not check.paths:
        raise RuntimeError(f"no usable WebDataset shard left out of {shards}; skipped: {check.skipped}")
    return check


def _checked_count(path: str, entry: dict | None, depth: str) -> int | None:
    """The sample count of one shard after the checks `depth` asks for; ValueError/OSError if it fails."""
    remote = _is_remote(path)
    if not remote and not os.path.isfile(path):
        raise ValueError("file not found")
    if entry is None:
        return None if remote else tar_sample_count(path)
    size = storage.size(path) if remote else os.path.getsize(path)
    if size != entry["bytes"]:
        raise ValueError(f"size {size} != manifest {entry['bytes']} bytes")
    if depth in ("headers", "sha256") and not remote:
        count = tar_sample_count(path)
        if count != entry["num_samples"]:
            raise ValueError(f"{count} samples != manifest {entry['num_samples']}")
    if depth == "sha256" and sha256_of(path) != entry["sha256"]:
        raise ValueError("sha256 differs from the manifest")
    return entry["num_samples"]


def sha256_of(path: str) -> str:
    """The sha256 of a file, local or in an object store, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with storage.open_input(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sample_key(member_name: str) -> str:
    """The WebDataset sample key of a tar member: its base name up to the first dot."""
    base = member_name.split("/")[-1]
    return base.split(".", 1)[0] if "." in base else base


@dataclass(frozen=True)
class ShardIndex:
    """Where the members of every sample of one local tar lie (from its headers; no data read).

    Sample i is members `starts[i]:starts[i + 1]`; member j has data at `offsets[j]`, `sizes[j]`
    bytes, and suffix `suffixes[suffix_ids[j]]` (`json`, `qry.img`, ...). Arrays, not per-member
    objects: a process keeps the indexes of many shards (`shard_index`).
    """

    keys: list[str]
    starts: np.ndarray
    suffix_ids: np.ndarray
    suffixes: tuple[str, ...]
    offsets: np.ndarray
    sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)


class _ReadAhead:
    """A read-only file over a store's `RandomAccessFile` that fetches `block` bytes per request:
    tarfile reads a 512-byte header, then seeks past the member's data; with small members many
    headers arrive in one ranged read instead of one request each (a member larger than a block
    is skipped over without reading it)."""

    def __init__(self, raw, block: int = 1 << 18):
        self.raw, self.block, self.size = raw, block, raw.size()
        self.position, self.start, self.data = 0, 0, b""

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.position if n is None or n < 0 else min(n, self.size - self.position)
        end = self.position + n
        if not (self.start <= self.position and end <= self.start + len(self.data)):
            self.start, self.data = self.position, self.raw.read_at(max(n, self.block), self.position)
        out = self.data[self.position - self.start:end - self.start]
        self.position = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else self.position + offset if whence == 1 else self.size + offset
        return self.position

    def tell(self) -> int:
        return self.position


def build_shard_index(path: str) -> ShardIndex:
    """The `ShardIndex` of the tar at `path` (local or in an object store): one pass over its
    headers, seeking past the members' data (on a store: ranged reads of 256 KiB, `_ReadAhead`)."""
    keys, starts, suffix_ids, offsets, sizes = [], [], [], [], []
    suffixes: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if storage.is_remote(path):
            handle = _ReadAhead(stack.enter_context(storage.open_input(path)))
        else:
            handle = stack.enter_context(open(path, "rb"))
        archive = stack.enter_context(tarfile.open(fileobj=handle, mode="r:"))
        for member in archive:
            if not member.isreg():
                continue
            key = sample_key(member.name)
            if not keys or key != keys[-1]:
                keys.append(key)
                starts.append(len(offsets))
            suffix = member.name.split("/")[-1][len(key) + 1:]
            suffix_ids.append(suffixes.setdefault(suffix, len(suffixes)))
            offsets.append(member.offset_data)
            sizes.append(member.size)
    return ShardIndex(keys=keys, starts=np.array(starts + [len(offsets)], dtype=np.int64),
                      suffix_ids=np.array(suffix_ids, dtype=np.int16), suffixes=tuple(suffixes),
                      offsets=np.array(offsets, dtype=np.int64), sizes=np.array(sizes, dtype=np.int64))


# Per process, the indexes of the shards read last, keyed by (path, size, mtime): a Ray worker
# process that reads a shard again (every later epoch, the next window) seeks straight to the
# wanted samples instead of parsing the tar headers again (tarfile parses them in Python: ~0.5
# CPU-s per 8,448-sample epoch at 32 px, a quarter of the floor's whole epoch, docs/data.md §5).
# ~135 KB per 1,024-sample shard, so 256 shards keep ~35 MB; a process that cycles through more
# shards than that rebuilds an index once per read task (one header pass, as the floor reads).
_INDEXES: OrderedDict[tuple, ShardIndex] = OrderedDict()
INDEXES_KEPT = 256


def shard_index(path: str) -> ShardIndex:
    """This process's `ShardIndex` of the tar `path`, rebuilt when the file (object) changed."""
    key = (path, *storage.version(path))
    index = _INDEXES.get(key)
    if index is None:
        index = _INDEXES[key] = build_shard_index(path)
        while len(_INDEXES) > INDEXES_KEPT:
            _INDEXES.popitem(last=False)
    _INDEXES.move_to_end(key)
    return index


def read_samples(path: str, rows: Sequence[int]) -> dict[str, list]:
    """Columns `__key__`, `__url__` and one per member suffix (`json`, `qry.img`, ...; None where a
    sample lacks it) of the samples at `rows` (ascending row indices) of the shard at `path`.

    Samples are consecutive members sharing a key (the WebDataset layout). Members of other samples
    are never read: a shard, local or remote, is read at the wanted members' offsets (`shard_index`).
    Raises ValueError when the shard has fewer rows than asked for.
    """
    return next(iter_samples(path, rows, max(1, len(rows))), None) or {"__key__": [], "__url__": []}


def iter_samples(path: str, rows: Sequence[int], chunk_rows: int) -> Iterator[dict[str, list]]:
    """`read_samples(path, rows)` in chunks of `chunk_rows` rows, in one pass over the shard (a
    task's memory holds one chunk's raw bytes)."""
    wanted = [int(r) for r in rows]
    if any(b <= a for a, b in zip(wanted, wanted[1:])):
        raise ValueError(f"rows of {path} must be strictly ascending")
    if not wanted:
        return
    chunks = _seek_samples(path, wanted)
    found, pending = 0, []
    for key, sample in chunks:
        pending.append((key, sample))
        found += 1
        if len(pending) == chunk_rows:
            yield _columns(path, pending)
            pending = []
    if found != len(wanted):
        raise ValueError(f"{path} has fewer than {wanted[-1] + 1} samples (found {found} of the wanted rows)")
    if pending:
        yield _columns(path, pending)


def _columns(path: str, samples: list[tuple[str, dict[str, bytes]]]) -> dict[str, list]:
    suffixes = sorted({s for _, sample in samples for s in sample})
    columns: dict[str, list] = {"__key__": [key for key, _ in samples], "__url__": [path] * len(samples)}
    for suffix in suffixes:
        columns[suffix] = [sample.get(suffix) for _, sample in samples]
    return columns


def _seek_samples(path: str, wanted: list[int]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of the wanted rows of a shard: one read per sample, spanning its
    members (consecutive in the tar, a 512-byte header between two); on an object store each is a
    ranged read of those bytes only."""
    index = shard_index(path)
    with storage.open_input(path) as handle:
        for row in wanted:
            if row >= len(index):
                return
            first, last = index.starts[row], index.starts[row + 1]
            begin = int(index.offsets[first])
            handle.seek(begin)
            span = memoryview(handle.read(int(index.offsets[last - 1] + index.sizes[last - 1]) - begin))
            yield index.keys[row], {
                index.suffixes[index.suffix_ids[j]]: bytes(span[index.offsets[j] - begin:
                                                                 index.offsets[j] - begin + index.sizes[j]])
                for j in range(first, last)}
