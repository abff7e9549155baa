"""Encoders: features, gradients, fusion, pooling against manual computations, LoRA, gradient
checkpointing, bf16, seeding, export round trips and clear errors."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sde_ray.config import LoraConfig, ModelConfig
from sde_ray.models import (
    BatchProcessor,
    build_model,
    count_parameters,
    last_token_pool,
    load_pretrained,
    pack_patches,
)


def processed(config: ModelConfig, raw: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in BatchProcessor(config)(raw).items()}


def test_features_are_finite_and_gradients_reach_every_parameter(tiny_config, raw):
    model = build_model(tiny_config)
    batch = processed(tiny_config, raw)
    query, target = model(batch)
    rows = len(raw["qry_text"])
    assert query.shape == target.shape == (rows, model.embed_dim)
    assert torch.isfinite(query).all() and torch.isfinite(target).all()
    (query.square().sum() + target.square().sum()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None] == []
    named = dict(trainable)
    text_embedding = next(p for n, p in named.items() if "embed_tokens" in n or "token_embedding" in n)
    patch_embedding = next(p for n, p in named.items() if "patch_embed" in n)
    assert text_embedding.grad.abs().sum() > 0 and patch_embedding.grad.abs().sum() > 0


def test_batch_without_any_image_still_touches_the_vision_tower(tiny_config, raw):
    """Every rank must run the same modules (ZeRO-3) and give every parameter a gradient."""
    text_only = dict(raw, qry_image=[None] * 6, pos_image=[None] * 6)
    model = build_model(tiny_config)
    query, target = model(processed(tiny_config, text_only))
    (query.sum() + target.sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with_images = model(processed(tiny_config, raw))
    # Row 3 is text-only in both batches: its features must not depend on the other rows' images.
    torch.testing.assert_close(query[3], with_images[0][3], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-clip", "tiny-siglip"])
def test_dual_encoder_fuses_text_and_image_by_sum(name, tiny_configs, make_png):
    config = tiny_configs[name]
    model = build_model(config).eval()
    processor = BatchProcessor(config)
    prompt = "<|image_1|>\nRepresent the given image with the following question: what is it?\n"
    image = make_png("cyan", "square")
    both = {k: torch.as_tensor(v) for k, v in processor.encode_inputs([prompt], [image], "qry").items()}
    text = {k: torch.as_tensor(v) for k, v in processor.encode_inputs([prompt], [None], "qry").items()}
    with torch.no_grad():
        fused = model.encode_side(both, "qry")
        text_only = model.encode_side(text, "qry")
        # The image term from the family processor's own normalised pixels, not ours.
        reference_pixels = processor.image_processor(
            images=[Image.open(io.BytesIO(image)).convert("RGB")], return_tensors="pt"
        )["pixel_values"]
        image_only = model.backbone.get_image_features(pixel_values=reference_pixels).pooler_output
        reference_text = model.backbone.get_text_features(
            input_ids=text["qry_input_ids"], attention_mask=text["qry_attention_mask"]
        ).pooler_output  # untrimmed, full fixed-length padding
    torch.testing.assert_close(fused, text_only + image_only, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(text_only, reference_text, rtol=1e-5, atol=1e-5)


def test_last_token_pool_matches_a_loop_for_left_and_right_padding():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 7, 5, generator=generator)
    lengths = [7, 3, 1, 5]
    for left in (False, True):
        mask = torch.zeros(4, 7, dtype=torch.long)
        for row, length in enumerate(lengths):
            if left:
                mask[row, 7 - length :] = 1
            else:
                mask[row, :length] = 1
        expected = torch.stack([hidden[row, (6 if left else lengths[row] - 1)] for row in range(4)])
        torch.testing.assert_close(last_token_pool(hidden, mask), expected)


@pytest.mark.parametrize("name,padding_side", [("tiny-qwen2-vl", "left"), ("tiny-qwen2-vl", "right"),
                                               ("tiny-qwen2.5-vl", "left"), ("tiny-qwen3-vl", "left")])
def test_vlm_embedding_is_the_last_real_token_of_an_unpadded_run(name, padding_side, raw, make_png):
    """Each row embedded in a padded batch of mixed image sizes equals the backbone's last hidden
    state (after the final norm) at the final token of that row run alone without padding: a manual
    computation through plain HF calls, with the transformers image processor's own patches."""
    config = ModelConfig(kind="vlm", name_or_path=name, image_size=48)
    model = build_model(config).eval()
    processor = BatchProcessor(config)
    processor.tokenizer.padding_side = padding_side
    images = list(raw["qry_image"])
    images[0], images[4] = make_png("red", size=48), Image.new("RGB", (60, 20), "navy")  # 9 and 4×1 cells
    side = processor.encode_inputs(raw["qry_text"], images, "qry")
    batch = {k: torch.as_tensor(v) for k, v in side.items()}
    mask = batch["qry_attention_mask"]
    assert (mask[:, -1 if padding_side == "left" else 0] == 1).all() and (mask == 0).any()
    assert len({tuple(g) for g in side["qry_image_grid_thw"][side["qry_has_image"]].tolist()}) == 3
    with torch.no_grad():
        features = model.encode_side(batch, "qry")
    hf = model.hf_model()
    for row in range(len(raw["qry_text"])):
        ids = batch["qry_input_ids"][row][mask[row] == 1][None]
        kwargs = {}
        if batch["qry_has_image"][row]:
            image = images[row] if isinstance(images[row], Image.Image) else Image.open(io.BytesIO(images[row]))
            reference = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
            kwargs = {key: reference[key] for key in ("pixel_values", "image_grid_thw")}
        token_types = (ids == hf.config.image_token_id).int()
        with torch.no_grad():
            out = hf(
                input_ids=ids,
                mm_token_type_ids=token_types,
                output_hidden_states=True,
                use_cache=False,
                **kwargs,
            )
        torch.testing.assert_close(features[row], out.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-4)


