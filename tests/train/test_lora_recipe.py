"""The LoRA recipes' ZeRO stage: ZeRO-1, which reduces gradients once per optimizer step (at the
accumulation boundary) where ZeRO-2 reduces at every GradCache chunk. Its GradCache step must give
the gradients of one plain autograd pass over the whole batch (test_gradcache's exact-Adam
reference), on a real engine in this process, the recipes must validate with it, and the reductions
per step are counted by torch's profiler, not taken from DeepSpeed's source."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


@pytest.mark.parametrize("recipe", ["mmeb_qwen2vl.yaml", "mmeb_qwen3vl.yaml"])
def test_lora_recipes_validate_on_zero_1(recipe):
    from sde_ray.config import load_config

    config = load_config(str(REPO / "configs" / recipe), [])
    assert config.model.lora.enabled and config.deepspeed.zero_stage == 1


@pytest.mark.parametrize("by_tokens", [False, True], ids=["rows", "tokens"])
def test_a_zero_1_lora_gradcache_step_equals_one_plain_pass(process_group, data_cache, by_tokens):
    """2 chunks of rows, or chunks by a token budget (the recipes' `train.chunk_tokens`: DeepSpeed's
    accumulation boundary is then the step's own)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import test_gradcache as helpers
    import torch

    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine
    from sde_ray.train.step import padded_tokens, row_spans, token_budget_sizes, train_step

    lora = ["deepspeed.zero_stage=1", "model.lora.enabled=true", "model.lora.dropout=0.0"]
    batch = helpers.local_batches(data_cache, "dual_encoder", 1, helpers.ROWS)[0]
    budget = padded_tokens(row_spans(batch)) // 3 if by_tokens else 0  # a third of one chunk of all rows
    chunks = len(token_budget_sizes(row_spans(batch), budget, helpers.ROWS)) if by_tokens else 2
    config = helpers.case_config(data_cache, "dual_encoder", "sde", helpers.ROWS // 2, *lora,
                                 f"train.chunk_tokens={budget}")
    module = helpers.build_module(config, 0.0)
    before = helpers.trainable(module)
    engine = build_engine(module, build_deepspeed_config(config, 1))
    torch.manual_seed(5)
    result = train_step(engine, batch, helpers.step_context(batch, 0, 1), helpers.ROWS // 2 if not by_tokens
                        else helpers.ROWS, 1, budget)
    assert result.finite and result.chunks == chunks >= 2 and engine.global_steps == 1
    want_loss, want = helpers.reference(helpers.case_config(data_cache, "dual_encoder", "sde", 0, *lora),
                                        batch, helpers.ROWS, 0.0, rng_seed=5)
    assert abs(result.loss - want_loss) <= helpers.RTOL_LOSS * abs(want_loss)
    helpers.assert_deltas(before, helpers.trainable(engine.module), want)


def _all_reduces_in_one_step(helpers, data_cache, batch, stage: int, chunks: int) -> int:
    """gloo all-reduces one GradCache step issues (after a warm-up step), counted by torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    from sde_ray.train.deepspeed_config import build_deepspeed_config
    from sde_ray.train.engine import build_engine
    from sde_ray.train.step import train_step

    lora = [f"deepspeed.zero_stage={stage}", "model.lora.enabled=true", "model.lora.dropout=0.0"]
    config = helpers.case_config(data_cache, "dual_encoder", "sde", helpers.ROWS // chunks, *lora)
    engine = build_engine(helpers.build_module(config, 0.0), build_deepspeed_config(config, 1))
    step = lambda: train_step(engine, batch, helpers.step_context(batch, 0, 1), helpers.ROWS // chunks, 1)  # noqa: E731
    step()  # buffers and hooks set up outside the count
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    return sum(1 for event in profiler.events() if event.name == "gloo:all_reduce")


def test_zero_1_reduces_once_per_step_where_zero_2_reduces_per_chunk(process_group, data_cache):
    """The recipes' reason for ZeRO-1, measured: the collectives torch's profiler sees in one step
    (the process group has one rank, but DeepSpeed issues every collective all the same). ZeRO-1's
    count does not depend on the number of GradCache chunks; ZeRO-2's grows with each chunk."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import test_gradcache as helpers

    batch = helpers.local_batches(data_cache, "dual_encoder", 1, helpers.ROWS)[0]
    zero_1 = [_all_reduces_in_one_step(helpers, data_cache, batch, 1, chunks) for chunks in (1, 4)]
    zero_2 = [_all_reduces_in_one_step(helpers, data_cache, batch, 2, chunks) for chunks in (1, 4)]
    assert zero_1[0] == zero_1[1], zero_1
    assert zero_2[1] - zero_2[0] == 3, zero_2  # one more reduction for each chunk after the first
