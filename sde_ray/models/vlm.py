"""VLM2Vec-style embedder: a vision-language causal LM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) read out at its last token.

The side's tokens (text with the image block `<|vision_start|><|image_pad|>…<|vision_end|>` where
MMEB had `<|image_1|>`, one pad per visual token of that image) run through the backbone's own
multimodal forward; the embedding is the final hidden layer (after the last norm) at each row's
last non-pad token, for either padding side.

Images arrive at their own resolution (sde_ray/models/processing.py): uint8 patches padded per row,
[B, max_patches, C·P·P], and each image's grid `image_grid_thw` [B, 3]. Here a batch's real patches
are packed as the Hugging Face processors pack them (every image's patches concatenated, [Σ patches,
C·T·P·P], the still image repeated T times along time) and normalised on the model's device.
"""

from __future__ import annotations

import torch
from torch import nn

from sde_ray.models.embedder import Embedder, host_fact, token_span, trim_padding, vision_keepalive

# Same image processor (Qwen2VLImageProcessor), patch layout, M-RoPE index and forward signature.
VLM_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def vlm_embed_dim(hf_config) -> int:
    return hf_config.text_config.hidden_size


def last_token_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, L, D] at each row's last position with attention_mask == 1 (left or right padding)."""
    length = attention_mask.shape[1]
    last = length - 1 - attention_mask.flip(1).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def pack_patches(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Padded per-row patches [B, max_patches, D] and grids [B, 3] → the rows' real patches
    concatenated in row order, [Σ t·h·w, D] (the Hugging Face processors' `pixel_values`). The grids
    are read on the host (a batch's per-row facts): the device only gathers the rows."""
    grid_thw = torch.as_tensor(grid_thw, device="cpu")
    counts = grid_thw.prod(dim=1)
    if counts.numel() and int(counts.max()) > pixel_values.shape[1]:
        raise ValueError(f"image_grid_thw {grid_thw.tolist()} needs more patches than the {pixel_values.shape[1]} stored.")
    used = torch.arange(pixel_values.shape[1], device="cpu") < counts[:, None]
    index = used.flatten().nonzero().squeeze(1).to(pixel_values.device)  # host-to-device: nothing waits
    return pixel_values.flatten(0, 1).index_select(0, index)


# A side's grid key suffix -> its patch column's suffix (images, and videos with model.video_frames).
GRID_PIXELS = {"_image_grid_thw": "_pixel_values", "_video_grid_thw": "_video_pixel_values"}


def trim_patches(batch: dict) -> dict:
    """The batch with each side's padded patch column cut to its largest image (`{side}_pixel_values`
    [..., max_patches, D] → [..., most patches of a row, D]; numpy or torch), so a host→device copy
    moves the batch's patches rather than max_pixels' worth per row. Other keys are untouched."""
    out = dict(batch)
    for key, grid in batch.items():
        grid_suffix = next((g for g in GRID_PIXELS if key.endswith(g)), None)
        if grid_suffix is None:
            continue
        pixels = key.removesuffix(grid_suffix) + GRID_PIXELS[grid_suffix]
        most = int(grid.prod(-1).max()) if grid.shape[0] else 0
        out[pixels] = batch[pixels][..., :most, :]
    return out


def vision_tensors(output) -> list[torch.Tensor]:
    """Every tensor a vision tower's output carries (pooled tokens, Qwen3-VL's deepstack features)."""
    found = []
    for value in (getattr(output, "pooler_output", output), getattr(output, "deepstack_features", None)):
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
    return found


class VLMEmbedder(Embedder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        vision = self.hf_model().config.vision_config
        self._patch = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        self._image_token_id = self.hf_model().config.image_token_id
        self._video_token_id = getattr(self.hf_model().config, "video_token_id", None)
        self._model_type = self.hf_model().config.model_type

    def _multimodal_model(self) -> nn.Module:
        # *ForConditionalGeneration.model is the *Model (vision tower + language model); calling it
        # skips the LM head, which an embedder never needs.
        return self.hf_model().model

    def normalize_patches(self, patches: torch.Tensor, key: str) -> torch.Tensor:
        """uint8 [N, C·P·P] → normalised [N, C·T·P·P] in the processor's layout (time repeated T times)."""
        patch, _, temporal = self._patch
        if patches.dtype != torch.uint8 or patches.dim() != 2 or patches.shape[1] != 3 * patch * patch:
            raise ValueError(
                f"model batch key '{key}': packed patches of dtype {patches.dtype}, shape {tuple(patches.shape)}; "
                f"expected uint8 rows of 3·{patch}·{patch} (build the batch with a BatchProcessor of this model)."
            )
        images = self.normalize_pixels(patches.view(-1, 3, patch, patch), key)
        return images.unsqueeze(2).expand(-1, 3, temporal, patch, patch).reshape(len(images), -1)

    def normalize_video_patches(self, patches: torch.Tensor, key: str) -> torch.Tensor:
        """uint8 [N, C·T·P·P] (T consecutive frames per patch) → normalised, same layout."""
        patch, _, temporal = self._patch
        if patches.dtype != torch.uint8 or patches.dim() != 2 or patches.shape[1] != 3 * temporal * patch * patch:
            raise ValueError(f"model batch key '{key}': video patches of dtype {patches.dtype}, shape "
                             f"{tuple(patches.shape)}; expected uint8 rows of 3·{temporal}·{patch}·{patch}.")
        frames = patches.view(-1, 3, temporal, patch, patch).transpose(1, 2).reshape(-1, 3, patch, patch)
        normalized = self.normalize_pixels(frames, key)
        return normalized.view(-1, temporal, 3, patch, patch).transpose(1, 2).reshape(len(patches), -1)

    def _visual_inputs(self, batch: dict, prefix: str, has_image: torch.Tensor, image_tokens: torch.Tensor,
                       video_tokens: torch.Tensor | None) -> tuple[list, list, list]:
        """The chunk's images then videos: ([normalised packed patches], [grids on device], [kinds]).
        The grids and `has_image` are read on the host; the token counts (on the device) are checked
        against them only when `inputs_checked` says so."""
        device = next(self.parameters()).device
        merge = self._patch[1] ** 2
        grid_all = host_fact(batch, f"{prefix}_image_grid_thw").long()
        expected = grid_all.prod(dim=1) // merge
        video_grid_all = None
        if video_tokens is not None:
            video_grid_all = host_fact(batch, f"{prefix}_video_grid_thw").long()
        visual = expected + (0 if video_grid_all is None else video_grid_all.prod(dim=1) // merge)
        if not torch.equal(visual > 0, has_image):  # host tensors: no sync
            raise ValueError(f"{prefix}: has_image {has_image.tolist()} does not match the grids {grid_all.tolist()}; "
                             "build the batch with a BatchProcessor of the same model config.")
        if not self.inputs_checked():
            self._check_visual_tokens(prefix, image_tokens, grid_all, video_tokens, video_grid_all)
        patches, grids, kinds = [], [], []
        pixel_key = f"{prefix}_pixel_values"
        rows = (grid_all.prod(dim=1) > 0).nonzero().squeeze(1)
        if rows.numel():
            patches.append(self.normalize_patches(pack_patches(torch.as_tensor(batch[pixel_key]), grid_all), pixel_key))
            grids.append(grid_all[rows].to(device))
            kinds.append("image")
        if video_grid_all is not None:
            video_rows = (video_grid_all.prod(dim=1) > 0).nonzero().squeeze(1)
            if video_rows.numel():
                key = f"{prefix}_video_pixel_values"
                packed = pack_patches(torch.as_tensor(batch[key]), video_grid_all)
                patches.append(self.normalize_video_patches(packed, key))
                grids.append(video_grid_all[video_rows].to(device))
                kinds.append("video")
        return patches, grids, kinds

    def _check_visual_tokens(self, prefix: str, image_tokens: torch.Tensor, grid_all: torch.Tensor,
                             video_tokens: torch.Tensor | None, video_grid_all: torch.Tensor | None) -> None:
        """Each row's image-pad (and video-pad) token count equals its grid's visual tokens (reads the
        device: see `Embedder.inputs_checked`)."""
        merge = self._patch[1] ** 2
        for name, tokens, grid in (("image", image_tokens, grid_all), ("video", video_tokens, video_grid_all)):
            if tokens is None:
                continue
            counts = tokens.sum(1).cpu()
            if not torch.equal(counts, grid.prod(dim=1) // merge):
                raise ValueError(
                    f"{prefix}: {name}-pad token counts {counts.tolist()} do not match the {name}s' grids "
                    f"{grid.tolist()}; build the batch with a BatchProcessor of the same model config."
                )

    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        device = next(self.parameters()).device
        grid_key = f"{prefix}_image_grid_thw"
        if grid_key not in batch:
            raise KeyError(f"model batch lacks '{grid_key}'; build it with a BatchProcessor of this VLM "
                           "(images at their own resolution, as patches with their grids).")
        input_ids, attention_mask, has_image = self.text_inputs(batch, prefix)
        input_ids, attention_mask = trim_padding(input_ids, attention_mask, token_span(batch, prefix, attention_mask))
        model = self._multimodal_model()
        image_tokens = input_ids == self._image_token_id
        video_tokens = None
        if f"{prefix}_video_grid_thw" in batch:
            if self._model_type == "qwen3_vl":
                raise ValueError("video input to Qwen3-VL is not supported yet (its processor interleaves frame "
                                 "timestamps as text); use a Qwen2-VL or Qwen2.5-VL backbone, or model.video_frames=0.")
            video_tokens = input_ids == self._video_token_id
        patches, grids, kinds = self._visual_inputs(batch, prefix, has_image, image_tokens, video_tokens)
        token_types = image_tokens.int() if video_tokens is None else image_tokens.int() + 2 * video_tokens.int()
        # One module order whatever the chunk holds: the vision tower first (the chunk's images and
        # videos in one call, or one blank merge cell when it has none), then the backbone (token
        # embedding, language model). ZeRO-3 records the order modules run in, fetches their
        # parameters with collectives in that order and asserts it is the same on every rank; so the
        # visual features are computed here and handed to the backbone (`mm_encoder_outputs`), never
        # inside the backbone's own call, which would enter the backbone before the vision tower on
        # visual chunks only. The tower treats every image and video as its own sequence, so one call
        # over both gives each the features a call of its own would.
        encoded, features_extra = None, 0.0
        grid = video_grid = None
        if patches:
            features = model.get_image_features(torch.cat(patches), torch.cat(grids))
            if kinds == ["image"]:
                encoded = {"image": features}  # whole, with Qwen3-VL's deepstack features
            else:  # Qwen2-VL / Qwen2.5-VL: pooled tokens only, split per kind
                pooled, split, encoded = list(features.pooler_output), 0, {}
                for kind, kind_grid in zip(kinds, grids):
                    encoded[kind] = type(features)(pooler_output=tuple(pooled[split:split + len(kind_grid)]))
                    split += len(kind_grid)
            grid = grids[kinds.index("image")] if "image" in kinds else None
            video_grid = grids[kinds.index("video")] if "video" in kinds else None
        else:
            patch, merge, temporal = self._patch
            cell = torch.tensor([[1, merge, merge]], device=device)
            blank = torch.zeros(1, merge * merge, 3 * temporal * patch * patch, device=device,
                                dtype=self.parameter_dtype())
            features_extra = vision_keepalive(lambda px: vision_tensors(model.get_image_features(px[0], cell)), blank)
        # Positions from the attention mask (pads skipped) for every batch, so a text-only row gets
        # the same positions whether or not other rows carry images.
        position_ids, _ = model.get_rope_index(
            input_ids, token_types, image_grid_thw=grid, video_grid_thw=video_grid, attention_mask=attention_mask
        )
        hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_grid_thw=grid,
            video_grid_thw=video_grid,
            mm_encoder_outputs=encoded,
            mm_token_type_ids=token_types,
            use_cache=False,
        ).last_hidden_state
        return last_token_pool(hidden, attention_mask) + features_extra