def test_lora_leaves_only_adapters_trainable(tiny_config, raw):
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    config = dataclasses.replace(tiny_config, lora=lora)
    model = build_model(config, seed=3)
    plain = build_model(tiny_config, seed=3)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    counts = count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in trainable.values())
    assert counts["total"] == count_parameters(plain)["total"] + counts["trainable"]
    batch = processed(config, raw)
    query, target = model(batch)
    with torch.no_grad():  # B = 0 at init: same function as the backbone without adapters
        torch.testing.assert_close(query, plain(batch)[0], rtol=1e-4, atol=1e-5)
    (query.square().sum() + target.square().sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_lora_with_unknown_target_modules_is_a_clear_error(tiny_configs):
    config = dataclasses.replace(
        tiny_configs["tiny-clip"], lora=LoraConfig(enabled=True, target_modules=["qkv_proj", "gate_up_proj"])
    )
    with pytest.raises(ValueError, match=r"model.lora.target_modules.*out_proj"):
        build_model(config)


def test_gradient_checkpointing_gives_the_same_features_and_gradients(tiny_config, raw):
    batch = processed(tiny_config, raw)
    results = []
    for checkpointing in (False, True):
        model = build_model(
            dataclasses.replace(tiny_config, gradient_checkpointing=checkpointing), seed=1
        ).train()
        query, target = model(batch)
        (query.square().sum() + target.square().sum()).backward()
        results.append((query.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_with_lora_trains_the_adapters(tiny_configs, raw):
    """Frozen inputs under LoRA: the non-reentrant checkpointing still passes gradients through."""
    config = dataclasses.replace(
        tiny_configs["tiny-qwen2-vl"],
        gradient_checkpointing=True,
        lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0),
    )
    model = build_model(config).train()
    query, target = model(processed(config, raw))
    (query.square().sum() + target.square().sum()).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_bf16_forward_and_backward(tiny_config, raw):
    model = build_model(tiny_config, seed=2)
    batch = processed(tiny_config, raw)  # uint8 pixels, as the data pipeline gives them
    with torch.no_grad():
        reference = model(batch)[0]
    model = model.to(torch.bfloat16)
    query, target = model(batch)
    assert query.dtype == torch.bfloat16 and torch.isfinite(query.float()).all()
    (query.float().square().sum() + target.float().square().sum()).backward()
    cosine = torch.nn.functional.cosine_similarity(query.detach().float(), reference, dim=-1)
    assert cosine.min() > 0.98


def test_seed_fixes_initialisation_without_touching_the_global_rng(tiny_configs):
    config = tiny_configs["tiny-clip"]
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(config, seed=7)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)
    b = build_model(config, seed=7)
    c = build_model(config, seed=8)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_count_parameters_matches_a_manual_count(tiny_configs):
    model = build_model(tiny_configs["tiny-clip"])
    counts = count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # CLIP's own logit scale is unused by the embedder and frozen.
    assert counts["trainable"] == counts["total"] - 1


@pytest.mark.parametrize("lora", [False, True])
def test_save_pretrained_round_trip_gives_identical_embeddings(
    lora, tiny_config, raw, tmp_path, arrays_equal
):
    config = tiny_config
    if lora:
        config = dataclasses.replace(config, lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    model = build_model(config, seed=5)
    if lora:  # move the adapters away from their zero init so the merge matters
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05)
    model.eval()
    batch = processed(config, raw)
    with torch.no_grad():
        expected = model(batch)
    model.save_pretrained(tmp_path / "export")
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n) == lora  # adapters kept

    reloaded, reloaded_config = load_pretrained(tmp_path / "export")
    assert reloaded_config.name_or_path == str((tmp_path / "export").resolve())
    assert reloaded_config.kind == config.kind and not reloaded_config.lora.enabled
    assert reloaded.embed_dim == model.embed_dim and not reloaded.training
    processor = BatchProcessor(reloaded_config)  # reads the saved tokenizer/processor
    new_batch = processor(raw)
    assert new_batch["qry_pixel_values"].dtype == batch["qry_pixel_values"].numpy().dtype == "uint8"
    assert arrays_equal({k: v.numpy() for k, v in batch.items()}, new_batch)
    # The reloaded image processor gives the model the same constants: bit-identical model pixels.
    assert reloaded.pixel_normalization == model.pixel_normalization
    for side in ("qry", "pos"):
        pixels = torch.as_tensor(new_batch[f"{side}_pixel_values"])
        if config.kind == "vlm":  # packed patches, normalised as [N, 3, P, P]
            pixels = pack_patches(pixels, torch.as_tensor(new_batch[f"{side}_image_grid_thw"])).view(-1, 3, 8, 8)
        assert torch.equal(reloaded.normalize_pixels(pixels), model.normalize_pixels(pixels))
    with torch.no_grad():
        got = reloaded({k: torch.as_tensor(v) for k, v in new_batch.items()})
    # Not bit-equal even without LoRA: the reloaded CLIP vision tower differs by ~2e-7 on the same
    # normalised input with equal weights (a backbone matter, not the pixels).
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_export_is_a_plain_transformers_folder(tiny_configs, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoTokenizer

    for name, auto in (("tiny-clip", AutoModel), ("tiny-qwen2-vl", AutoModelForImageTextToText)):
        model = build_model(tiny_configs[name])
        folder = tmp_path / name
        model.save_pretrained(folder)
        hf = auto.from_pretrained(folder)
        state = model.hf_model().state_dict()
        for key, value in hf.state_dict().items():
            assert torch.equal(value, state[key]), key
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.get_vocab() == model.tokenizer.get_vocab()
        assert tokenizer.padding_side == model.tokenizer.padding_side
        assert AutoImageProcessor.from_pretrained(folder).to_dict() == model.image_processor.to_dict()


def test_configuration_errors_are_clear(tiny_configs, tmp_path):
    with pytest.raises(ValueError, match="is a vlm model but model.kind=dual_encoder"):
        build_model(ModelConfig(kind="dual_encoder", name_or_path="tiny-qwen2-vl"))
    with pytest.raises(OSError, match="model.name_or_path='/no/such/model'"):
        build_model(ModelConfig(name_or_path="/no/such/model"))
    with pytest.raises(FileNotFoundError, match="sde_ray_model.json"):
        load_pretrained(tmp_path)
    # A saved CLIP loaded as a VLM is refused by model type before any weights load.
    build_model(tiny_configs["tiny-clip"]).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="'clip' model; model.kind=vlm supports qwen2_vl, qwen2_5_vl"):
        build_model(ModelConfig(kind="vlm", name_or_path=str(tmp_path / "clip")))
    with pytest.raises(ValueError, match="max_text_length=64 exceeds"):
        build_model(ModelConfig(name_or_path=str(tmp_path / "clip"), max_text_length=64))
    batch = {
        k: torch.as_tensor(v)
        for k, v in BatchProcessor(tiny_configs["tiny-clip"])
        .encode_inputs(["x"], None, "qry")
        .items()
    }
    with pytest.raises(KeyError, match="pos_input_ids"):
        build_model(tiny_configs["tiny-clip"])(batch)


