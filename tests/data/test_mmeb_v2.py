"""The V2 layouts' readers, the harness's frame sampler and the synthetic V2 (tiny, no model)."""

import hashlib
import json
from pathlib import Path

from PIL import Image

from sde_ray.data.mmeb_v2 import discover, frame_indices, list_frames, read_set, sample_frames
from sde_ray.data.synth_v2 import write_synthetic_v2


def test_frame_sampler_follows_the_harness_rule():
    # np.linspace(0, n-1, num_frames) truncated: worked out by hand.
    assert frame_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]  # 63/7 = 9 exactly
    assert frame_indices(10, 4) == [0, 3, 6, 9]
    assert frame_indices(12, 8) == [0, 1, 3, 4, 6, 7, 9, 11]  # steps of 11/7 = 1.571...
    assert frame_indices(8, 8) == list(range(8))
    # Short clips: the last frame repeated (pad_short), or all frames (the earlier rule).
    assert frame_indices(3, 8) == [0, 1, 2, 2, 2, 2, 2, 2]
    assert frame_indices(3, 8, pad_short=False) == [0, 1, 2]
    assert frame_indices(5, 0) == [] and frame_indices(0, 8) == []
    assert sample_frames(["a", "b", "c", "d", "e"], 2) == ["a", "e"]


def test_frames_listed_in_natural_order(tmp_path):
    for name in ("frame_10.jpg", "frame_2.jpg", "frame_1.JPG", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(p).name for p in list_frames(tmp_path)] == ["frame_1.JPG", "frame_2.jpg", "frame_10.jpg"]
    assert list_frames(tmp_path / "absent") == []


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _frames(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i + 1:05d}.jpg")


def make_v2_fixture(root):
    """A hand-made tree in the release's layouts, with the defects the readers must survive."""
    video = root / "video-tasks"
    _frames(video / "frames/video_cls/HMDB51/v1", 20)
    _frames(video / "frames/video_cls/HMDB51/v2", 3)
    (video / "frames/video_cls/HMDB51/v3").mkdir(parents=True)  # extracted to nothing
    _jsonl(video / "HMDB51/test.jsonl", [{"video_id": "v1", "pos_text": "run"}, {"video_id": "v2", "pos_text": "jump"},
                                         {"video_id": "v3", "pos_text": "walk"}])
    _frames(video / "frames/video_ret/MSR-VTT/video7", 64)
    _frames(video / "frames/video_ret/MSR-VTT/video9", 64)
    _jsonl(video / "MSR-VTT/test.jsonl", [{"video_id": "video7", "caption": "a cat"},
                                          {"video_id": "video9", "caption": "a dog"},
                                          {"video_id": "video7", "caption": "a kitten"}])
    docs = root / "visdoc-tasks/ViDoRe_arxivqa"
    docs.mkdir(parents=True)
    for cid in ("p1", "p2", "p3"):
        Image.new("RGB", (8, 8)).save(docs / f"{cid}.png")
    _jsonl(docs / "corpus.jsonl", [{"corpus-id": c} for c in ("p1", "p2", "p3", "p4")])  # p4: no image
    _jsonl(docs / "queries.jsonl", [{"query-id": "q1", "query": "revenue"}, {"query-id": "q2", "query": "loss"},
                                    {"query-id": "q3", "query": "unjudged"}])
    _jsonl(docs / "qrels.jsonl", [{"query-id": "q1", "corpus-id": "p1", "score": 1},
                                  {"query-id": "q1", "corpus-id": "p1", "score": 2},  # repeated: the higher grade
                                  {"query-id": "q1", "corpus-id": "p3", "score": 0},  # grade 0: not relevant
                                  {"query-id": "q2", "corpus-id": "p2", "score": 1},
                                  {"query-id": "q3", "corpus-id": "p3", "score": 0}])
    return root


