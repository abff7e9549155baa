"""The MMEB catalog and on-disk layouts: the 36 datasets, their meta-tasks and IND/OOD split.

This module is pure format code (no Ray, no torch). The converter, the synthetic generator and the
evaluator all read the same facts from here:

- `MMEB_DATASETS`: eval name -> `DatasetInfo` for the 36 datasets of MMEB (VLM2Vec, ICLR'25).
- `META_TASKS`: the four meta-tasks in report order.
- `load_dataset_catalog(root)`: the catalog that describes the data under `root` (an MMEB-eval or
  MMEB-train root). A synthetic MMEB declares its own datasets in `<root>/mmeb_datasets.json`;
  real MMEB has no such file and gets the built-in table.
- `ImageSource`: reads image bytes by the relative paths the parquet files carry, from an unpacked
  folder or straight from zip archives, refusing absolute paths and `..`.

File-name conventions (MMEB as released on Hugging Face):
- train: `<root>/<Subset>/<split>-00000-of-00001.parquet`, images under `<root>/images/<Subset>/...`
  or in `<root>/images_zip/<Subset>.zip` (whose members start with `images/<Subset>/...` or
  `<Subset>/...`); parquet image paths look like `images/<Subset>/Train/x.jpg`.
- eval: `<root>/<Dataset>/test-00000-of-00001.parquet`, images in `<root>/images.zip` or unpacked
  under `<root>/eval_images/` (VLM2Vec: `unzip images.zip -d eval_images/`); parquet image paths
  are relative to that folder, e.g. `OK-VQA/image_0.jpg`.

`stable_id` maps a content hash or key to the int64 id batches carry; `MANIFEST` names a shard
folder's index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

CATALOG_FILE = "mmeb_datasets.json"
CATALOG_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"  # a converted shard folder's index (written by data.convert)


def stable_id(text: str) -> int:
    """A stable, non-negative 63-bit integer id of a string (a target's content hash, a sample key),
    the same in every process (unlike hash())."""
    digest = hashlib.sha1(str(text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1

META_TASKS: tuple[str, ...] = ("classification", "vqa", "retrieval", "grounding")
META_TASK_TITLES: dict[str, str] = {
    "classification": "Classification",
    "vqa": "VQA",
    "retrieval": "Retrieval",
    "grounding": "Visual Grounding",
}
SPLITS: tuple[str, ...] = ("IND", "OOD")
# A dataset found under an eval root but described by no catalog: scored, reported in a group of
# its own (its meta_task and split), counted in no meta-task, in neither IND nor OOD nor overall.
OUTSIDE_CATALOG = "outside_catalog"
META_TASK_TITLES[OUTSIDE_CATALOG] = "Outside the catalog"

IMAGE_TOKEN = "<|image_1|>"

TRAIN_COLUMNS: tuple[str, ...] = ("qry", "qry_image_path", "pos_text", "pos_image_path")
TRAIN_NEG_COLUMNS: tuple[str, ...] = ("neg_text", "neg_image_path")
EVAL_COLUMNS: tuple[str, ...] = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
TRAIN_SPLITS: tuple[str, ...] = ("original", "diverse_instruction", "train")


@dataclass(frozen=True)
class DatasetInfo:
    """One MMEB dataset. `train_subset` is the MMEB-train folder name (None for OOD datasets)."""

    name: str
    meta_task: str
    split: str
    modality: str
    train_subset: str | None = None
    num_candidates: int = 1000
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.meta_task == OUTSIDE_CATALOG and self.split == OUTSIDE_CATALOG:
            return
        if self.meta_task not in META_TASKS:
            raise ValueError(f"dataset {self.name!r}: meta_task {self.meta_task!r} is not one of {META_TASKS}")
        if self.split not in SPLITS:
            raise ValueError(f"dataset {self.name!r}: split {self.split!r} is not one of {SPLITS}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _d(name, meta_task, split, modality, train_subset=None, num_candidates=1000, instruction=""):
    return DatasetInfo(name, meta_task, split, modality, train_subset, num_candidates, instruction)


_TABLE: tuple[DatasetInfo, ...] = (
    _d("ImageNet-1K", "classification", "IND", "I->T", "ImageNet_1K", 1000, "Represent the given image for classification"),
    _d("N24News", "classification", "IND", "I+T->T", "N24News", 24,
       "Represent the given news image with the following caption for domain classification"),
    _d("HatefulMemes", "classification", "IND", "I->T", "HatefulMemes", 2,
       "Represent the given image for binary classification to determine whether it constitutes hateful speech or not"),
    _d("VOC2007", "classification", "IND", "I->T", "VOC2007", 20, "Identify the object shown in the image"),
    _d("SUN397", "classification", "IND", "I->T", "SUN397", 397, "Identify the scene shown in the image"),
    _d("Place365", "classification", "OOD", "I->T", None, 365),
    _d("ImageNet-A", "classification", "OOD", "I->T", None, 1000),
    _d("ImageNet-R", "classification", "OOD", "I->T", None, 200),
    _d("ObjectNet", "classification", "OOD", "I->T", None, 313),
    _d("Country211", "classification", "OOD", "I->T", None, 211),
    _d("OK-VQA", "vqa", "IND", "I+T->T", "OK-VQA", instruction="Represent the given image with the following question"),
    _d("A-OKVQA", "vqa", "IND", "I+T->T", "A-OKVQA", instruction="Represent the given image with the following question"),
    _d("DocVQA", "vqa", "IND", "I+T->T", "DocVQA", instruction="Represent the given image with the following question"),
    _d("InfographicsVQA", "vqa", "IND", "I+T->T", "InfographicsVQA",
       instruction="Represent the given image with the following question"),
    _d("ChartQA", "vqa", "IND", "I+T->T", "ChartQA", instruction="Represent the given image with the following question"),
    _d("Visual7W", "vqa", "IND", "I+T->T", "Visual7W", instruction="Represent the given image with the following question"),
    _d("ScienceQA", "vqa", "OOD", "I+T->T"),
    _d("VizWiz", "vqa", "OOD", "I+T->T"),
    _d("GQA", "vqa", "OOD", "I+T->T"),
    _d("TextVQA", "vqa", "OOD", "I+T->T"),
    _d("VisDial", "retrieval", "IND", "T->I", "VisDial",
       instruction="Represent the given dialogue about an image, which is used for image retrieval"),
    _d("CIRR", "retrieval", "IND", "I+T->I", "CIRR",
       instruction="Given an image, find a similar everyday image with the described changes"),
    _d("VisualNews_t2i", "retrieval", "IND", "T->I", "VisualNews_t2i", instruction="Retrieve an image of this news caption"),
    _d("VisualNews_i2t", "retrieval", "IND", "I->T", "VisualNews_i2t", instruction="Find a caption for the news in the given photo"),
    _d("MSCOCO_t2i", "retrieval", "IND", "T->I", "MSCOCO_t2i",
       instruction="Find me an everyday image that matches the given caption"),
    _d("MSCOCO_i2t", "retrieval", "IND", "I->T", "MSCOCO_i2t",
       instruction="Find an image caption describing the given everyday image"),
    _d("NIGHTS", "retrieval", "IND", "I->I", "NIGHTS",
       instruction="Find a day-to-day image that looks similar to the provided image"),
    _d("WebQA", "retrieval", "IND", "T->I+T", "WebQA", instruction="Find a Wikipedia image that answers this question"),
    _d("FashionIQ", "retrieval", "OOD", "I+T->I"),
    _d("Wiki-SS-NQ", "retrieval", "OOD", "T->I"),
    _d("OVEN", "retrieval", "OOD", "I+T->I+T"),
    _d("EDIS", "retrieval", "OOD", "T->I+T"),
    _d("MSCOCO", "grounding", "IND", "I+T->I", "MSCOCO",
       instruction="Select the portion of the image that isolates the object labeled as"),
    _d("RefCOCO", "grounding", "OOD", "I+T->I"),
    _d("RefCOCO-Matching", "grounding", "OOD", "I+T->I+T"),
    _d("Visual7W-Pointing", "grounding", "OOD", "I+T->I"),
)

MMEB_DATASETS: dict[str, DatasetInfo] = {info.name: info for info in _TABLE}


# ---------------------------------------------------------------------------------------------
# Catalog lookups


def write_catalog(root: str | os.PathLike, datasets: dict[str, DatasetInfo], *, source: str) -> Path:
    """Writes `<root>/mmeb_datasets.json` declaring the datasets found under `root`."""
    path = Path(root) / CATALOG_FILE
    payload = {
        "schema_version": CATALOG_SCHEMA_VERSION,
        "source": source,
        "datasets": [info.to_dict() for info in datasets.values()],
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load_dataset_catalog(root: str | os.PathLike | None = None) -> dict[str, DatasetInfo]:
    """The datasets that describe `root`: its own `mmeb_datasets.json`, else the built-in MMEB table.

    Insertion order is report order (meta-task, then the paper's order within it).
    """
    path = Path(root).expanduser() / CATALOG_FILE if root else None
    if path is None or not path.exists():
        return dict(MMEB_DATASETS)
    try:
        payload = json.loads(path.read_text())
        version = payload["schema_version"]
        entries = payload["datasets"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid dataset catalog ({exc})") from exc
    if version != CATALOG_SCHEMA_VERSION:
        raise ValueError(f"{path}: catalog schema_version {version}, this sde_ray reads {CATALOG_SCHEMA_VERSION}")
    catalog = {}
    for entry in entries:
        try:
            info = DatasetInfo(**entry)
        except TypeError as exc:
            raise ValueError(f"{path}: bad dataset entry {entry!r} ({exc})") from exc
        catalog[info.name] = info
    return catalog


def outside_catalog(name: str) -> DatasetInfo:
    """The `DatasetInfo` of a dataset that no catalog describes (see `OUTSIDE_CATALOG`)."""
    return DatasetInfo(name, OUTSIDE_CATALOG, OUTSIDE_CATALOG, "unknown", num_candidates=0)


def subset_index(catalog: dict[str, DatasetInfo]) -> dict[str, DatasetInfo]:
    """MMEB-train subset name -> its dataset (IND datasets only)."""
    return {info.train_subset: info for info in catalog.values() if info.train_subset}


def meta_task_of_subset(subset: str, catalog: dict[str, DatasetInfo] | None = None) -> str:
    """The meta-task of an MMEB-train subset; 'unknown' for subsets outside the catalog."""
    info = subset_index(catalog or MMEB_DATASETS).get(subset)
    return info.meta_task if info else "unknown"


def train_parquet_name(split: str, shard: int = 0, num_shards: int = 1) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"


def eval_parquet_name(shard: int = 0, num_shards: int = 1) -> str:
    return f"test-{shard:05d}-of-{num_shards:05d}.parquet"


def list_train_subsets(train_root: str | os.PathLike, split: str) -> list[str]:
    """Subset folders of an MMEB-train root that hold a parquet file of `split`, sorted."""
    root = Path(train_root)
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB-train root not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(f"{split}-*.parquet")))


def list_eval_datasets(eval_root: str | os.PathLike) -> list[str]:
    """Dataset folders of an MMEB-eval root that hold `test-*.parquet`, sorted."""
    root = Path(eval_root)
    if not root.is_dir():
        raise FileNotFoundError(f"MMEB-eval root not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("test-*.parquet")))


def format_prompt(instruction: str, text: str = "", with_image: bool = True) -> str:
    """MMEB's prompt string: `<|image_1|>\\n<instruction>[: <text>]\\n` (no token without an image)."""
    body = f"{instruction}: {text}" if text else instruction
    return f"{IMAGE_TOKEN}\n{body}\n" if with_image else f"{body}\n"


# ---------------------------------------------------------------------------------------------
# Image access by relative path


class ArchiveError(OSError):
    """An image zip that cannot be read (`reason`: corrupt_zip_member | unreadable_zip); names it."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnsafePathError(ValueError):
    """A path from the data that would reach outside its root; `reason` is a short code.

    Reasons: `absolute_path` (absolute or drive-lettered), `parent_path` (contains `..`),
    `zip_member_escapes` (a zip member whose own name would unpack outside its output folder).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _is_absolute(text: str) -> bool:
    return text.startswith("/") or (len(text) > 1 and text[1] == ":")


def safe_relpath(path: str) -> str:
    """Normalised relative POSIX path, or UnsafePathError for absolute paths, drive letters and `..`."""
    text = path.replace("\\", "/")
    if _is_absolute(text):
        raise UnsafePathError("absolute_path", f"absolute image path {path!r}")
    if ".." in text.split("/"):
        raise UnsafePathError("parent_path", f"image path climbs out of the source with '..': {path!r}")
    normal = posixpath.normpath(text)
    if normal in ("", "."):
        raise UnsafePathError("parent_path", f"image path {path!r} names no file")
    return normal


class ImageSource:
    """Reads image bytes by the relative paths in MMEB parquet files.

    Looks in each folder in `folders` (path joined under it) and then in each zip in `zips`
    (member name equal to the path, or the path with one of `zip_strip_prefixes` removed). Zips are
    opened lazily and read member by member, never unpacked. `read` raises FileNotFoundError when
    no source has the file, UnsafePathError for absolute or `..` paths, and UnsafePathError for a
    zip member whose own name would land outside a folder it were unpacked into.
    """

    def __init__(self, folders: list[str | os.PathLike] = (), zips: list[str | os.PathLike] = (),
                 zip_strip_prefixes: tuple[str, ...] = ()) -> None:
        self.folders = [Path(f) for f in folders if Path(f).is_dir()]
        self.zip_paths = [Path(z) for z in zips if Path(z).is_file()]
        self.zip_strip_prefixes = zip_strip_prefixes
        self._zips: list[tuple[zipfile.ZipFile, dict[str, zipfile.ZipInfo]]] | None = None
        self.broken: dict[str, str] = {}  # zip path -> why it cannot be opened

    def __getstate__(self):  # zip handles do not pickle; each process reopens them
        state = dict(self.__dict__)
        state["_zips"] = None
        return state

    def _open_zips(self):
        if self._zips is None:
            self._zips = []
            self.broken: dict[str, str] = {}
            for path in self.zip_paths:
                try:
                    archive = zipfile.ZipFile(path)
                except (zipfile.BadZipFile, OSError) as exc:
                    # A truncated or unreadable zip: the rows that need it are rejected naming it,
                    # the rest of the source is still read.
                    self.broken[str(path)] = f"{type(exc).__name__}: {exc}"
                    continue
                members = {}
                for info in archive.infolist():
                    # Index by where the member would land so that an escaping member that
                    # shadows a benign path is found, and then refused, rather than missed.
                    key = posixpath.normpath(info.filename.replace("\\", "/").lstrip("/"))
                    if not info.is_dir() and not key.startswith("../"):
                        members.setdefault(key, info)
                self._zips.append((archive, members))
        return self._zips

    def _candidates(self, rel: str) -> list[str]:
        names = [rel]
        for prefix in self.zip_strip_prefixes:
            if rel.startswith(prefix):
                names.append(rel[len(prefix):])
            else:
                names.append(prefix + rel)
        return names

    def read(self, path: str) -> bytes:
        rel = safe_relpath(path)
        for folder in self.folders:
            candidate = folder / rel
            if candidate.is_file():
                # A symlink inside the folder could still point outside; refuse it. The top folder
                # of the path (`images/`) may itself be a symlink to another disk: followed, and
                # the path must stay inside where it points.
                top = folder / rel.split("/")[0] if "/" in rel else folder
                if not candidate.resolve().is_relative_to(top.resolve()):
                    raise UnsafePathError("parent_path", f"image path {path!r} resolves outside {folder}")
                return candidate.read_bytes()
        for archive, members in self._open_zips():
            for name in self._candidates(rel):
                info = members.get(name)
                if info is not None:
                    check_zip_member_name(info.filename)
                    try:
                        return archive.read(info)
                    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
                        raise ArchiveError("corrupt_zip_member", f"{archive.filename}: member {info.filename!r}: "
                                           f"{type(exc).__name__}: {exc}") from None
        if self.broken:
            zips = "; ".join(f"{path}: {why}" for path, why in self.broken.items())
            raise ArchiveError("unreadable_zip", f"image {path!r} not found; unreadable zip(s): {zips}")
        raise FileNotFoundError(f"image {path!r} not found in {[str(f) for f in self.folders + self.zip_paths]}")

    def close(self) -> None:
        for archive, _ in self._zips or []:
            archive.close()
        self._zips = None


def check_zip_member_name(name: str) -> None:
    """Zip-slip guard: a member named absolutely or with `..` would land outside its output folder."""
    text = name.replace("\\", "/")
    if _is_absolute(text) or ".." in text.split("/"):
        raise UnsafePathError("zip_member_escapes", f"zip member {name!r} would be written outside the output folder")


def train_image_source(train_root: str | os.PathLike, subset: str) -> ImageSource:
    """Images of one MMEB-train subset: the unpacked root (paths start with `images/`) and its zip."""
    root = Path(train_root)
    return ImageSource(folders=[root], zips=[root / "images_zip" / f"{subset}.zip"], zip_strip_prefixes=("images/",))


def eval_image_source(eval_root: str | os.PathLike) -> ImageSource:
    """Images of MMEB-eval: `eval_images/` (unpacked `images.zip`), the root itself, then `images.zip`."""
    root = Path(eval_root)
    return ImageSource(folders=[root / "eval_images", root], zips=[root / "images.zip"],
                       zip_strip_prefixes=("eval_images/", "images/"))
