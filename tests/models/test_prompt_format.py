"""model.prompt_format=chat against a hand-built reference: the tokens are the Qwen chat turns written
out by hand (the query's instruction in the system turn, none on candidates, the instruction ending
in punctuation, the content stripped), and the pooled vector is the backbone's own forward of those
tokens with the transformers image processor's pixels, at the last token, after the final norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import ModelConfig
from sde_ray.models import BatchProcessor, build_model

DEFAULT = "Represent the user's input."


def chat(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def block(tokens: int) -> str:
    return "<|vision_start|>" + "<|image_pad|>" * tokens + "<|vision_end|>"


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_chat_format_tokens_and_pooled_vector_equal_a_hand_built_reference(name):
    config = ModelConfig(kind="vlm", name_or_path=name, image_size=48, prompt_format="chat", max_text_length=160)
    processor = BatchProcessor(config)
    model = build_model(config).eval()
    wide, square = Image.new("RGB", (64, 16), "teal"), Image.new("RGB", (48, 48), "red")  # 4×1 and 3×3 cells
    sides = {
        "qry": (["<|image_1|>\nRepresent the given image with the following question: What is in the image?\n",
                 "<|image_1|>\nRepresent the given image for classification\n",
                 "Find me an everyday image that matches the given caption: a blue square.  "],
                [wide, square, None],
                [chat("Represent the given image with the following question:", block(4) + "What is in the image?"),
                 chat("Represent the given image for classification.", block(9)),
                 chat("Find me an everyday image that matches the given caption:", "a blue square.")]),
        "pos": (["<|image_1|>\nRepresent the given image.\n", "Answer: a red circle\n"],
                [square, None],
                [chat(DEFAULT, block(9)), chat(DEFAULT, "Answer: a red circle")]),
    }
    hf = model.hf_model()
    norm_inputs = []
    hook = hf.model.language_model.norm.register_forward_hook(lambda m, args, out: norm_inputs.append(args[0]))
    try:
        for prefix, (texts, images, references) in sides.items():
            out = processor.encode_inputs(texts, images, prefix)
            with torch.no_grad():
                features = model.encode_side({k: torch.as_tensor(v) for k, v in out.items()}, prefix)
            for row, reference in enumerate(references):
                ids = processor.tokenizer(reference, add_special_tokens=False)["input_ids"]
                ours = out[f"{prefix}_input_ids"][row][out[f"{prefix}_attention_mask"][row] == 1].tolist()
                assert ours == ids, (prefix, row, processor.tokenizer.decode(ours))
                kwargs = {}
                if images[row] is not None:
                    pixels = processor.image_processor(images=[images[row]], return_tensors="pt")
                    kwargs = {key: pixels[key] for key in ("pixel_values", "image_grid_thw")}
                ids = torch.tensor([ids])
                norm_inputs.clear()
                with torch.no_grad():
                    hidden = hf.model(input_ids=ids, mm_token_type_ids=(ids == hf.config.image_token_id).int(),
                                      use_cache=False, **kwargs).last_hidden_state
                torch.testing.assert_close(features[row], hidden[0, -1], rtol=1e-4, atol=1e-4)
                # After the final norm: the state before it is another vector.
                before_norm = norm_inputs[-1][0, -1]
                assert not torch.allclose(features[row], before_norm, atol=1e-2)
                torch.testing.assert_close(hf.model.language_model.norm(before_norm[None])[0], features[row],
                                           rtol=1e-4, atol=1e-4)
    finally:
        hook.remove()


def test_vlm2vec_format_is_unchanged_and_chat_is_vlm_only():
    config = ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl")
    out = BatchProcessor(config).encode_inputs(["<|image_1|>\nRepresent the given image.\n"],
                                               [Image.new("RGB", (32, 32))], "pos")
    tokenizer = BatchProcessor(config).tokenizer
    ours = out["pos_input_ids"][0][out["pos_attention_mask"][0] == 1].tolist()
    assert ours == tokenizer(block(4) + "\nRepresent the given image.\n", add_special_tokens=False)["input_ids"]
    from sde_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.prompt_format=chat"):
        load_config(None, ["model.prompt_format=chat"])
    assert np.array_equal(out["pos_image_grid_thw"], [[1, 4, 4]])
