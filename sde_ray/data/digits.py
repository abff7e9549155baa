"""A small real-image check in MMEB layout: scikit-learn's UCI handwritten digits (installs offline).

`load_digits` holds 1,797 grey 8×8 images of the digits 0-9 (values 0..16, ink bright on a dark
background). `write_digits_mmeb` splits them, stratified by class, into 1,347 training and 450 test
images (the split size issue 17 quotes for its held-aside set) and writes, exactly as the synthetic
MMEB does (sde_ray/data/synthetic.py), MMEB-train and MMEB-eval roots that `data.source=mmeb`,
`data.mmeb_train_dir` and `eval.data_dir` read:

  <out>/MMEB-train/Digits_i2t/original-00000-of-00001.parquet  image -> label text (1,347 rows)
  <out>/MMEB-train/Digits_t2i/original-00000-of-00001.parquet  label text -> image (1,347 rows)
  <out>/MMEB-train/images/Digits/Train/<file>.png              the training images (both subsets)
  <out>/MMEB-eval/Digits_i2t/test-00000-of-00001.parquet       450 queries, the 10 label texts as candidates
  <out>/MMEB-eval/Digits_t2i/test-00000-of-00001.parquet       450 queries, 10 candidate images
  <out>/MMEB-eval/images.zip                                   members Digits/<file>.png
  mmeb_datasets.json in both roots, digits.json at <out> (settings and counts).

Label texts read "a photo of the digit three". An I->T query is MMEB's classification prompt with
the image; its candidates are the 10 label texts, the positive first and the other nine in a seeded
order. A T->I query is the label text in MMEB's caption-retrieval prompt; its candidates are the test
image itself and one test image of each other digit, so exactly one candidate shows the queried
digit. Images are scaled to 0..255, upscaled to `image_size` (nearest neighbour by default: the
8×8 pixels stay exact) and stored as RGB PNG (lossless). Everything is a pure function of the
settings: the same arguments write byte-identical files.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from sde_ray.data.mmeb import DatasetInfo, eval_parquet_name, format_prompt, train_parquet_name, write_catalog
from sde_ray.data.synthetic import IMAGE_TARGET_TEXT, _write_parquet

DIGITS_VERSION = 1
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEST_SIZE = 450
I2T, T2I = "Digits_i2t", "Digits_t2i"
I2T_INSTRUCTION = "Represent the given image for classification"
T2I_INSTRUCTION = "Find me an everyday image that matches the given caption"
RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def label_text(digit: int) -> str:
    return f"a photo of the digit {DIGIT_WORDS[digit]}"


def digits_catalog() -> dict[str, DatasetInfo]:
    return {
        I2T: DatasetInfo(I2T, "classification", "IND", "I->T", I2T, 10, I2T_INSTRUCTION),
        T2I: DatasetInfo(T2I, "retrieval", "IND", "T->I", T2I, 10, T2I_INSTRUCTION),
    }


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [1797, 8, 8] in 0..255, labels int64 [1797]) from scikit-learn's bundled copy."""
    from sklearn.datasets import load_digits  # imported here: only this command needs scikit-learn
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), each sorted; the test set takes round(test_size·share) per class
    (largest remainders settle the rounding), drawn with a seeded permutation."""
    rng = np.random.default_rng([seed, 17])
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_size / len(labels)
    take = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - take), kind="stable")[: test_size - take.sum()]:
        take[i] += 1
    test = []
    for cls, k in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        test.extend(members[rng.permutation(len(members))[:k]].tolist())
    test = np.array(sorted(test), dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def encode_png(pixels: np.ndarray, image_size: int, resample: str) -> bytes:
    image = Image.fromarray(pixels, mode="L").resize((image_size, image_size), RESAMPLE[resample]).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_digits_mmeb(out: str | os.PathLike, seed: int = 0, image_size: int = 32,
                      resample: str = "nearest", test_size: int = TEST_SIZE) -> dict:
    """Writes `<out>/MMEB-train` and `<out>/MMEB-eval` from the UCI digits; returns the summary."""
    if resample not in RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(RESAMPLE)}, got {resample!r}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
    images, labels = load_digits_arrays()
    if not 10 <= test_size < len(labels) - 10:
        raise ValueError(f"test_size must leave both splits non-empty, got {test_size}")
    train, test = stratified_split(labels, test_size, seed)
    out = Path(out).expanduser().resolve()
    train_root, eval_root = out / "MMEB-train", out / "MMEB-eval"

    # Training: one image file per training digit, shared by both directions.
    paths = []
    for index in train:
        rel = f"images/Digits/Train/digit_{int(index):04d}.png"
        target = train_root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(images[index], image_size, resample))
        paths.append(rel)
    i2t_query = format_prompt(I2T_INSTRUCTION)
    texts = [label_text(int(labels[i])) for i in train]
    kinds = {c: "string" for c in ("qry", "qry_image_path", "pos_text", "pos_image_path")}
    _write_parquet(train_root / I2T / train_parquet_name("original"),
                   {"qry": [i2t_query] * len(train), "qry_image_path": paths,
                    "pos_text": texts, "pos_image_path": [""] * len(train)}, kinds)
    _write_parquet(train_root / T2I / train_parquet_name("original"),
                   {"qry": [format_prompt(T2I_INSTRUCTION, t, with_image=False) for t in texts],
                    "qry_image_path": [""] * len(train),
                    "pos_text": [IMAGE_TARGET_TEXT] * len(train), "pos_image_path": paths}, kinds)

    # Evaluation: every test image is one I->T query and one T->I query (its label text).
    rng = np.random.default_rng([seed, 18])
    zip_entries = {f"Digits/digit_{int(i):04d}.png": encode_png(images[i], image_size, resample) for i in test}
    by_class = {d: [int(i) for i in test if labels[i] == d] for d in range(10)}
    i2t = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    t2i = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for index in test:
        digit, path = int(labels[index]), f"Digits/digit_{int(index):04d}.png"
        others = [d for d in range(10) if d != digit]
        order = [others[j] for j in rng.permutation(9)]
        i2t["qry_text"].append(i2t_query)
        i2t["qry_img_path"].append(path)
        i2t["tgt_text"].append([label_text(digit)] + [label_text(d) for d in order])
        i2t["tgt_img_path"].append([""] * 10)
        distractors = [by_class[d][rng.integers(len(by_class[d]))] for d in order]
        t2i["qry_text"].append(format_prompt(T2I_INSTRUCTION, label_text(digit), with_image=False))
        t2i["qry_img_path"].append("")
        t2i["tgt_text"].append([IMAGE_TARGET_TEXT] * 10)
        t2i["tgt_img_path"].append([path] + [f"Digits/digit_{i:04d}.png" for i in distractors])
    eval_kinds = {"qry_text": "string", "qry_img_path": "string", "tgt_text": "list", "tgt_img_path": "list"}
    _write_parquet(eval_root / I2T / eval_parquet_name(), i2t, eval_kinds)
    _write_parquet(eval_root / T2I / eval_parquet_name(), t2i, eval_kinds)
    with zipfile.ZipFile(eval_root / "images.zip", "w", compression=zipfile.ZIP_STORED) as archive:
        for rel in sorted(zip_entries):
            archive.writestr(zipfile.ZipInfo(rel, date_time=(2024, 10, 9, 0, 0, 0)), zip_entries[rel])

    catalog = digits_catalog()
    write_catalog(train_root, catalog, source="digits")
    write_catalog(eval_root, catalog, source="digits")
    summary = {"version": DIGITS_VERSION, "seed": seed, "image_size": image_size, "resample": resample,
               "test_size": int(len(test)), "train_dir": str(train_root), "eval_dir": str(eval_root),
               "train_rows": {I2T: int(len(train)), T2I: int(len(train))},
               "eval_rows": {I2T: int(len(test)), T2I: int(len(test))},
               "test_per_class": [len(by_class[d]) for d in range(10)]}
    (out / "digits.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
