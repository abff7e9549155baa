"""Video input to the Qwen2-VL family as video: temporal patches and video grids against the
Hugging Face Qwen2-VL image processor's own layout, and the embedder's video path (vision tower
first, features handed in) against the backbone's own `pixel_values_videos` forward."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.models import BatchProcessor, build_model
from sde_ray.models.processing import VIDEO_PAD
from sde_ray.models.vlm import last_token_pool


def frame(seed: int, height: int = 30, width: int = 44) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


FRAMES = [frame(i) for i in range(3)]


def hf_image_patches(processor: BatchProcessor, data: bytes, normalize: bool) -> np.ndarray:
    """The transformers image processor's patches of one frame, [N, C, T, P·P] (a still image is its
    frame repeated T times); geometry only (0..255) or fully normalised."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    switches = {} if normalize else {"do_rescale": False, "do_normalize": False}
    patches = processor.image_processor(images=[image], return_tensors="np", **switches)["pixel_values"]
    p, t = processor.geometry.patch_size, processor.geometry.temporal_patch_size
    return patches.reshape(len(patches), 3, t, p * p)


def hf_video_patches(processor: BatchProcessor, frames: list[bytes], normalize: bool) -> np.ndarray:
    """A video's patches built from the image processor's per-frame patches: temporal patch i takes
    frames 2i and 2i+1 (the last repeated for an odd count), in the video processor's order
    (time-major; each patch channel, time, pixels)."""
    frames = frames + frames[-1:] * (len(frames) % 2)
    per_frame = [hf_image_patches(processor, f, normalize)[:, :, 0] for f in frames]
    pairs = [np.stack(per_frame[i:i + 2], axis=2) for i in range(0, len(frames), 2)]
    return np.concatenate(pairs).reshape(sum(len(p) for p in pairs), -1)


@pytest.fixture(scope="module")
def video_config():
    return ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", video_frames=4)


def test_video_patches_follow_the_processor_layout(video_config):
    processor = BatchProcessor(video_config)
    out = processor.encode_inputs(["a video", "text only", "odd"], None, "pos",
                                  frames=[FRAMES[:2], [], FRAMES])
    grids = out["pos_video_grid_thw"]
    # 44×30 -> smart_resize (multiples of 16, at most 1024 pixels): 48×32 is over, scaled by
    # sqrt(1320/1024) and floored: 32×16 -> a 2×4 patch grid per temporal patch.
    assert grids.tolist() == [[1, 2, 4], [0, 0, 0], [2, 2, 4]]
    video = out["pos_video_pixel_values"]
    assert video.dtype == np.uint8 and video.shape == (3, processor.video.max_patches, 3 * 2 * 8 * 8)
    np.testing.assert_array_equal(video[0, :8], hf_video_patches(processor, FRAMES[:2], normalize=False))
    np.testing.assert_array_equal(video[2, :16], hf_video_patches(processor, FRAMES, normalize=False))
    assert not video[0, 8:].any() and not video[1].any()
    # The same frame twice is exactly the still image's patches (the image processor's T copies).
    twice = processor.encode_inputs(["x"], None, "pos", frames=[[FRAMES[0], FRAMES[0]]])["pos_video_pixel_values"]
    np.testing.assert_array_equal(twice[0, :8], hf_image_patches(processor, FRAMES[0], False).reshape(8, -1))
    # Tokens: one video-pad per merge cell (t·h·w / 4), inside the vision markers; has_image marks visual input.
    video_pad = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert (out["pos_input_ids"] == video_pad).sum(1).tolist() == [2, 0, 4]
    assert out["pos_has_image"].tolist() == [True, False, True]
    assert not out["pos_image_grid_thw"].any()


def test_total_pixels_bounded():
    # 8 frames sharing 8·256 pixels: each frame gets 2·8·256/8 = 512 (a temporal patch spends one frame's
    # tokens on two frames); 44×30 scaled by sqrt(1320/512) and floored -> 16×16 -> 2×2 patches.
    config = ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", video_frames=8, video_max_pixels=8 * 256)
    processor = BatchProcessor(config)
    assert processor.video.frame_max_pixels == 512
    grid = processor.encode_inputs(["v"], None, "qry", frames=[FRAMES * 2 + FRAMES[:2]])["qry_video_grid_thw"]
    assert grid.tolist() == [[4, 2, 2]]
    assert processor.video.max_tokens == 4 * 512 // 256
    with pytest.raises(ValueError, match="video_frames=0"):
        BatchProcessor(ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl")).encode_inputs(
            ["v"], None, "qry", frames=[FRAMES])


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_video_embedding_equals_the_backbones_own_video_forward(name):
    config = ModelConfig(kind="vlm", name_or_path=name, video_frames=4)
    processor = BatchProcessor(config)
    torch.manual_seed(0)
    model = build_model(config).eval()
    image = frame(7, 24, 40)
    out = processor.encode_inputs(["<|image_1|> a picture", "a clip", "words", "another clip"],
                                  [image, None, None, None], "qry", frames=[[], FRAMES[:2], [], FRAMES])
    batch = {k: torch.as_tensor(v) for k, v in out.items()}
    with torch.no_grad():
        ours = model.encode_side(batch, "qry")
        # Reference: the backbone's own forward, pixels normalised by the transformers image processor,
        # positions from its own M-RoPE with the processor's token types (image 1, video 2).
        ids, mask = batch["qry_input_ids"], batch["qry_attention_mask"]
        video_pad = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        types = (ids == model.hf_model().config.image_token_id).int() + 2 * (ids == video_pad).int()
        pixel_values_videos = torch.as_tensor(np.concatenate([hf_video_patches(processor, FRAMES[:2], True),
                                                              hf_video_patches(processor, FRAMES, True)]))
        pixel_values = torch.as_tensor(hf_image_patches(processor, image, True).reshape(-1, 3 * 2 * 64))
        hidden = model.hf_model().model(
            input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
            image_grid_thw=batch["qry_image_grid_thw"][:1], pixel_values_videos=pixel_values_videos,
            video_grid_thw=batch["qry_video_grid_thw"][[1, 3]], mm_token_type_ids=types, use_cache=False,
        ).last_hidden_state
        reference = last_token_pool(hidden, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours[1], ours[3], atol=1e-3)  # the two clips are told apart
