"""MMEB-V2 layouts (frames folders, visdoc corpora) -> our WebDataset shards, one training pair per query.

A sample is the query with its best-graded relevant item, in the shard format of
sde_ray/data/convert.py (members `json`, `qry.img` / `pos.img`) plus, for a side that is a video,
`qry.frames` / `pos.frames`: the side's sampled frames, encoded bytes as on disk, in one member
(`pack_frames`: magic, count, lengths, then the bytes), so a shard row keeps a fixed set of
columns whatever the number of frames. A visual-document page is a single image (`*.img`). The
json adds `modality` (video / visdoc) and `qry_frames` / `pos_frames` (frame counts).

Frames are sampled at conversion time with the harness's rule (`num_frames`, the last frame
repeated for short clips), so training sees what evaluation will. Unreadable frames or pages are
rejected per row into `rejects.jsonl`, never fatal, and counted in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
from pathlib import Path

from sde_ray.data.convert import (FORMAT, REJECTS, SCHEMA_VERSION, _atomic_write,
                                  check_image, sha256_file, target_hash, write_sample)
from sde_ray.data.mmeb import MANIFEST
from sde_ray.data.mmeb_v2 import Item, RetrievalSet, discover, read_set

FRAMES_MAGIC = b"SDEF"
# Not MMEB-train's `shard-*`: V2 shards sit in one shard list with them, and manifests match by name.
SHARD_PATTERN = "v2-shard-{:06d}.tar"


def pack_frames(frames: list[bytes]) -> bytes:
    """Encoded frames -> one member: b"SDEF", uint32 count, count × uint64 lengths, the bytes."""
    header = FRAMES_MAGIC + struct.pack(f"<I{len(frames)}Q", len(frames), *(len(f) for f in frames))
    return header + b"".join(frames)


def unpack_frames(data: bytes) -> list[bytes]:
    data = bytes(data)
    if data[:4] != FRAMES_MAGIC:
        raise ValueError("not a packed frames member (bad magic)")
    (count,) = struct.unpack_from("<I", data, 4)
    lengths = struct.unpack_from(f"<{count}Q", data, 8)
    offset, frames = 8 + 8 * count, []
    for length in lengths:
        frames.append(data[offset:offset + length])
        offset += length
    if offset != len(data):
        raise ValueError(f"packed frames member: {len(data)} bytes, the header accounts for {offset}")
    return frames


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _read_images(paths: list[str]) -> list[bytes]:
    images = []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            check_image(data)
        except Exception as exc:
            raise _Rejected("undecodable_image", f"{path}: {type(exc).__name__}") from None
        images.append(data)
    return images


def _side(item: Item, video: bool) -> tuple[dict[str, bytes], bytes | None, int]:
    """(members, the bytes the content id covers, frame count) of one side."""
    if not item.images:
        return {}, None, 0
    images = _read_images(item.images)
    if video:
        packed = pack_frames(images)
        return {"frames": packed}, packed, len(images)
    return {"img": images[0]}, images[0], 0


def training_pairs(data: RetrievalSet) -> list[tuple[int, Item, Item]]:
    """(query row, query, its best-graded relevant item; ties: the first in the corpus)."""
    position = {cid: i for i, cid in enumerate(data.corpus_ids)}
    pairs = []
    for row, (query, qrels) in enumerate(zip(data.queries, data.qrels)):
        present = [(-grade, position[cid]) for cid, grade in qrels.items() if cid in position]
        if present:
            pairs.append((row, query, data.corpus[min(present)[1]]))
    return pairs


def build_v2_sample(data: RetrievalSet, row: int, query: Item, positive: Item) -> dict:
    video = data.modality == "video"
    qry_members, qry_bytes, qry_frames = _side(query, video)
    pos_members, pos_bytes, pos_frames = _side(positive, video)
    meta = {"subset": data.name, "source_row": row, "meta_task": data.group, "split": "v2",
            "modality": data.modality, "qry_text": query.text, "pos_text": positive.text, "neg_text": "",
            "qry_frames": qry_frames, "pos_frames": pos_frames,
            "target_hash": target_hash(positive.text, pos_bytes)}
    sample = {"__key__": f"{data.name}-{row:08d}", "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}
    for prefix, members in (("qry", qry_members), ("pos", pos_members)):
        for suffix, value in members.items():
            sample[f"{prefix}.{suffix}"] = value
    return sample


def convert_v2(src: str | os.PathLike, out: str | os.PathLike, num_frames: int = 8,
               samples_per_shard: int = 1024, sets: list[str] | None = None) -> dict:
    """Every V2 set under `src` (or the named ones) -> shards under `out`; returns the manifest."""
    src, out = Path(src).resolve(), Path(out).resolve()
    found = discover(src)
    if sets:
        unknown = sorted(set(sets) - {name for _, _, name in found})
        if unknown:
            raise ValueError(f"set(s) {unknown} not found under {src}; found {[n for _, _, n in found]}")
        found = [f for f in found if f[2] in sets]
    if not found:
        raise ValueError(f"no MMEB-V2 set (video-tasks/<Dataset>/test.jsonl or visdoc-tasks/<Dataset>/queries.jsonl) under {src}")
    out.mkdir(parents=True, exist_ok=True)
    samples, rejects, subsets = [], [], {}
    for modality, group, name in found:
        data = read_set(src, group, name, num_frames=num_frames)
        rejects += [{"subset": name, "reason": "missing_frames" if "frames" in p else "skipped", "detail": p}
                    for p in data.problems]
        kept = 0
        for row, query, positive in training_pairs(data):
            try:
                samples.append(build_v2_sample(data, row, query, positive))
                kept += 1
            except _Rejected as exc:
                rejects.append({"subset": name, "source_row": row, "reason": exc.reason, "detail": exc.detail})
        subsets[name] = {"rows": len(data.queries), "samples": kept, "meta_task": group, "modality": modality}
    # Interleave the sets so that every shard mixes modalities (a fixed, seed-free order).
    samples.sort(key=lambda s: hashlib.sha1(s["__key__"].encode()).hexdigest())
    shards = []
    for index, start in enumerate(range(0, len(samples), samples_per_shard)):
        name = SHARD_PATTERN.format(index)
        with tarfile.open(out / name, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for sample in samples[start:start + samples_per_shard]:
                write_sample(archive, sample)
        shards.append({"name": name, "num_samples": len(samples[start:start + samples_per_shard]),
                       "sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size})
    by_reason: dict[str, int] = {}
    for reject in rejects:
        by_reason[reject["reason"]] = by_reason.get(reject["reason"], 0) + 1
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "source": str(src), "split": "v2",
                "samples_per_shard": samples_per_shard, "num_frames": num_frames, "num_shards": len(shards),
                "num_samples": len(samples), "rejected": len(rejects), "rejected_by_reason": by_reason,
                "subsets": subsets, "shards": shards}
    _atomic_write(out / REJECTS, "".join(json.dumps(r) + "\n" for r in rejects))
    _atomic_write(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest
