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

from sde_ray.models.embedder import Embedder, trim_padding, vision_keepalive

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
    concatenated in row order, [Σ t·h·w, D] (the Hugging Face processors' `pixel_values`)."""
    counts = grid_thw.prod(dim=1).to(pixel_values.device)
    if counts.numel() and int(counts.max()) > pixel_values.shape[1]:
        raise ValueError(f"image_grid_thw {grid_thw.tolist()} needs more patches than the {pixel_values.shape[1]} stored.")
    used = torch.arange(pixel_values.shape[1], device=pixel_values.device) < counts[:, None]
    return pixel_values[used]


def trim_patches(batch: dict) -> dict:
    """The batch with each side's padded patch column cut to its largest image (`{side}_pixel_values`
    [..., max_patches, D] → [..., most patches of a row, D]; numpy or torch), so a host→device copy
    moves the batch's patches rather than max_pixels' worth per row. Other keys are untouched."""
    out = dict(batch)
    for key, grid in batch.items():
        if not key.endswith("_image_grid_thw"):
            continue
        pixels = f"{key.removesuffix('_image_grid_thw')}_pixel_values"
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

    def encode_side(self, batch: dict, prefix: str) -> torch.Tensor:
        device = next(self.parameters()).device
        grid_key, pixel_key = f"{prefix}_image_grid_thw", f"{prefix}_pixel_values"
        if grid_key not in batch:
            raise KeyError(f"model batch lacks '{grid_key}'; build it with a BatchProcessor of this VLM "
                           "(images at their own resolution, as patches with their grids).")
        input_ids, attention_mask, has_image = self.text_inputs(batch, prefix)
        input_ids, attention_mask = trim_padding(input_ids, attention_mask)
        grid_all = torch.as_tensor(batch[grid_key]).long()
        model = self._multimodal_model()
        image_tokens = input_ids == self._image_token_id
        expected = grid_all.prod(dim=1).to(device) // self._patch[1] ** 2
        if not torch.equal(image_tokens.sum(1), expected) or not torch.equal(expected > 0, has_image):
            raise ValueError(
                f"{prefix}: image-pad token counts {image_tokens.sum(1).tolist()} do not match the images' grids "
                f"{grid_all.tolist()} (has_image {has_image.tolist()}); build the batch with a BatchProcessor of "
                "the same model config."
            )
        rows = has_image.nonzero().squeeze(1)
        grid = None
        token_types = image_tokens.int()
        # One module order whatever the chunk holds: the vision tower first (the chunk's images, or one
        # blank merge cell when it has none), then the backbone (token embedding, language model).
        # ZeRO-3 records the order modules run in, fetches their parameters with collectives in that
        # order and asserts it is the same on every rank; so the image features are computed here and
        # handed to the backbone (`mm_encoder_outputs`), never inside the backbone's own call, which
        # would enter the backbone before the vision tower on image chunks only.
        encoded, features_extra = None, 0.0
        if rows.numel():
            # Only real patches cross to the device: rows are padded to the largest allowed image.
            grid = grid_all[rows.cpu()].to(device)
            packed = pack_patches(torch.as_tensor(batch[pixel_key]), grid_all)
            encoded = {"image": model.get_image_features(self.normalize_patches(packed, pixel_key), grid)}
        else:
            patch, merge, temporal = self._patch
            cell = torch.tensor([[1, merge, merge]], device=device)
            blank = torch.zeros(1, merge * merge, 3 * temporal * patch * patch, device=device,
                                dtype=self.parameter_dtype())
            features_extra = vision_keepalive(lambda px: vision_tensors(model.get_image_features(px[0], cell)), blank)
        # Positions from the attention mask (pads skipped) for every batch, so a text-only row gets
        # the same positions whether or not other rows carry images.
        position_ids, _ = model.get_rope_index(
            input_ids, token_types, image_grid_thw=grid, attention_mask=attention_mask
        )
        hidden = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_grid_thw=grid,
            mm_encoder_outputs=encoded,
            mm_token_type_ids=token_types,
            use_cache=False,
        ).last_hidden_state
        return last_token_pool(hidden, attention_mask) + features_extra
