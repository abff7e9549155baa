"""WebDataset shards on the driver and in the read tasks: expansion, validation, selective reads.

- `expand_shards`: files from paths, folders and globs (local or fsspec URLs), made absolute.
- `check_shards`: drops corrupt or truncated shards (tar headers past the end of the file, sizes
  or sample counts that disagree with the manifest, optionally sha256), reporting each skipped
  shard with its reason. Nothing is fatal but an empty result.
- `read_samples(path, rows)`: the raw members of the samples at the given row indices of one
  shard. The other samples are skipped at the tar-header level: their bytes are neither read nor
  decoded (what lets a resume start mid-epoch without replaying the consumed rows).

No Ray here: the Ray Data tasks of `sde_ray.train.data` call these functions.
"""

from __future__ import annotations

import glob
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def expand_shards(shards: list[str] | str) -> list[str]:
    """Files from paths, folders (their *.tar) and globs; local paths made absolute; order kept."""
    items = [shards] if isinstance(shards, str) else list(shards)
    out: list[str] = []
    for item in items:
        item = str(item)
        if _is_remote(item):
            if any(ch in item for ch in "*?["):
                import fsspec

                _fs, _, matches = fsspec.get_fs_token_paths(item)
                protocol = item.split("://", 1)[0]
                out.extend(f"{protocol}://{m}" if "://" not in m else m for m in sorted(matches))
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


def check_shards(shards: list[str] | str, manifest: dict | None = None, verify_sha256: bool = False) -> ShardCheck:
    """Drops corrupt, truncated or manifest-mismatching local shards (remote ones are taken on trust).

    A shard is checked against the manifest entry with the same file name when one is given: byte
    size, sample count and (with `verify_sha256`) checksum. Empty shards are dropped silently, as
    they carry nothing. Raises only when no usable shard is left.
    """
    expected = {entry["name"]: entry for entry in (manifest or {}).get("shards", [])}
    check = ShardCheck(paths=[])
    for path in expand_shards(shards):
        entry = expected.get(os.path.basename(path))
        if _is_remote(path):
            check.paths.append(path)
            if entry:
                check.samples[path] = entry["num_samples"]
            continue
        try:
            if not os.path.isfile(path):
                raise ValueError("file not found")
            if entry and os.path.getsize(path) != entry["bytes"]:
                raise ValueError(f"size {os.path.getsize(path)} != manifest {entry['bytes']} bytes")
            count = tar_sample_count(path)
            if entry and count != entry["num_samples"]:
                raise ValueError(f"{count} samples != manifest {entry['num_samples']}")
            if entry and verify_sha256:
                from sde_ray.data.convert import sha256_file

                if sha256_file(path) != entry["sha256"]:
                    raise ValueError("sha256 differs from the manifest")
        except (OSError, ValueError) as exc:
            check.skipped[path] = str(exc)
            continue
        if count:
            check.paths.append(path)
            check.samples[path] = count
    if check.skipped:
        logger.warning("skipping %d corrupt shard(s): %s", len(check.skipped),
                       "; ".join(f"{p}: {r}" for p, r in check.skipped.items()))
    if not check.paths:
        raise RuntimeError(f"no usable WebDataset shard left out of {shards}; skipped: {check.skipped}")
    return check



def sample_key(member_name: str) -> str:
    """The WebDataset sample key of a tar member: its base name up to the first dot."""
    base = member_name.split("/")[-1]
    return base.split(".", 1)[0] if "." in base else base


def read_samples(path: str, rows: Sequence[int]) -> dict[str, list]:
    """Columns `__key__`, `__url__` and one per member suffix (`json`, `qry.img`, ...; None where a
    sample lacks it) of the samples at `rows` (ascending row indices) of the shard at `path`.

    Samples are consecutive members sharing a key (the WebDataset layout). Members of other samples
    are passed over by their headers (a seek on a local file), and the read stops after the last
    wanted row. Raises ValueError when the shard has fewer rows than asked for.
    """
    wanted = list(rows)
    if any(b <= a for a, b in zip(wanted, wanted[1:])):
        raise ValueError(f"rows of {path} must be strictly ascending")
    samples: list[dict[str, bytes]] = []
    keys: list[str] = []
    if not wanted:
        return {"__key__": [], "__url__": []}
    opener = _open_remote(path) if _is_remote(path) else open(path, "rb")
    with opener as handle, tarfile.open(fileobj=handle, mode="r:" if not _is_remote(path) else "r|") as archive:
        index, current, cursor, filling = -1, None, 0, False
        for member in archive:
            if not member.isreg():
                continue
            key = sample_key(member.name)
            if key != current:
                current, index = key, index + 1
                if index > wanted[-1]:
                    break
                filling = cursor < len(wanted) and index == wanted[cursor]
                if filling:
                    cursor += 1
                    keys.append(key)
                    samples.append({})
            if filling:
                suffix = member.name.split("/")[-1][len(key) + 1:]
                samples[-1][suffix] = archive.extractfile(member).read()
    if len(samples) != len(wanted):
        raise ValueError(f"{path} has fewer than {wanted[-1] + 1} samples (found {len(samples)} of the wanted rows)")
    suffixes = sorted({s for sample in samples for s in sample})
    columns: dict[str, list] = {"__key__": keys, "__url__": [path] * len(keys)}
    for suffix in suffixes:
        columns[suffix] = [sample.get(suffix) for sample in samples]
    return columns


def _open_remote(path: str):
    import fsspec

    return fsspec.open(path, "rb").open()
