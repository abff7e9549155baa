"""Where a run's bytes go: one storage layer over local paths, shared POSIX paths and object stores.

Every artifact a run reads or leaves (config record and history, metrics, plots, the export, eval
results, score files, the embedding cache, converted shards and their manifest, Ray Train's
checkpoints) is addressed by a *location*: an absolute local path (node-local or a shared mount),
`file:///abs/path`, `s3://bucket/prefix` or `gs://bucket/prefix`.

Built on `pyarrow.fs`, the file-system layer Ray itself uses: Ray Train's `RunConfig` takes a
`storage_filesystem: pyarrow.fs.FileSystem` and uploads every checkpoint with `pyarrow.fs.copy_files`
(ray/train/v2/_internal/execution/storage.py, `get_fs_and_path` = `FileSystem.from_uri`), and Ray
Data's file readers resolve paths to pyarrow file systems too. One library means one set of
credentials and one endpoint setting for the run's files, Ray's checkpoints and the shards, and a
`RandomAccessFile` with real ranged reads (`read_at`: one HTTP range request on S3) for the shard
reader.

Credentials come from the standard provider chains (AWS: environment, ~/.aws, instance or pod role;
GCS: application default credentials). A non-AWS S3 endpoint (MinIO, SeaweedFS, moto, R2, ...) is
given with `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (the AWS SDKs' own variables), read here so
Ray's checkpoints and our files go to the same server.

Object stores have no append and no rename: `append_text` rewrites the object, and a writer that
must be atomic writes to scratch and uploads once. Node-local scratch (`scratch_dir`) is for
temporaries only; nothing a run must keep stays there.

No Ray here (the library's shard reader uses it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sde_ray.config import ConfigError

REMOTE_SCHEMES = ("s3", "gs")
SCRATCH_ENV = "SDE_RAY_SCRATCH"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def scheme_of(location: str) -> str:
    """`s3`, `gs`, `file`, or "" for a plain path."""
    match = _URL.match(location)
    # A one-letter "scheme" is a Windows drive, never a URL; none is supported, but say so plainly.
    return match.group(1).lower() if match and len(match.group(1)) > 1 else ""


def is_remote(location: str) -> bool:
    return scheme_of(location) in REMOTE_SCHEMES


def check_location(location: str, key: str, *, allow_relative: bool = True) -> None:
    """A ConfigError naming `key` unless `location` is a path, `file:///abs`, `s3://bucket[/...]` or
    `gs://bucket[/...]`. Catches `s3:/bucket/x` (one slash: today it became the relative folder
    `s3:/bucket/x` of each process's working directory), unsupported schemes and a missing bucket."""
    if not location:
        return
    scheme = scheme_of(location)
    if not scheme:
        if not allow_relative and not os.path.isabs(os.path.expanduser(location)):
            raise ConfigError(f"{key}: {location!r} is a relative path; give an absolute path or an s3:// / gs:// URL.")
        return
    if scheme == "file":
        if not location.startswith("file:///"):
            raise ConfigError(f"{key}: {location!r}: a file URL must be absolute (file:///path).")
        return
    if scheme not in REMOTE_SCHEMES:
        raise ConfigError(f"{key}: {location!r}: unsupported scheme {scheme}://; use a path, file://, s3:// or gs://.")
    parsed = urlparse(location)
    if not location.startswith(f"{scheme}://") or not parsed.netloc:
        raise ConfigError(f"{key}: {location!r} is not a {scheme}:// URL with a bucket ({scheme}://bucket/prefix).")


def local_path(location: str) -> str:
    """A local location as an absolute path (`~` expanded, `file://` dropped); unchanged for URLs."""
    if is_remote(location):
        return location
    return os.path.abspath(os.path.expanduser(location.removeprefix("file://")))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a path or a URL (a URL keeps its `scheme://`)."""
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(local_path(base), *parts)


def parent(location: str) -> str:
    if is_remote(location):
        scheme, rest = location.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(local_path(location))


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/"))


def s3_endpoint() -> str:
    """The S3 endpoint the AWS SDK variables name (empty: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""


@functools.lru_cache(maxsize=8)
def _remote_filesystem(scheme: str, endpoint: str) -> pafs.FileSystem:
    if scheme == "s3":
        options = {}
        if endpoint:
            parsed = urlparse(endpoint)
            options = {"endpoint_override": parsed.netloc or endpoint, "scheme": parsed.scheme or "https",
                       # A custom endpoint (MinIO, moto, SeaweedFS) serves buckets at path-style URLs.
                       "force_virtual_addressing": False}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options)
    return pafs.FileSystem.from_uri(f"{scheme}://bucket")[0]


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow file system, path on it) of a location: what Ray Train's `storage_filesystem` /
    `storage_path` take, and what every read and write here goes through."""
    scheme = scheme_of(location)
    if scheme in REMOTE_SCHEMES:
        return _remote_filesystem(scheme, s3_endpoint() if scheme == "s3" else ""), location.split("://", 1)[1].rstrip("/")
    if scheme and scheme != "file":
        raise ConfigError(f"{location!r}: unsupported scheme {scheme}://")
    return pafs.LocalFileSystem(), local_path(location)


def ray_storage(location: str) -> tuple[str, pafs.FileSystem | None]:
    """`(storage_path, storage_filesystem)` for Ray Train's RunConfig: a local path as it is (Ray's
    own local file system), a URL as the bucket path on our file system (same endpoint, same
    credentials as every other artifact)."""
    if not is_remote(location):
        return local_path(location), None
    filesystem, path = resolve(location)
    return path, filesystem


def exists(location: str) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def is_file(location: str) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type == pafs.FileType.File


def size(location: str) -> int:
    filesystem, path = resolve(location)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(location)
    return int(info.size)


def version(location: str) -> tuple[int, int]:
    """(size, modification time in ns; 0 where the store has none): a cache key that changes when
    the object is rewritten."""
    filesystem, path = resolve(location)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(location)
    return int(info.size), int(info.mtime_ns or 0)


def makedirs(location: str) -> None:
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def read_bytes(location: str) -> bytes:
    filesystem, path = resolve(location)
    try:
        with filesystem.open_input_stream(path) as handle:
            return handle.read()
    except (FileNotFoundError, OSError) as exc:
        if not exists(location):
            raise FileNotFoundError(f"{location}: not found") from None
        raise exc


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """Writes the whole object (an object store makes it visible only when complete)."""
    filesystem, path = resolve(location)
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as handle:
        handle.write(data)


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def append_text(location: str, text: str) -> None:
    """Appends to a local file; rewrites an object (stores have no append: for small logs only)."""
    if not is_remote(location):
        path = local_path(location)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
        return
    write_text(location, (read_text(location) if exists(location) else "") + text)


def open_input(location: str):
    """A seekable binary file (pyarrow `RandomAccessFile`): `seek`/`read`/`read_at` are ranged reads
    on an object store, so a reader fetches only the bytes it asks for."""
    filesystem, path = resolve(location)
    return filesystem.open_input_file(path)


def list_files(location: str, suffix: str = "") -> list[str]:
    """The files directly under a folder (or prefix) ending in `suffix`, as locations, sorted."""
    filesystem, path = resolve(location)
    infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(info.base_name for info in infos if info.type == pafs.FileType.File and info.base_name.endswith(suffix))
    return [join(location, name) for name in names]


def delete_dir(location: str) -> None:
    filesystem, path = resolve(location)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copies a local folder to a location (recursively; a local destination is a plain copy)."""
    if not is_remote(location):
        if os.path.abspath(local_dir) != local_path(location):
            shutil.copytree(local_dir, local_path(location), dirs_exist_ok=True)
        return
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=filesystem)


