"""Raw MMEB batches → fixed-shape numpy arrays for the encoders (runs inside Ray Data CPU actors).

`BatchProcessor(model_config)` takes the typed `ModelConfig` (it pickles, so Ray ships it anywhere); it loads
the tokenizer and image processor of `model.name_or_path` (the tiny names build theirs in code) and
maps a raw batch (`qry_text`, `pos_text`, `qry_image`, `pos_image`, `target_hash`, `subset`) to
`{qry,pos}_input_ids` int64 [B, L], `{qry,pos}_attention_mask` int64 [B, L],
`{qry,pos}_pixel_values` uint8 [B, 3, H, W] (zeros where a row has no image),
`{qry,pos}_has_image` bool [B], `target_id` int64 [B] and `query_id` int64 [B] (the same content id of
the query's text and image bytes).

With `negatives_per_query=K > 0` the raw batch also carries per-row lists `neg_text`, `neg_image` and
optionally `neg_target_hash` (the dataset's own negatives, see sde_ray/data/batches.py, or a mined
sidecar's, `sde_ray.data.negatives.MinedNegatives`),
and the processor adds `neg_*` arrays of shape [B, K, ...] and `neg_target_id` int64 [B, K]. A row
with fewer than K negatives is padded with the positives of the next rows of its batch: those are
in-batch candidates already, so a pad adds no false negative, only a repeated candidate.

Pixels are the image after the family image processor's geometric steps (resize, centre crop) and
before its rescale and normalisation. Dual encoders run the processor with `do_rescale=False,
do_normalize=False`, which leaves exact integers in 0..255 (checked on every batch), so the uint8
cast is lossless. The VLM resizes to S×S itself; there the processor's geometric output is the
resized image (its resize is the identity and its patches are the same pixels re-laid out, checked
against the processor once at construction), so the resized image is stored directly. The model
applies the processor's own rescale and normalisation on its device (`Embedder.side_inputs`); a
uint8 image is a quarter of the float32 bytes through Arrow, the object store and the host→device
copy.

How a side's text and image become tokens depends on `model.kind`:
- dual_encoder (CLIP/SigLIP): MMEB's `<|image_1|>` placeholder is removed from the text (the image
  goes to the vision tower instead); the family tokenizer pads to `max_text_length`.
- vlm (Qwen2-VL): the placeholder becomes `<|vision_start|>` + N×`<|image_pad|>` + `<|vision_end|>`,
  N fixed because every image is resized to one square resolution (`model.image_size` rounded up to
  a multiple of patch × merge); L = max_text_length + N + 2, and truncation never cuts the image
  block. Pixel values are stored as images [3, H, W]; the model normalises and re-patchifies them.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.data.mmeb import stable_id

SIDES = ("qry", "pos")
NEG = "neg"  # the explicit negatives' prefix
RAW_COLUMNS = ("qry_text", "pos_text", "qry_image", "pos_image", "target_hash")

# Qwen2-VL's vision markers (VLM2Vec swaps MMEB's placeholder for the pad token; we add the
# start/end markers the Qwen2-VL chat format puts around every image).
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"

# Processor-call overrides that keep only the geometric steps; the model does the rest.
GEOMETRY_ONLY = {"do_rescale": False, "do_normalize": False}


def decode_image(value: Any, where: str) -> Image.Image | None:
    """Encoded bytes (or an already decoded PIL image) → RGB image; None/empty → None."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
        if len(value) == 0:
            return None
        try:
            with Image.open(io.BytesIO(bytes(value))) as image:
                return image.convert("RGB")
        except Exception as exc:  # PIL raises several types for corrupt data
            raise ValueError(f"{where}: cannot decode image bytes ({type(exc).__name__}: {exc}).") from exc
    raise TypeError(
        f"{where}: expected encoded image bytes, a PIL image or None, got {type(value).__name__}."
    )


def _image_bytes(value: Any) -> bytes | None:
    """The bytes a content id hashes: encoded bytes as they are, a PIL image's pixels, None/empty → None."""
    if isinstance(value, Image.Image):
        return value.tobytes()
    if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)) and len(value):
        return bytes(value)
    return None


def load_processors(config: ModelConfig) -> tuple[Any, Any]:
    """(tokenizer, image_processor) for `config.name_or_path`: built in code for the tiny names,
    otherwise through `AutoTokenizer` / `AutoImageProcessor.from_pretrained`."""
    from sde_ray.models.tiny import TINY_MODELS, tiny_processors

    name = config.name_or_path
    if config.vision_name_or_path:  # an assembled dual encoder: each tower brings its own
        return _from_pretrained(config.text_name_or_path, config.vision_name_or_path)
    if name in TINY_MODELS:
        expected = TINY_MODELS[name].kind
        if config.kind != expected:
            raise ValueError(f"model.name_or_path={name} is a {expected} model but model.kind={config.kind}.")
        return tiny_processors(name, config)
    return _from_pretrained(name, name)