def test_readers_on_the_release_layouts(tmp_path):
    root = make_v2_fixture(tmp_path)
    assert discover(root) == [("video", "video_cls", "HMDB51"), ("video", "video_ret", "MSR-VTT"),
                              ("visdoc", "visdoc", "ViDoRe_arxivqa")]
    cls = read_set(root, "video_cls", "HMDB51", num_frames=8)
    assert cls.corpus_ids == ["jump", "run"] and cls.qrels == [{"run": 1.0}, {"jump": 1.0}]
    assert [Path(p).name for p in cls.queries[0].images] == [f"{i + 1:05d}.jpg" for i in frame_indices(20, 8)]
    assert [Path(p).name for p in cls.queries[1].images] == ["00001.jpg", "00002.jpg"] + ["00003.jpg"] * 6
    assert cls.problems == ["HMDB51/v3: no frames"]
    ret = read_set(root, "video_ret", "MSR-VTT", num_frames=4)
    assert ret.corpus_ids == ["video7", "video9"]  # each video once, however many captions
    assert [Path(p).name for p in ret.corpus[0].images] == ["00001.jpg", "00022.jpg", "00043.jpg", "00064.jpg"]
    assert ret.qrels == [{"video7": 1.0}, {"video9": 1.0}, {"video7": 1.0}]
    assert ret.queries[2].text.endswith("a kitten") and not ret.queries[2].images
    doc = read_set(root, "visdoc", "ViDoRe_arxivqa")
    assert doc.corpus_ids == ["p1", "p2", "p3"] and doc.qrels == [{"p1": 2.0}, {"p2": 1.0}]
    assert doc.problems == ["ViDoRe_arxivqa/p4.png: missing page image", "ViDoRe_arxivqa/q3: query without a relevant page"]


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_synthetic_v2_is_deterministic_and_readable(tmp_path):
    a = write_synthetic_v2(tmp_path / "a", videos=8, documents=4)
    b = write_synthetic_v2(tmp_path / "b", videos=8, documents=4)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(write_synthetic_v2(tmp_path / "c", videos=8, documents=4, seed=1)) != _tree_digest(a)
    sets = {name: read_set(a, group, name, num_frames=8) for _, group, name in discover(a)}
    assert set(sets) == {"SynthMotion", "SynthClips", "SynthDocs"}
    assert sets["SynthMotion"].corpus_ids == ["moving down", "moving left", "moving right", "moving up"]
    assert all(len(q.images) == 8 for q in sets["SynthMotion"].queries)
    assert len(sets["SynthDocs"].corpus) == 8 and all(len(q) == 2 for q in sets["SynthDocs"].qrels)
    assert not any(s.problems for s in sets.values())
    # The shape really moves: the first and last sampled frames of a clip differ.
    first, last = (Image.open(p).tobytes() for p in sets["SynthClips"].corpus[0].images[::7])
    assert first != last


def test_converter_writes_frames_and_pages_into_shards(tmp_path):
    from sde_ray.data.batches import raw_batch_from_rows
    from sde_ray.data.convert import load_manifest
    from sde_ray.data.convert_v2 import convert_v2, pack_frames, unpack_frames
    from sde_ray.data.shards import check_shards, read_samples

    assert unpack_frames(pack_frames([b"ab", b"", b"cde"])) == [b"ab", b"", b"cde"]
    root = make_v2_fixture(tmp_path / "src")
    manifest = convert_v2(root, tmp_path / "shards", num_frames=4, samples_per_shard=3)
    assert load_manifest(tmp_path / "shards")["num_samples"] == manifest["num_samples"] == 2 + 3 + 2
    assert manifest["num_shards"] == 3 and manifest["rejected"] == 3  # v3, p4.png, q3
    assert {s: v["samples"] for s, v in manifest["subsets"].items()} == {"HMDB51": 2, "MSR-VTT": 3, "ViDoRe_arxivqa": 2}
    shards = [str(tmp_path / "shards" / s["name"]) for s in manifest["shards"]]
    assert check_shards(shards, manifest).num_samples == 7
    rows = {}
    for shard, entry in zip(shards, manifest["shards"]):
        columns = read_samples(shard, range(entry["num_samples"]))
        raw = raw_batch_from_rows(columns)
        for i, key in enumerate(raw["key"]):
            rows[key] = {name: values[i] for name, values in raw.items()}
    hmdb = rows["HMDB51-00000000"]
    frames_dir = root / "video-tasks/frames/video_cls/HMDB51/v1"
    assert hmdb["qry_frames"] == [(frames_dir / f"{i + 1:05d}.jpg").read_bytes() for i in frame_indices(20, 4)]
    assert hmdb["pos_text"] == "run" and hmdb["pos_frames"] == [] and hmdb["qry_image"] is None
    msr = rows["MSR-VTT-00000002"]  # "a kitten" -> video7
    assert msr["qry_frames"] == [] and len(msr["pos_frames"]) == 4 and msr["qry_text"].endswith("a kitten")
    assert msr["target_hash"] == rows["MSR-VTT-00000000"]["target_hash"]  # the same video, the same content id
    doc = rows["ViDoRe_arxivqa-00000000"]
    assert doc["pos_image"] == (root / "visdoc-tasks/ViDoRe_arxivqa/p1.png").read_bytes()  # grade 2 over grade 0
    assert doc.get("pos_frames", []) == [] and doc["qry_image"] is None