def download_dir(location: str, local_dir: str | os.PathLike) -> str:
    """A remote folder copied into `local_dir` (returned); a local location is returned as it is."""
    if not is_remote(location):
        return local_path(location)
    filesystem, path = resolve(location)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return str(local_dir)


def scratch_dir() -> Path:
    """This node's scratch folder for temporaries (`SDE_RAY_SCRATCH`, else the system temp folder)."""
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir()) / "sde_ray"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def writable_dir(location: str) -> Iterator[Path]:
    """A local folder to write into that ends up at `location`: the folder itself when it is local,
    else a scratch folder uploaded (then removed) when the block exits without an error."""
    if not is_remote(location):
        path = Path(local_path(location))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    staging = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch_dir()))
    try:
        yield staging
        upload_dir(staging, location)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def readable_dir(location: str) -> Iterator[Path]:
    """A local folder with the contents of `location`: itself when local, else a scratch download
    removed when the block exits."""
    if not is_remote(location):
        yield Path(local_path(location))
        return
    staging = Path(tempfile.mkdtemp(prefix="download-", dir=scratch_dir()))
    try:
        yield Path(download_dir(location, staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Keys whose value is a location: (key, may it be an object-store URL?). Folders of raw MMEB images
# and the converted-shard cache are read and written with local file APIs (the converter, the
# image loaders): a URL there is refused with a one-line error instead of a folder named `s3:`.
LOCATION_KEYS = (
    ("train.output_dir", True), ("train.storage_path", True), ("data.cache_dir", False),
    ("data.mmeb_train_dir", False), ("data.mmeb_eval_dir", False), ("data.negatives_sidecar", False),
    ("eval.data_dir", False), ("eval.val_data_dir", False),
)


def check_config_locations(config) -> None:
    """Every location key of a `Config` is a supported path or URL (ConfigError naming the key
    otherwise): run on the driver before any path is resolved and before Ray starts."""
    for key, remote_ok in LOCATION_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if remote_ok:
            check_location(value, key)
        else:
            require_local(value, key)
    for index, entry in enumerate(config.data.shards):
        check_location(entry, f"data.shards[{index}]")


def require_local(location: str, what: str) -> None:
    """A ConfigError unless `location` is a path (or file://): for outputs still written with local
    file APIs (a sweep's folder, a comparison's), refused in one line before anything starts."""
    check_location(location, what)
    if is_remote(location):
        raise ConfigError(f"{what}: {location!r}: must be a local or shared-mount path (an object-store URL "
                          "works for `sde-ray train --output-dir`, train.storage_path and data.shards).")