def _from_pretrained(text_name: str, vision_name: str) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text_name)
        image_processor = AutoImageProcessor.from_pretrained(vision_name)
    except OSError as exc:
        names = (
            f"model.name_or_path={text_name!r}"
            if text_name == vision_name
            else f"model.text_name_or_path={text_name!r} / model.vision_name_or_path={vision_name!r}"
        )
        raise OSError(
            f"{names}: cannot load its tokenizer/image processor with from_pretrained "
            f"(no such local folder, or the Hub is unreachable; offline, use tiny-clip, tiny-siglip or "
            f"tiny-qwen2-vl, or a folder written by save_pretrained). Cause: {exc}"
        ) from exc
    return tokenizer, image_processor


def exact_uint8(values: np.ndarray, where: str) -> np.ndarray:
    """`values` as uint8, refusing anything a cast would change (a processor that still rescales,
    normalises or interpolates to fractions)."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values
    if values.size and not (
        values.min() >= 0 and values.max() <= 255 and np.array_equal(values, np.rint(values))
    ):
        raise ValueError(
            f"{where}: with {GEOMETRY_ONLY} the image processor returned {values.dtype} values in "
            f"[{values.min()}, {values.max()}] that are not all integers in 0..255; BatchProcessor emits "
            "uint8 pixels and needs a processor whose resize/crop keep 8-bit values (the PIL backends do)."
        )
    return values.astype(np.uint8)


def _column(batch: Any, key: str, rows: int | None) -> list:
    try:
        values = batch[key]
    except (KeyError, IndexError):
        raise KeyError(f"raw batch has no column '{key}'; expected {', '.join(RAW_COLUMNS)}.") from None
    values = list(values)
    if rows is not None and len(values) != rows:
        raise ValueError(f"raw batch column '{key}' has {len(values)} rows, 'qry_text' has {rows}.")
    return values


class BatchProcessor:
    """Picklable callable: raw batch dict → dict of fixed-shape numpy arrays (see module docstring)."""

    def __init__(self, model_config: ModelConfig, negatives_per_query: int = 0):
        if not isinstance(model_config, ModelConfig):
            raise TypeError(f"BatchProcessor takes a ModelConfig, got {type(model_config).__name__}.")
        self.config: ModelConfig = copy.deepcopy(model_config)
        self.negatives_per_query = int(negatives_per_query)
        self.tokenizer, self.image_processor = load_processors(self.config)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"the tokenizer of {self.config.name_or_path} has no pad token.")
        if self.config.kind == "vlm":
            self._setup_vlm()
        else:
            self._setup_dual()

    # Rebuilt from the config on unpickling: small payload, nothing process-specific travels.
    def __getstate__(self) -> dict:
        return {"model_config": self.config, "negatives_per_query": self.negatives_per_query}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_config"], state["negatives_per_query"])

    # ------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._image_shape

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        rows = len(_column(batch, "qry_text", None))
        out: dict[str, np.ndarray] = {}
        for side in SIDES:
            texts = _column(batch, f"{side}_text", rows)
            images = _column(batch, f"{side}_image", rows)
            out.update(self.encode_inputs(texts, images, side))
        hashes = _column(batch, "target_hash", rows)
        out["target_id"] = np.array([stable_id(h) for h in hashes], dtype=np.int64)
        # The query's content id, as the converter's target_hash of the target: rows sharing a query
        # share their positives (loss.duplicate_key=pair, sde_ray.losses.infonce.duplicate_groups).
        from sde_ray.data.convert import target_hash

        queries, query_images = _column(batch, "qry_text", rows), _column(batch, "qry_image", rows)
        out["query_id"] = np.array([stable_id(target_hash(t, _image_bytes(i))) for t, i in zip(queries, query_images)],
                                   dtype=np.int64)
        if self.negatives_per_query:
            out.update(self._negatives(batch, rows, hashes))
        return out

    def _negatives(self, batch: Any, rows: int, hashes: list) -> dict[str, np.ndarray]:
        """The `neg_*` arrays [B, K, ...]: each row's own negatives, padded with the next rows' positives."""
        k = self.negatives_per_query
        texts, images = _column(batch, "neg_text", rows), _column(batch, "neg_image", rows)
        if "neg_target_hash" in batch:  # a mined sidecar's join brings the shards' content ids
            neg_hashes = _column(batch, "neg_target_hash", rows)
        else:  # the dataset's own negatives: the converter's content id of (text, image bytes)
            from sde_ray.data.convert import target_hash

            neg_hashes = [[target_hash(t, i if isinstance(i, (bytes, bytearray)) else None)
                           for t, i in zip(ts, im)] for ts, im in zip(texts, images)]
        pos_texts, pos_images = _column(batch, "pos_text", rows), _column(batch, "pos_image", rows)
        flat_texts, flat_images, flat_hashes = [], [], []
        for row in range(rows):
            own = list(zip(texts[row], images[row], neg_hashes[row]))[:k]
            if len(own) < k and rows == 1:
                raise ValueError(
                    f"neg_text[{row}]: {len(own)} negatives for loss.negatives_per_query={k}, and a one-row "
                    "batch has no other positive to pad with"
                )
            step = 1
            while len(own) < k:
                other = (row + step) % rows
                step += 1
                if other == row:
                    continue
                own.append((pos_texts[other], pos_images[other], hashes[other]))
            for text, image, content in own:
                flat_texts.append(text)
                flat_images.append(image)
                flat_hashes.append(content)
        arrays = self.encode_inputs(flat_texts, flat_images, NEG)
        out = {name: value.reshape(rows, k, *value.shape[1:]) for name, value in arrays.items()}
        out[f"{NEG}_target_id"] = np.array([stable_id(h) for h in flat_hashes], dtype=np.int64).reshape(rows, k)
        return out

    def encode_inputs(
        self, texts: Sequence[str], images: Sequence[Any] | None, prefix: str
    ) -> dict[str, np.ndarray]:
        """One side: texts (with MMEB placeholders) and images (bytes / PIL / None) → the four
        `{prefix}_*` arrays. Used by the evaluator for query and candidate lists alike."""
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"{prefix}: {len(texts)} texts but {len(images)} images.")
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{prefix}_text[{row}]: expected str, got {type(text).__name__}.")
        decoded = [decode_image(image, f"{prefix}_image[{row}]") for row, image in enumerate(images)]
        has_image = np.array([image is not None for image in decoded], dtype=bool)
        if not texts:
            input_ids = attention_mask = np.zeros((0, self._seq_len), dtype=np.int64)
        elif self.config.kind == "vlm":
            input_ids, attention_mask = self._tokenize_vlm(texts, has_image, prefix)
        else:
            input_ids, attention_mask = self._tokenize_dual(texts)
        pixel_values = np.zeros((len(texts), *self._image_shape), dtype=np.uint8)
        present = [image for image in decoded if image is not None]
        if present:
            pixel_values[has_image] = self._pixels(present)
        return {
            f"{prefix}_input_ids": input_ids,
            f"{prefix}_attention_mask": attention_mask,
            f"{prefix}_pixel_values": pixel_values,
            f"{prefix}_has_image": has_image,
        }

    # ------------------------------------------------------------------------------------------
    # dual encoders: placeholder removed, the family tokenizer pads to max_text_length

    def _setup_dual(self) -> None:
        self._seq_len = self.config.max_text_length
        probe = self.image_processor(images=[Image.new("RGB", (8, 8))], return_tensors="np", **GEOMETRY_ONLY)[
            "pixel_values"
        ]
        if probe.ndim != 4:
            raise ValueError(
                f"{self.config.name_or_path}: its image processor returns pixel_values of shape {probe.shape}; "
                "model.kind=dual_encoder expects [N, 3, H, W] (CLIP/SigLIP processors)."
            )
        self._image_shape = tuple(probe.shape[1:])

    def _strip_placeholder(self, text: str) -> str:
        return text.replace(self.config.image_token, "").strip()

    def _tokenize_dual(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.tokenizer(
            [self._strip_placeholder(t) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=self._seq_len,
            return_attention_mask=True,
            return_tensors="np",
        )
        return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)

    def _pixels(self, images: list[Image.Image]) -> np.ndarray:
        if self.config.kind == "vlm":
            return self._pixels_vlm(images)
        out = self.image_processor(images=images, return_tensors="np", **GEOMETRY_ONLY)["pixel_values"]
        return exact_uint8(out, f"{self.config.name_or_path} ({type(self.image_processor).__name__})")

    # ------------------------------------------------------------------------------------------
    # VLM (Qwen2-VL): fixed resolution, placeholder → vision block of a fixed token count

    def _setup_vlm(self) -> None:
        processor = self.image_processor
        for attribute in ("patch_size", "merge_size", "temporal_patch_size"):
            if not hasattr(processor, attribute):
                raise ValueError(
                    f"{self.config.name_or_path}: model.kind=vlm needs a Qwen2-VL-style image processor "
                    f"(with patch_size, merge_size, temporal_patch_size); got {type(processor).__name__}."
                )
        self.patch_size, self.merge_size = int(processor.patch_size), int(processor.merge_size)
        factor = self.patch_size * self.merge_size
        self.side = math.ceil(self.config.image_size / factor) * factor
        grid = self.side // self.patch_size
        self.image_tokens = grid * grid // self.merge_size**2
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (VISION_START, IMAGE_PAD, VISION_END) if t not in vocab]
        if missing:
            raise ValueError(
                f"{self.config.name_or_path}: tokenizer lacks the vision tokens {missing} (model.kind=vlm)."
            )
        self.image_block = (
            [vocab[VISION_START]] + [vocab[IMAGE_PAD]] * self.image_tokens + [vocab[VISION_END]]
        )
        self._seq_len = self.config.max_text_length + len(self.image_block)
        self._image_shape = (3, self.side, self.side)
        self._check_vlm_pixels()

    def _tokenize_vlm(
        self, texts: list[str], has_image: np.ndarray, prefix: str
    ) -> tuple[np.ndarray, np.ndarray]:
        placeholder = self.config.image_token
        befores, afters = [], []
        for row, text in enumerate(texts):
            count = text.count(placeholder)
            if count > 1:
                raise ValueError(
                    f"{prefix}_text[{row}] has {count} '{placeholder}' placeholders; one image per side."
                )
            if has_image[row]:
                # An image without a placeholder goes first, where MMEB puts it.
                before, _, after = text.partition(placeholder) if count else ("", "", text)
            else:
                before, after = "", text.replace(placeholder, "")
            befores.append(before)
            afters.append(after)
        pieces = self.tokenizer(befores + afters, add_special_tokens=False)["input_ids"]
        rows = len(texts)
        input_ids = np.full((rows, self._seq_len), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((rows, self._seq_len), dtype=np.int64)
        budget = self.config.max_text_length
        left = self.tokenizer.padding_side == "left"
        for row in range(rows):
            before, after = pieces[row], pieces[rows + row]
            # Right truncation of the text; the image block is never cut.
            after = after[: max(0, budget - len(before))]
            before = before[:budget]
            ids = before + (self.image_block if has_image[row] else []) + after
            if not ids:
                raise ValueError(f"{prefix}[{row}] has neither text nor an image: nothing to embed.")
            span = slice(self._seq_len - len(ids), self._seq_len) if left else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    def _pixels_vlm(self, images: list[Image.Image]) -> np.ndarray:
        # At S×S the processor's own resize is the identity and its patches are these pixels laid out
        # again (checked at construction), so this is its geometric output without the float32
        # patch copy, time-doubled, that it would build and we would undo.
        resized = [image.resize((self.side, self.side), Image.BICUBIC) for image in images]
        return np.stack([np.asarray(image, dtype=np.uint8).transpose(2, 0, 1) for image in resized])

    def _vlm_processor_pixels(self, images: list[Image.Image]) -> np.ndarray:
        """The image processor's own output for S×S images (rescale and normalisation off), [N, 3, S, S]."""
        area = self.side * self.side
        out = self.image_processor(
            images=images,
            size={"shortest_edge": area, "longest_edge": area},
            return_tensors="np",
            **GEOMETRY_ONLY,
        )
        grid = np.asarray(out["image_grid_thw"])
        expected = [1, self.side // self.patch_size, self.side // self.patch_size]
        if not (grid == np.array(expected)).all():
            raise ValueError(
                f"image processor produced grids {grid.tolist()}, expected {expected} for every image."
            )
        patches = exact_uint8(
            out["pixel_values"], f"{self.config.name_or_path} ({type(self.image_processor).__name__})"
        )
        return np.stack(
            [
                unpatchify_qwen2_vl(p, self.side, self.patch_size, self.merge_size)
                for p in np.split(patches, len(images))
            ]
        )

    def _check_vlm_pixels(self) -> None:
        probe = np.random.default_rng(0).integers(0, 256, (self.side, self.side, 3), dtype=np.uint8)
        probe = [Image.fromarray(probe)]
        if not np.array_equal(self._pixels_vlm(probe), self._vlm_processor_pixels(probe)):
            raise ValueError(
                f"{self.config.name_or_path}: its image processor ({type(self.image_processor).__name__}) "
                f"changes an already {self.side}×{self.side} image beyond rescale/normalisation; the "
                "fixed-resolution VLM path assumes it does not."
            )


def unpatchify_qwen2_vl(patches: np.ndarray, side: int, patch_size: int, merge_size: int) -> np.ndarray:
    """Inverse of the Qwen2-VL image processor's patch layout for one image: [gh·gw, C·T·P·P] → [C, H, W]
    (the T copies of a still image are identical; the first is kept)."""
    grid, m, p = side // patch_size, merge_size, patch_size
    channels = patches.shape[1] // (p * p)
    temporal = channels // 3
    x = patches.reshape(grid // m, grid // m, m, m, 3, temporal, p, p)[:, :, :, :, :, 0]
    # axes (block_h, block_w, merge_h, merge_w, C, P_h, P_w) → (C, block_h, merge_h, P_h, block_w, merge_w, P_w)
    return np.ascontiguousarray(x.transpose(4, 0, 2, 5, 1, 3, 6)).reshape(3, side, side)
