"""The synthetic MMEB: procedurally drawn scenes in exactly the MMEB-train and MMEB-eval layouts.

Scenes hold one to four objects, each a (colour, shape, size, position) with a solid or striped
fill, on a tinted background with pixel noise. Captions are compositional ("a small red circle in
the top left"). Every MMEB meta-task is covered by several datasets (see `DATASETS`), in MMEB's
query->target modalities: classification (I->T, labels repeat, so duplicate targets exist), VQA
(I+T->T), retrieval (T->I, I->T, I->I, I+T->I) and grounding (I+T->I crops).

Out of distribution: four (colour, shape) pairs never appear in training or IND eval data; the OOD
datasets are built from scenes whose target object has one of those pairs.

Noisy correspondence: `noisy_correspondence` = r swaps the positive of round(r·n) training rows
per subset for the positive of another row with a different target. The affected rows are listed
in `<train_root>/synthetic_noise.json` (the parquet files keep MMEB's schema exactly).

Validation: `<out>/MMEB-val` holds the eval datasets again, drawn from their own random stream (new
scenes, so new query images and candidate sets), for validation during training and for sweeps to
tune on without touching a query the final evaluation scores.

Layout written (as the Hugging Face release):
  <out>/MMEB-train/<Subset>/original-00000-of-00001.parquet   all-string columns
  <out>/MMEB-train/images/<Subset>/Train/<file>.jpg           (the unpacked images_zip/ form)
  <out>/MMEB-eval/<Dataset>/test-00000-of-00001.parquet       qry_text, qry_img_path, tgt_text, tgt_img_path
  <out>/MMEB-eval/images.zip                                  members <Dataset>/<file>.jpg
  <out>/MMEB-val/...                                          as MMEB-eval (its own draw)
  mmeb_datasets.json in every root (the catalog), synthetic.json at <out> (the settings).
Everything is a pure function of the settings: the same seed writes byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from sde_ray.data.mmeb import (
    DatasetInfo,
    eval_parquet_name,
    format_prompt,
    train_parquet_name,
    write_catalog,
)

SYNTH_VERSION = 2  # 2: MMEB-val

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
}
COUNT_WORDS = ("one", "two", "three", "four")
COLOUR_NAMES = tuple(COLOURS)
POSITION_NAMES = tuple(POSITIONS)
# (colour, shape) pairs held out of training and IND data: every colour and shape still appears
# in training with other partners, so the OOD split tests composition, not new words.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    (c, s) for ci, c in enumerate(COLOUR_NAMES) for si, s in enumerate(SHAPES) if (ci + si) % 4 == 3
)
SEEN_PAIRS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)
NOVEL_PAIRS = tuple(sorted(HELD_OUT))
ALL_PAIRS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES)

IMAGE_TARGET_TEXT = format_prompt("Represent the given image.")
CROP_TARGET_TEXT = format_prompt("Represent the given cropped image of the object")


# ---------------------------------------------------------------------------------------------
# Scenes and rendering


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str
    striped: bool = False

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]
    noise: float
    jitter: tuple[tuple[int, int], ...]
    seed: int

    def caption(self) -> str:
        o = self.objects[0]
        return f"a {o.size} {o.colour} {o.shape} in the {o.position}"


def _object_box(obj: Obj, jitter: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    cx, cy = POSITIONS[obj.position]
    radius = (0.15 if obj.size == "small" else 0.24) * size
    x, y = cx * size + jitter[0] * size / 32, cy * size + jitter[1] * size / 32
    return x - radius, y - radius, x + radius, y + radius


def render(scene: Scene, size: int) -> Image.Image:
    rng = np.random.default_rng(scene.seed)
    pixels = np.empty((size, size, 3), dtype=np.float32)
    pixels[:] = scene.background
    pixels += rng.normal(0.0, scene.noise, size=pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    for obj, jitter in zip(scene.objects, scene.jitter):
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        x0, y0, x1, y1 = _object_box(obj, jitter, size)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=255)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=255)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
        else:
            bar = (x1 - x0) / 6
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            draw.rectangle((cx - bar, y0, cx + bar, y1), fill=255)
            draw.rectangle((x0, cy - bar, x1, cy + bar), fill=255)
        colour = np.array(COLOURS[obj.colour], dtype=np.float32)
        fill = np.broadcast_to(colour, (size, size, 3)).copy()
        if obj.striped:
            fill[::3] *= 0.55
        fill_image = Image.fromarray(fill.astype(np.uint8))
        image.paste(fill_image, (0, 0), mask)
    return image


def crop(scene: Scene, index: int, size: int) -> Image.Image:
    """The object's bounding box cut from the rendered scene, resized back to `size` (a grounding target)."""
    x0, y0, x1, y1 = _object_box(scene.objects[index], scene.jitter[index], size)
    box = tuple(round(v) for v in (max(0, x0 - 1), max(0, y0 - 1), min(size, x1 + 1), min(size, y1 + 1)))
    return render(scene, size).crop(box).resize((size, size), Image.NEAREST)


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # 4:4:4 chroma: at 32x32 the default 4:2:0 subsampling would smear the colours into each other.
    image.save(buffer, format="JPEG", quality=95, subsampling=0)
    return buffer.getvalue()


