"""Raw MMEB batches → fixed-shape numpy arrays for the encoders (runs inside Ray Data CPU actors).

`BatchProcessor(model_config)` takes the typed `ModelConfig` (it pickles, so Ray ships it anywhere); it loads
the tokenizer and image processor of `model.name_or_path` (the tiny names build theirs in code) and
maps a raw batch (`qry_text`, `pos_text`, `qry_image`, `pos_image`, `target_hash`, `subset`) to
`{qry,pos}_input_ids` int64 [B, L], `{qry,pos}_attention_mask` int64 [B, L],
`{qry,pos}_pixel_values` uint8 [B, 3, H, W] (VLMs: [B, max_patches, 3·P·P] with
`{qry,pos}_image_grid_thw` int64 [B, 3]; zeros where a row has no image), `{qry,pos}_has_image` bool
[B], `{qry,pos}_token_span` int64 [B, 2] (each row's first and one-past-last real token column: with
`has_image` and the grids, the per-row facts the model reads on the host instead of the device),
`target_id` int64 [B] and `query_id` int64 [B] (the same content id of the query's text and image
bytes).

With `negatives_per_query=K > 0` the raw batch also carries per-row lists `neg_text`, `neg_image` and
optionally `neg_target_hash` (the dataset's own negatives, see sde_ray/data/batches.py, or a mined
sidecar's, `sde_ray.data.negatives.MinedNegatives`),
and the processor adds `neg_*` arrays of shape [B, K, ...] and `neg_target_id` int64 [B, K]. A row
with fewer than K negatives is padded with the positives of the next rows of its batch: those are
in-batch candidates already, so a pad adds no false negative, only a repeated candidate.

Pixels are the image after the family image processor's geometric steps (resize, centre crop) and
before its rescale and normalisation. Dual encoders run the processor with `do_rescale=False,
do_normalize=False`, which leaves exact integers in 0..255 (checked on every batch), so the uint8
cast is lossless. VLMs resize each image by the processor's own rule (`VisualGeometry`: its
`smart_resize` within `model.min_pixels` / `model.max_pixels`, aspect ratio kept) and cut it into
the processor's patch layout here, in uint8 (tested equal to the processor's output); each row's
patches are padded with zeros to the most that max_pixels allows, so every column keeps one shape
through Ray Data and the GradCache chunks. The model applies the processor's own rescale and
normalisation on its device (`Embedder.side_inputs`, `VLMEmbedder.normalize_patches`); a uint8
image is a quarter of the float32 bytes through Arrow, the object store and the host→device copy.

How a side's text and image become tokens depends on `model.kind`:
- dual_encoder (CLIP/SigLIP): MMEB's `<|image_1|>` placeholder is removed from the text (the image
  goes to the vision tower instead); the family tokenizer pads to `max_text_length`.
- vlm (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the placeholder becomes `<|vision_start|>` + N×`<|image_pad|>`
  + `<|vision_end|>`, N the image's own visual tokens; `model.prompt_format=chat` wraps the side in
  the reference embedders' chat turns (`chat_turns`). L = max_text_length + the most tokens an image
  may have + 2; only the text content is truncated, never the image block or the turns.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import unicodedata
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
VIDEO_PAD = "<|video_pad|>"

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
            frames = _column(batch, f"{side}_frames", rows) if f"{side}_frames" in batch else None
            out.update(self.encode_inputs(texts, images, side, frames))
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
        self, texts: Sequence[str], images: Sequence[Any] | None, prefix: str,
        frames: Sequence[Sequence[Any]] | None = None,
    ) -> dict[str, np.ndarray]:
        """One side: texts (with MMEB placeholders) and images (bytes / PIL / None) → the
        `{prefix}_*` arrays. Used by the evaluator for query and candidate lists alike. `frames`:
        per row a video's frames (bytes / PIL; [] for none), VLMs with model.video_frames > 0 only."""
        texts = list(texts)
        images = [None] * len(texts) if images is None else list(images)
        if len(images) != len(texts):
            raise ValueError(f"{prefix}: {len(texts)} texts but {len(images)} images.")
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{prefix}_text[{row}]: expected str, got {type(text).__name__}.")
        decoded = [decode_image(image, f"{prefix}_image[{row}]") for row, image in enumerate(images)]
        has_image = np.array([image is not None for image in decoded], dtype=bool)
        if self.config.kind == "vlm":
            videos = self._decode_videos(frames, len(texts), prefix)
            out = self._encode_vlm(texts, decoded, has_image, prefix, videos)
        else:
            out = self._encode_dual(texts, decoded, has_image, prefix, frames)
        out[f"{prefix}_token_span"] = token_spans(out[f"{prefix}_attention_mask"])
        return out

    def _encode_dual(self, texts: list[str], decoded: list, has_image: np.ndarray, prefix: str,
                     frames: Sequence[Sequence[Any]] | None) -> dict[str, np.ndarray]:
        """The dual encoder's side: tokens padded to max_text_length and uint8 [B, 3, H, W] pixels."""
        if frames is not None and any(len(f) for f in frames):
            raise ValueError(f"{prefix}: video frames given to a dual encoder (model.kind=vlm has a video path).")
        if not texts:
            input_ids = attention_mask = np.zeros((0, self._seq_len), dtype=np.int64)
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

    def _encode_vlm(self, texts: list[str], decoded: list, has_image: np.ndarray, prefix: str,
                    videos: list | None = None) -> dict[str, np.ndarray]:
        """The VLM side: the dual encoder's four arrays, pixels as padded patches, plus
        `{prefix}_image_grid_thw` int64 [B, 3] (each image's (1, gh, gw) patch grid; zeros without one).
        With model.video_frames > 0 also `{prefix}_video_pixel_values` uint8 [B, max_video_patches,
        C·T·P·P] and `{prefix}_video_grid_thw` int64 [B, 3]; `has_image` then means "has an image or a
        video" (the side has visual input)."""
        pixel_values, grids = self._patches_vlm(decoded)
        merge = self.geometry.merge_size**2
        out = {}
        video_tokens = np.zeros(len(texts), dtype=np.int64)
        if self.video is not None:
            both = [row for row, v in enumerate(videos) if v and has_image[row]]
            if both:
                raise ValueError(f"{prefix}[{both[0]}] has both an image and video frames; one visual input per side.")
            video_pixels, video_grids = self.video.patches(videos, self._video_shape)
            video_tokens = video_grids.prod(axis=1) // merge
            has_image = has_image | (video_tokens > 0)
            out = {f"{prefix}_video_pixel_values": video_pixels, f"{prefix}_video_grid_thw": video_grids}
        if not texts:
            input_ids = attention_mask = np.zeros((0, self._seq_len), dtype=np.int64)
        else:
            image_tokens = grids.prod(axis=1) // merge
            input_ids, attention_mask = self._tokenize_vlm(texts, image_tokens + video_tokens, prefix,
                                                           is_video=video_tokens > 0)
        return {
            f"{prefix}_input_ids": input_ids,
            f"{prefix}_attention_mask": attention_mask,
            f"{prefix}_pixel_values": pixel_values,
            f"{prefix}_has_image": has_image,
            f"{prefix}_image_grid_thw": grids,
            **out,
        }

    def _decode_videos(self, frames: Sequence[Sequence[Any]] | None, rows: int, prefix: str) -> list | None:
        if self.video is None:
            if frames is not None and any(len(f) for f in frames):
                raise ValueError(f"{prefix}: the batch carries video frames but model.video_frames=0; set it "
                                 "(e.g. 8, MMEB-V2's default) to feed them to the backbone as video.")
            return None
        frames = [[]] * rows if frames is None else list(frames)
        if len(frames) != rows:
            raise ValueError(f"{prefix}: {rows} texts but {len(frames)} frame lists.")
        return [[decode_image(f, f"{prefix}_frames[{row}][{i}]") for i, f in enumerate(row_frames)]
                for row, row_frames in enumerate(frames)]

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
        out = self.image_processor(images=images, return_tensors="np", **GEOMETRY_ONLY)["pixel_values"]
        return exact_uint8(out, f"{self.config.name_or_path} ({type(self.image_processor).__name__})")

    # ------------------------------------------------------------------------------------------
    # VLM (Qwen2-VL family): dynamic resolution, placeholder → vision block of the image's own size

    def _setup_vlm(self) -> None:
        self.geometry = VisualGeometry.of(self.image_processor, self.config)
        # The processor that travels with the model (export, eval) resizes as training did.
        self.image_processor.size = self.geometry.size_dict()
        vocab = self.tokenizer.get_vocab()
        missing = [t for t in (VISION_START, IMAGE_PAD, VISION_END) if t not in vocab]
        if missing:
            raise ValueError(
                f"{self.config.name_or_path}: tokenizer lacks the vision tokens {missing} (model.kind=vlm)."
            )
        self.vision_ids = (vocab[VISION_START], vocab[IMAGE_PAD], vocab[VISION_END])
        self.video = VideoGeometry.of(self.geometry, self.config) if self.config.video_frames else None
        if self.video is not None:
            missing = [t for t in (VIDEO_PAD,) if t not in vocab]
            if missing:
                raise ValueError(f"{self.config.name_or_path}: tokenizer lacks the video token {VIDEO_PAD}.")
            self.video_pad_id = vocab[VIDEO_PAD]
            self._video_shape = (self.video.max_patches, self.video.patch_dim)
        # Rows are padded to the largest image (or video) the pixel bounds allow; the model trims a
        # batch to its own.
        most = max(self.geometry.max_tokens, self.video.max_tokens if self.video else 0)
        self._seq_len = self.config.max_text_length + most + 2
        self._image_shape = (self.geometry.max_patches, self.geometry.patch_dim)

    def _tokenize_vlm(
        self, texts: list[str], image_tokens: np.ndarray, prefix: str, is_video: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of [before] + [image block] + [content] + [after]: `content` alone is truncated (from the
        right) to fit max_text_length, so neither the image block nor a format's fixed turns are cut."""
        placeholder = self.config.image_token
        befores, contents, afters = [], [], []
        for row, text in enumerate(texts):
            count = text.count(placeholder)
            if count > 1:
                raise ValueError(
                    f"{prefix}_text[{row}] has {count} '{placeholder}' placeholders; one image per side."
                )
            if self.config.prompt_format == "chat":
                system, content = chat_turns(text, placeholder, bool(image_tokens[row]), prefix == "qry",
                                             self.config.default_instruction)
                befores.append(CHAT_BEFORE.format(system=system))
                contents.append(content)
                afters.append(CHAT_AFTER)
            elif image_tokens[row]:
                # An image without a placeholder goes first, where MMEB puts it.
                before, _, after = text.partition(placeholder) if count else ("", "", text)
                befores.append(before)
                contents.append(after)
                afters.append("")
            else:
                befores.append("")
                contents.append(text.replace(placeholder, ""))
                afters.append("")
        rows = len(texts)
        pieces = self.tokenizer(befores + contents + afters, add_special_tokens=False)["input_ids"]
        input_ids = np.full((rows, self._seq_len), self.tokenizer.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((rows, self._seq_len), dtype=np.int64)
        budget = self.config.max_text_length
        left = self.tokenizer.padding_side == "left"
        start, pad, end = self.vision_ids
        for row in range(rows):
            before, content, after = pieces[row], pieces[rows + row], pieces[2 * rows + row]
            if self.config.prompt_format == "chat" and len(before) + len(after) > budget:
                raise ValueError(f"{prefix}[{row}]: the chat turns alone take {len(before) + len(after)} tokens, "
                                 f"over model.max_text_length={budget}.")
            before = before[:budget]  # vlm2vec: the text before the placeholder, cut like any text
            content = content[: max(0, budget - len(before) - len(after))]
            row_pad = self.video_pad_id if is_video is not None and is_video[row] else pad
            block = [start] + [row_pad] * int(image_tokens[row]) + [end] if image_tokens[row] else []
            ids = before + block + content + after
            if not ids:
                raise ValueError(f"{prefix}[{row}] has neither text nor an image: nothing to embed.")
            span = slice(self._seq_len - len(ids), self._seq_len) if left else slice(0, len(ids))
            input_ids[row, span] = ids
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    def _patches_vlm(self, images: list[Image.Image | None]) -> tuple[np.ndarray, np.ndarray]:
        """Each image resized by the processor's rule and cut into its patch layout, padded with zero
        patches to `max_patches`: (uint8 [N, max_patches, C·P·P], grid_thw int64 [N, 3]; 0 rows for None)."""
        geometry = self.geometry
        pixels = np.zeros((len(images), *self._image_shape), dtype=np.uint8)
        grids = np.zeros((len(images), 3), dtype=np.int64)
        for row, image in enumerate(images):
            if image is None:
                continue
            height, width = geometry.resized(image.height, image.width)
            resized = np.asarray(image.resize((width, height), Image.BICUBIC), dtype=np.uint8).transpose(2, 0, 1)
            patches = patchify_image(resized, geometry.patch_size, geometry.merge_size)
            pixels[row, : len(patches)] = patches
            grids[row] = (1, height // geometry.patch_size, width // geometry.patch_size)
        return pixels, grids


# The Qwen chat turns around a side (ChatML, as the Qwen2-VL/2.5-VL/3-VL chat templates render a system
# and a user message with add_generation_prompt): the image block, then the content, go between them.
CHAT_BEFORE = "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
CHAT_AFTER = "<|im_end|>\n<|im_start|>assistant\n"


def chat_turns(text: str, placeholder: str, has_image: bool, is_query: bool, default_instruction: str) -> tuple[str, str]:
    """An MMEB side's text → (system turn, user content) in the reference embedders' format.

    MMEB writes `[<|image_1|>\n]{instruction}[: {content}]\n`. The instruction is the text before the
    first ':' of its first line, with the ':' (or the whole first line of an image side without
    one: "Represent the given image."); a text-only side without one is all content. Queries put
    their instruction in the system turn; candidates drop theirs (their system turn is
    `default_instruction`). As Qwen3-VL-Embedding does, the instruction is stripped and ends in
    punctuation ('.' added otherwise); the content is stripped of the newlines MMEB wraps it in.
    """
    body = text.replace(placeholder, "").strip()
    first_line = body.split("\n", 1)[0]
    head, colon, _ = first_line.partition(":")
    if colon:
        instruction, content = head + ":", body[len(head) + 1:]
    elif has_image:
        instruction, content = first_line, body[len(first_line):]
    else:
        instruction, content = "", body
    if not is_query and not has_image:  # a text candidate is content only (a ':' in it is no instruction)
        instruction, content = "", body
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    system = instruction if is_query and instruction else default_instruction
    return system, content.strip()


@dataclasses.dataclass(frozen=True)
class VisualGeometry:
    """How a Qwen2-VL-family image processor sizes an image: patch × merge cells, pixels bounded.

    `resized(h, w)` is the processor's own `smart_resize` (aspect ratio kept, both sides multiples of
    patch × merge, area within [min_pixels, max_pixels]); `tokens(h, w)` the visual tokens the LM
    sees for an image of that size (one per merge × merge block of patches)."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, image_processor: Any, config: ModelConfig) -> VisualGeometry:
        missing = [a for a in ("patch_size", "merge_size", "temporal_patch_size", "size")
                   if getattr(image_processor, a, None) is None]
        if missing:
            raise ValueError(
                f"{config.name_or_path}: model.kind=vlm needs a Qwen2-VL-style image processor (with patch_size, "
                f"merge_size, temporal_patch_size and a pixel range); {type(image_processor).__name__} lacks {missing}."
            )
        size = image_processor.size
        own = (getattr(size, "shortest_edge", None) or 0, getattr(size, "longest_edge", None) or 0)
        geometry = cls(int(image_processor.patch_size), int(image_processor.merge_size),
                       int(image_processor.temporal_patch_size),
                       int(config.min_pixels or own[0]), int(config.max_pixels or own[1]))
        if geometry.max_tokens < 1 or geometry.min_pixels > geometry.max_pixels:
            raise ValueError(
                f"{config.name_or_path}: pixel range [{geometry.min_pixels}, {geometry.max_pixels}] (model.min_pixels/"
                f"max_pixels, 0: the processor's {own}) holds no {geometry.factor}×{geometry.factor} cell; "
                f"max_pixels must be >= {geometry.factor ** 2} and >= min_pixels."
            )
        return geometry

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def max_tokens(self) -> int:
        return self.max_pixels // self.factor**2

    @property
    def max_patches(self) -> int:
        return self.max_tokens * self.merge_size**2

    @property
    def patch_dim(self) -> int:
        """A patch as stored: C·P·P uint8 (the processor's C·T·P·P repeats a still image T times)."""
        return 3 * self.patch_size**2

    def size_dict(self):
        from transformers.image_utils import SizeDict

        return SizeDict(shortest_edge=self.min_pixels, longest_edge=self.max_pixels)

    def resized(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        new_height, new_width = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        if new_height * new_width > self.max_tokens * self.factor**2:
            raise ValueError(
                f"a {width}×{height} image resizes to {new_width}×{new_height}, over max_pixels={self.max_pixels} "
                "(min_pixels too close to max_pixels for its aspect ratio)."
            )
        return new_height, new_width

    def tokens(self, height: int, width: int) -> int:
        new_height, new_width = self.resized(height, width)
        return new_height * new_width // self.factor**2


def token_spans(attention_mask: np.ndarray) -> np.ndarray:
    """Each row's (first, one past the last) column with attention_mask 1, int64 [B, 2] ((0, 0) for an
    empty row): a per-row fact the model reads on the host to cut a batch's all-padding columns
    (`sde_ray.models.embedder.trim_padding`), where reading the mask itself would wait on the device."""
    mask = np.asarray(attention_mask).astype(bool)
    spans = np.zeros((mask.shape[0], 2), dtype=np.int64)
    used = mask.any(axis=1)
    spans[used, 0] = mask[used].argmax(axis=1)
    spans[used, 1] = mask.shape[1] - mask[used][:, ::-1].argmax(axis=1)
    return spans


def patchify_image(image: np.ndarray, patch_size: int, merge_size: int) -> np.ndarray:
    """[C, H, W] → [gh·gw, C·P·P] in the Qwen2-VL image processor's order (merge blocks row-major,
    then the merge × merge patches inside each block), without its T-fold copy along time."""
    channels, height, width = image.shape
    p, m = patch_size, merge_size
    gh, gw = height // p, width // p
    x = image.reshape(channels, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    return x.reshape(gh * gw, channels * p * p)


@dataclasses.dataclass(frozen=True)
class VideoGeometry:
    """How a video side is sized, as the Qwen2-VL video processor sizes it with its per-frame cap
    (`cap_pixels_per_frame`): `frames` frames (padded by repeating the last to a multiple of the
    temporal patch), every frame resized alike by `smart_resize` within [min_pixels, per-frame cap],
    the cap an even share of the video's pixel budget (`model.video_max_pixels`) and at most
    `model.max_pixels`. Patches are `temporal_patch_size` consecutive frames (C·T·P·P)."""

    image: VisualGeometry
    frames: int
    frame_max_pixels: int

    @classmethod
    def of(cls, image: VisualGeometry, config: ModelConfig) -> VideoGeometry:
        if config.video_frames < 1:
            raise ValueError(f"model.video_frames must be >= 1 for a video path, got {config.video_frames}")
        t = image.temporal_patch_size
        frames = -(-config.video_frames // t) * t
        total = config.video_max_pixels or config.video_frames * image.max_pixels // t
        cap = min(image.max_pixels, total * t // frames)
        if cap < max(image.min_pixels, image.factor**2):
            raise ValueError(
                f"model.video_max_pixels={total} over {frames} frames leaves {cap} pixels per frame, under one "
                f"{image.factor}×{image.factor} cell or model.min_pixels={image.min_pixels}: raise it."
            )
        return cls(image, frames, cap)

    @property
    def max_tokens(self) -> int:
        return self.frames // self.image.temporal_patch_size * (self.frame_max_pixels // self.image.factor**2)

    @property
    def max_patches(self) -> int:
        return self.max_tokens * self.image.merge_size**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.image.temporal_patch_size * self.image.patch_size**2

    def resized(self, height: int, width: int) -> tuple[int, int]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        return smart_resize(height, width, self.image.factor, self.image.min_pixels, self.frame_max_pixels)

    def patches(self, videos: list[list[Image.Image]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Per row its frames (already sampled; [] for none) → (uint8 [N, max_patches, C·T·P·P] padded
        with zeros, grid_thw int64 [N, 3]; zeros without a video)."""
        g = self.image
        pixels = np.zeros((len(videos), *shape), dtype=np.uint8)
        grids = np.zeros((len(videos), 3), dtype=np.int64)
        for row, frames in enumerate(videos):
            if not frames:
                continue
            if len(frames) > self.frames:
                raise ValueError(f"a video of {len(frames)} frames; model.video_frames allows {self.frames}")
            height, width = self.resized(frames[0].height, frames[0].width)
            stack = np.stack([np.asarray(f.resize((width, height), Image.BICUBIC), dtype=np.uint8).transpose(2, 0, 1)
                              for f in frames])
            if pad := -len(stack) % g.temporal_patch_size:
                stack = np.concatenate([stack, np.repeat(stack[-1:], pad, axis=0)])
            patches = patchify_video(stack, g.patch_size, g.merge_size, g.temporal_patch_size)
            pixels[row, : len(patches)] = patches
            grids[row] = (len(stack) // g.temporal_patch_size, height // g.patch_size, width // g.patch_size)
        return pixels, grids


def patchify_video(frames: np.ndarray, patch_size: int, merge_size: int, temporal: int) -> np.ndarray:
    """[T, C, H, W] (T a multiple of `temporal`) → [T/temporal·gh·gw, C·temporal·P·P] in the Qwen2-VL
    video processor's order (time, merge blocks row-major, the patches inside a block; each patch
    channel-major, then time, then pixels)."""
    count, channels, height, width = frames.shape
    p, m = patch_size, merge_size
    gt, gh, gw = count // temporal, height // p, width // p
    x = frames.reshape(gt, temporal, channels, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, channels * temporal * p * p)