def test_vlm_rejects_grids_that_do_not_match_the_image_tokens(tiny_configs, raw):
    config = tiny_configs["tiny-qwen2-vl"]
    batch = processed(config, raw)
    other = processed(dataclasses.replace(config, min_pixels=48 * 48, max_pixels=48 * 48), raw)  # 9 tokens, not 4
    model = build_model(config)
    with pytest.raises(ValueError, match="image-pad token counts"):
        model.encode_side(dict(batch, qry_image_grid_thw=other["qry_image_grid_thw"]), "qry")
    with pytest.raises(KeyError, match="qry_image_grid_thw"):
        model.encode_side({k: v for k, v in batch.items() if k != "qry_image_grid_thw"}, "qry")


@pytest.mark.parametrize("name,model_type", [("tiny-qwen2-vl", "qwen2_vl"), ("tiny-qwen2.5-vl", "qwen2_5_vl"),
                                             ("tiny-qwen3-vl", "qwen3_vl")])
def test_a_checkpoint_folder_loads_through_from_pretrained(name, model_type, raw, tmp_path):
    """A non-tiny name: a folder as a Hub download holds it (the backbone's own save_pretrained, the
    tokenizer, the image processor; no sde_ray files) goes through AutoConfig /
    AutoModelForImageTextToText / AutoTokenizer / AutoImageProcessor and embeds as the model it holds."""
    from sde_ray.models.tiny import save_tiny_checkpoint

    tiny = ModelConfig(kind="vlm", name_or_path=name)
    folder = tmp_path / model_type
    torch.manual_seed(0)
    save_tiny_checkpoint(name, tiny, folder)
    assert not (folder / "sde_ray_model.json").exists()

    config = ModelConfig(kind="vlm", name_or_path=str(folder))
    model = build_model(config)
    assert model.hf_model().config.model_type == model_type and model.embed_dim == 64
    batch = processed(config, raw)
    assert torch.equal(batch["qry_input_ids"], processed(tiny, raw)["qry_input_ids"])
    query, target = model(batch)
    reference = build_model(tiny, seed=0)  # the same weights as the backbone that was saved
    for (key, loaded), (_, saved) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(loaded, saved), key
    assert torch.isfinite(query).all() and torch.isfinite(target).all()
    (query.square().sum() + target.square().sum()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trimmed_patches_give_the_same_features(raw, make_png):
    """`trim_patches` cuts the padded patch columns to the batch's largest image (what crosses to the
    device) and changes no feature; the negatives' [B, K, ...] columns are cut alike."""
    from sde_ray.models.vlm import trim_patches

    config = ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", image_size=64)
    raw = dict(raw, qry_image=[make_png("red", size=32)] + raw["qry_image"][1:])
    batch = processed(config, raw)
    trimmed = trim_patches(batch)
    assert batch["qry_pixel_values"].shape[1] == 64 and trimmed["qry_pixel_values"].shape[1] == 16
    assert trimmed["pos_pixel_values"].shape[1] == 16
    negatives = {"neg_pixel_values": np.zeros((2, 3, 64, 192), np.uint8),
                 "neg_image_grid_thw": np.array([[[1, 2, 4]] * 3, [[0, 0, 0]] * 3])}
    assert trim_patches(negatives)["neg_pixel_values"].shape == (2, 3, 8, 192)
    model = build_model(config).eval()
    with torch.no_grad():
        for side in ("qry", "pos"):
            assert torch.equal(model.encode_side(batch, side), model.encode_side(trimmed, side))