class SceneSampler:
    """Draws scenes from one numpy Generator; `pairs` restricts the (colour, shape) of object 0."""

    def __init__(self, rng: np.random.Generator, pairs: tuple[tuple[str, str], ...]) -> None:
        self.rng = rng
        self.pairs = pairs

    def obj(self, position: str, size: str | None = None, pair: tuple[str, str] | None = None,
            pairs: tuple[tuple[str, str], ...] | None = None) -> Obj:
        pool = pairs or self.pairs
        colour, shape = pair or pool[self.rng.integers(len(pool))]
        size = size or SIZES[self.rng.integers(len(SIZES))]
        return Obj(colour, shape, size, position, striped=bool(self.rng.random() < 0.3))

    def scene(self, objects: list[Obj]) -> Scene:
        background = tuple(int(v) for v in self.rng.integers(90, 170, size=3))
        noise = float(self.rng.uniform(4.0, 18.0))
        jitter = tuple((int(self.rng.integers(-2, 3)), int(self.rng.integers(-2, 3))) for _ in objects)
        return Scene(tuple(objects), background, noise, jitter, int(self.rng.integers(2**31)))

    def single(self, **kwargs) -> Scene:
        position = POSITION_NAMES[self.rng.integers(len(POSITION_NAMES))]
        return self.scene([self.obj(position, **kwargs)])

    def multi(self, count: int, first_pair: tuple[str, str] | None = None, distinct_shapes: bool = False,
              size: str = "small") -> Scene:
        """`count` small objects in distinct quadrants; object 0 uses `pairs`, the others SEEN_PAIRS."""
        positions = [POSITION_NAMES[i] for i in self.rng.permutation(len(POSITION_NAMES))[:count]]
        objects = [self.obj(positions[0], size=size, pair=first_pair)]
        while len(objects) < count:
            candidate = self.obj(positions[len(objects)], size=size, pairs=SEEN_PAIRS)
            clash = candidate.shape in {o.shape for o in objects} if distinct_shapes else \
                candidate.label in {o.label for o in objects}
            if not clash:
                objects.append(candidate)
        return self.scene(objects)


# ---------------------------------------------------------------------------------------------
# Datasets: one builder per dataset returns Items; the writer turns them into rows and files.


@dataclass
class Side:
    """One side of a pair: text plus an optional image (a scene, or a crop of one of its objects)."""

    text: str
    scene: Scene | None = None
    crop_index: int | None = None


@dataclass
class Item:
    query: Side
    positive: Side
    distractors: list[Side] = field(default_factory=list)
    negative: Side | None = None




def _label_candidates(sampler: SceneSampler, positive: str, pool: tuple[str, ...], k: int) -> list[Side]:
    others = [label for label in pool if label != positive]
    chosen = sampler.rng.permutation(len(others))[: max(0, k - 1)]
    return [Side(others[i]) for i in sorted(chosen)]


def _scene_distractors(sampler: SceneSampler, positive: Scene, k: int, text: str,
                       make: Callable[[], Scene], key: Callable[[Scene], str]) -> list[Side]:
    seen, out = {key(positive)}, []
    for _ in range(200 * k):
        if len(out) >= k - 1:
            break
        candidate = make()
        if key(candidate) not in seen:
            seen.add(key(candidate))
            out.append(Side(text, candidate))
    return out


def _cls_object(pool: tuple[str, ...]) -> Callable[[SceneSampler, int], Item]:
    def build(s: SceneSampler, k: int) -> Item:
        scene = s.single()
        label = scene.objects[0].label
        query = Side(format_prompt("Represent the given image for classification"), scene)
        return Item(query, Side(label), _label_candidates(s, label, pool, k),
                    negative=_label_candidates(s, label, pool, 2)[0])
    return build


def build_cls_colour(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    label = scene.objects[0].colour
    query = Side(format_prompt("Identify the colour of the object shown in the image"), scene)
    return Item(query, Side(label), _label_candidates(s, label, COLOUR_NAMES, k))


def build_cls_position(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    label = scene.objects[0].position
    query = Side(format_prompt("Identify where the object is in the image"), scene)
    return Item(query, Side(label), _label_candidates(s, label, POSITION_NAMES, k))


def _vqa_where(s: SceneSampler, k: int, pool: tuple[str, ...]) -> Item:
    scene = s.multi(int(s.rng.integers(2, 4)), first_pair=s.pairs[s.rng.integers(len(s.pairs))])
    target = scene.objects[0]
    question = f"What is in the {target.position}?"
    query = Side(format_prompt("Represent the given image with the following question", question), scene)
    distractors = _label_candidates(s, target.label, pool, k)
    return Item(query, Side(target.label), distractors, negative=distractors[0] if distractors else None)


def build_vqa_colour(s: SceneSampler, k: int) -> Item:
    scene = s.multi(int(s.rng.integers(2, 4)), distinct_shapes=True)
    target = scene.objects[0]
    question = f"What colour is the {target.shape}?"
    query = Side(format_prompt("Represent the given image with the following question", question), scene)
    return Item(query, Side(target.colour), _label_candidates(s, target.colour, COLOUR_NAMES, k))


def build_vqa_count(s: SceneSampler, k: int) -> Item:
    count = int(s.rng.integers(1, 5))
    shape = SHAPES[s.rng.integers(len(SHAPES))]
    positions = [POSITION_NAMES[i] for i in s.rng.permutation(len(POSITION_NAMES))[:count]]
    colours = [c for c, sh in SEEN_PAIRS if sh == shape]
    objects = [s.obj(p, size="small", pair=(colours[s.rng.integers(len(colours))], shape)) for p in positions]
    question = f"How many {shape}s are there?"
    query = Side(format_prompt("Represent the given image with the following question", question), s.scene(objects))
    answer = COUNT_WORDS[count - 1]
    return Item(query, Side(answer), _label_candidates(s, answer, COUNT_WORDS, k))


def _ret_t2i(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    query = Side(format_prompt("Find me an everyday image that matches the given caption", scene.caption(),
                               with_image=False))
    distractors = _scene_distractors(s, scene, k, IMAGE_TARGET_TEXT, s.single, Scene.caption)
    return Item(query, Side(IMAGE_TARGET_TEXT, scene), distractors)


def build_ret_i2t(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    query = Side(format_prompt("Find an image caption describing the given everyday image"), scene)
    distractors = [Side(d.scene.caption()) for d in
                   _scene_distractors(s, scene, k, "", s.single, Scene.caption)]
    return Item(query, Side(scene.caption()), distractors)


def build_ret_i2i(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    # The same objects re-drawn: new background, noise, jitter and texture, as NIGHTS' distortions.
    again = s.scene([replace(o, striped=not o.striped) for o in scene.objects])
    query = Side(format_prompt("Find a day-to-day image that looks similar to the provided image"), scene)
    distractors = _scene_distractors(s, again, k, IMAGE_TARGET_TEXT, s.single, Scene.caption)
    return Item(query, Side(IMAGE_TARGET_TEXT, again), distractors)


def build_ret_edit(s: SceneSampler, k: int) -> Item:
    scene = s.single()
    obj = scene.objects[0]
    colours = [c for c in COLOUR_NAMES if c != obj.colour and (c, obj.shape) in SEEN_PAIRS]
    new_colour = colours[s.rng.integers(len(colours))]
    edited = s.scene([replace(obj, colour=new_colour)])
    change = f"make the {obj.shape} {new_colour}"
    query = Side(format_prompt("Given an image, find a similar everyday image with the described changes", change), scene)
    distractors = _scene_distractors(s, edited, k, IMAGE_TARGET_TEXT, s.single, Scene.caption)
    return Item(query, Side(IMAGE_TARGET_TEXT, edited), distractors)


def _ground(s: SceneSampler, k: int) -> Item:
    scene = s.multi(int(s.rng.integers(2, 5)), first_pair=s.pairs[s.rng.integers(len(s.pairs))], size="large")
    label = scene.objects[0].label
    instruction = "Select the portion of the image that isolates the object labeled as"
    query = Side(f"<|image_1|>\n{instruction} \"{label}\"\n", scene)
    distractors = [Side(CROP_TARGET_TEXT, scene, i) for i in range(1, len(scene.objects))]

    def other_scene() -> Scene:
        return s.multi(2, size="large")

    while len(distractors) < k - 1:
        other = other_scene()
        if other.objects[0].label != label:
            distractors.append(Side(CROP_TARGET_TEXT, other, 0))
    return Item(query, Side(CROP_TARGET_TEXT, scene, 0), distractors[: k - 1])


@dataclass(frozen=True)
class SynthDataset:
    info: DatasetInfo
    build: Callable[[SceneSampler, int], Item]
    pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS
    max_candidates: int | None = None  # classification with fewer classes: all classes are candidates


def _info(name, meta_task, split, modality, instruction):
    return DatasetInfo(name=name, meta_task=meta_task, split=split, modality=modality,
                       train_subset=name if split == "IND" else None, instruction=instruction)


_SEEN_LABELS = tuple(f"{c} {s}" for c, s in SEEN_PAIRS)
_ALL_LABELS = tuple(f"{c} {s}" for c, s in ALL_PAIRS)

DATASETS: tuple[SynthDataset, ...] = (
    SynthDataset(_info("SynObject", "classification", "IND", "I->T", "Represent the given image for classification"),
                 _cls_object(_SEEN_LABELS)),
    SynthDataset(_info("SynColour", "classification", "IND", "I->T", "Identify the colour of the object shown in the image"),
                 build_cls_colour, max_candidates=len(COLOUR_NAMES)),
    SynthDataset(_info("SynPosition", "classification", "IND", "I->T", "Identify where the object is in the image"),
                 build_cls_position, max_candidates=len(POSITION_NAMES)),
    SynthDataset(_info("SynObject-Novel", "classification", "OOD", "I->T", "Represent the given image for classification"),
                 _cls_object(_ALL_LABELS), pairs=NOVEL_PAIRS),
    SynthDataset(_info("SynVQA-Where", "vqa", "IND", "I+T->T", "Represent the given image with the following question"),
                 lambda s, k: _vqa_where(s, k, _SEEN_LABELS)),
    SynthDataset(_info("SynVQA-Colour", "vqa", "IND", "I+T->T", "Represent the given image with the following question"),
                 build_vqa_colour, max_candidates=len(COLOUR_NAMES)),
    SynthDataset(_info("SynVQA-Count", "vqa", "IND", "I+T->T", "Represent the given image with the following question"),
                 build_vqa_count, max_candidates=len(COUNT_WORDS)),
    SynthDataset(_info("SynVQA-Where-Novel", "vqa", "OOD", "I+T->T", "Represent the given image with the following question"),
                 lambda s, k: _vqa_where(s, k, _ALL_LABELS), pairs=NOVEL_PAIRS),
    SynthDataset(_info("SynCaption_t2i", "retrieval", "IND", "T->I", "Find me an everyday image that matches the given caption"),
                 _ret_t2i),
    SynthDataset(_info("SynCaption_i2t", "retrieval", "IND", "I->T", "Find an image caption describing the given everyday image"),
                 build_ret_i2t),
    SynthDataset(_info("SynSimilar", "retrieval", "IND", "I->I", "Find a day-to-day image that looks similar to the provided image"),
                 build_ret_i2i),
    SynthDataset(_info("SynEdit", "retrieval", "IND", "I+T->I", "Given an image, find a similar everyday image with the described changes"),
                 build_ret_edit),
    SynthDataset(_info("SynCaption-Novel_t2i", "retrieval", "OOD", "T->I", "Find me an everyday image that matches the given caption"),
                 _ret_t2i, pairs=NOVEL_PAIRS),
    SynthDataset(_info("SynGround", "grounding", "IND", "I+T->I", "Select the portion of the image that isolates the object labeled as"),
                 _ground),
    SynthDataset(_info("SynGround-Novel", "grounding", "OOD", "I+T->I", "Select the portion of the image that isolates the object labeled as"),
                 _ground, pairs=NOVEL_PAIRS),
)


# ---------------------------------------------------------------------------------------------
# Writing


# (width, height) of the mixed-size images, as multiples of image_size / 2, cycled through by image
# index: square, wide, tall, larger square, odd (what a VLM's dynamic resolution must keep apart).
MIXED_SHAPES = ((2, 2), (4, 1), (1, 3), (3, 3), (3, 2))


class _ImageStore:
    """Assigns a relative path to each distinct rendered image and remembers its bytes."""

    def __init__(self, prefix: str, image_size: int, mixed_sizes: bool = False) -> None:
        self.prefix = prefix
        self.image_size = image_size
        self.mixed_sizes = mixed_sizes
        self.files: dict[str, bytes] = {}
        self._paths: dict[tuple, str] = {}

    def path(self, side: Side) -> str:
        if side.scene is None:
            return ""
        key = (side.scene, side.crop_index)
        if key not in self._paths:
            index = len(self._paths)
            suffix = "" if side.crop_index is None else f"_crop{side.crop_index}"
            path = f"{self.prefix}/image_{index:06d}{suffix}.jpg"
            image = render(side.scene, self.image_size) if side.crop_index is None else \
                crop(side.scene, side.crop_index, self.image_size)
            if self.mixed_sizes:
                width, height = MIXED_SHAPES[index % len(MIXED_SHAPES)]
                image = image.resize((width * self.image_size // 2, height * self.image_size // 2), Image.BICUBIC)
            self.files[path] = encode_jpeg(image)
            self._paths[key] = path
        return self._paths[key]


def _hf_features(columns: dict[str, str]) -> bytes:
    """The `huggingface` schema metadata that HF `datasets` writes into its parquet files."""
    value = {"dtype": "string", "_type": "Value"}
    features = {name: value if kind == "string" else {"feature": value, "_type": "Sequence"}
                for name, kind in columns.items()}
    return json.dumps({"info": {"features": features}}).encode()


def _write_parquet(path: Path, columns: dict[str, list], kinds: dict[str, str]) -> None:
    types = {"string": pa.string(), "list": pa.list_(pa.string())}
    schema = pa.schema([(name, types[kinds[name]]) for name in columns],
                       metadata={b"huggingface": _hf_features(kinds)})
    table = pa.table(columns, schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")


def _rng(seed: int, dataset_index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, dataset_index, stream])


_TRAIN, _EVAL, _NOISE, _VAL = 1, 2, 3, 4


def _write_train(root: Path, seed: int, per_subset: int, noisy: float, k: int, image_size: int,
                 mixed_sizes: bool = False) -> tuple[dict, dict]:
    counts, noise_rows = {}, {}
    for index, spec in enumerate(DATASETS):
        if spec.info.split != "IND":
            continue
        subset = spec.info.train_subset
        sampler = SceneSampler(_rng(seed, index, _TRAIN), spec.pairs)
        store = _ImageStore(f"images/{subset}/Train", image_size, mixed_sizes)
        items = [spec.build(sampler, k) for _ in range(per_subset)]
        rows = {"qry": [], "qry_image_path": [], "pos_text": [], "pos_image_path": []}
        with_negatives = any(item.negative is not None for item in items)
        if with_negatives:
            rows.update(neg_text=[], neg_image_path=[])
        for item in items:
            rows["qry"].append(item.query.text)
            rows["qry_image_path"].append(store.path(item.query))
            rows["pos_text"].append(item.positive.text)
            rows["pos_image_path"].append(store.path(item.positive))
            if with_negatives:
                rows["neg_text"].append(item.negative.text if item.negative else "")
                rows["neg_image_path"].append(store.path(item.negative) if item.negative else "")
        noise_rows[subset] = _swap_positives(rows, noisy, _rng(seed, index, _NOISE))
        _write_parquet(root / subset / train_parquet_name("original"), rows, {c: "string" for c in rows})
        for rel, data in store.files.items():
            target = root / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        counts[subset] = per_subset
    return counts, noise_rows


def _swap_positives(rows: dict[str, list], rate: float, rng: np.random.Generator) -> list[int]:
    """Mismatches round(rate·n) rows: each takes the positive of a row with a different target."""
    n = len(rows["qry"])
    chosen = sorted(int(i) for i in rng.permutation(n)[: round(rate * n)])
    original = list(zip(rows["pos_text"], rows["pos_image_path"]))
    swapped = []
    if len(set(original)) < 2:
        return []
    for row in chosen:
        donor = int(rng.integers(n))
        while original[donor] == original[row]:
            donor = int(rng.integers(n))
        rows["pos_text"][row], rows["pos_image_path"][row] = original[donor]
        swapped.append(row)
    return swapped


def _write_eval(root: Path, seed: int, per_dataset: int, k: int, image_size: int, stream: int = _EVAL,
                mixed_sizes: bool = False) -> dict:
    counts = {}
    zip_entries: dict[str, bytes] = {}
    for index, spec in enumerate(DATASETS):
        name = spec.info.name
        candidates = min(k, spec.max_candidates or k)
        sampler = SceneSampler(_rng(seed, index, stream), spec.pairs)
        store = _ImageStore(name, image_size, mixed_sizes)
        rows = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
        for _ in range(per_dataset):
            item = spec.build(sampler, candidates)
            targets = [item.positive] + item.distractors
            rows["qry_text"].append(item.query.text)
            rows["qry_img_path"].append(store.path(item.query))
            rows["tgt_text"].append([t.text for t in targets])
            rows["tgt_img_path"].append([store.path(t) for t in targets])
        kinds = {"qry_text": "string", "qry_img_path": "string", "tgt_text": "list", "tgt_img_path": "list"}
        _write_parquet(root / name / eval_parquet_name(), rows, kinds)
        zip_entries.update(store.files)
        counts[name] = per_dataset
    with zipfile.ZipFile(root / "images.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for rel in sorted(zip_entries):
            info = zipfile.ZipInfo(rel, date_time=(2024, 10, 9, 0, 0, 0))  # fixed: byte-identical zips
            archive.writestr(info, zip_entries[rel])
    return counts


def synthetic_catalog(num_candidates: int = 8) -> dict[str, DatasetInfo]:
    return {spec.info.name: replace(spec.info, num_candidates=min(num_candidates, spec.max_candidates or num_candidates))
            for spec in DATASETS}


def write_synthetic_mmeb(out: str | os.PathLike, seed: int = 0, train_per_subset: int = 384,
                         eval_per_dataset: int = 100, noisy_correspondence: float = 0.0,
                         num_candidates: int = 8, image_size: int = 32, mixed_sizes: bool = False) -> dict:
    """Writes `<out>/MMEB-train`, `<out>/MMEB-eval` and `<out>/MMEB-val` (`eval_per_dataset` rows
    per dataset each); returns the settings and row counts. `mixed_sizes`: each image resized to one
    of `MIXED_SHAPES` (sizes and aspect ratios around `image_size`) instead of a square."""
    if not 0.0 <= noisy_correspondence <= 1.0:
        raise ValueError(f"noisy_correspondence must be in [0, 1], got {noisy_correspondence}")
    if num_candidates < 2:
        raise ValueError(f"num_candidates must be >= 2, got {num_candidates}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    if train_per_subset < 1 or eval_per_dataset < 1:
        raise ValueError("train_per_subset and eval_per_dataset must be >= 1")
    out = Path(out).expanduser().resolve()
    train_root, eval_root, val_root = out / "MMEB-train", out / "MMEB-eval", out / "MMEB-val"
    for root in (train_root, eval_root, val_root):
        root.mkdir(parents=True, exist_ok=True)
    settings = {"version": SYNTH_VERSION, "seed": seed, "train_per_subset": train_per_subset,
                "eval_per_dataset": eval_per_dataset, "noisy_correspondence": noisy_correspondence,
                "num_candidates": num_candidates, "image_size": image_size, "mixed_sizes": mixed_sizes}
    train_counts, noise_rows = _write_train(train_root, seed, train_per_subset, noisy_correspondence,
                                            num_candidates, image_size, mixed_sizes)
    eval_counts = _write_eval(eval_root, seed, eval_per_dataset, num_candidates, image_size, mixed_sizes=mixed_sizes)
    val_counts = _write_eval(val_root, seed, eval_per_dataset, num_candidates, image_size, stream=_VAL,
                             mixed_sizes=mixed_sizes)
    catalog = synthetic_catalog(num_candidates)
    for root in (train_root, eval_root, val_root):
        write_catalog(root, catalog, source="synthetic")
    (train_root / "synthetic_noise.json").write_text(json.dumps(
        {"noisy_correspondence": noisy_correspondence, "rows": noise_rows}, indent=1) + "\n")
    summary = {**settings, "train_dir": str(train_root), "eval_dir": str(eval_root), "val_dir": str(val_root),
               "train_rows": train_counts, "eval_rows": eval_counts, "val_rows": val_counts,
               "noisy_rows": {k: len(v) for k, v in noise_rows.items()},
               "held_out_pairs": [list(p) for p in NOVEL_PAIRS]}
    (out / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
