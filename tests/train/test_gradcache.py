"""GradCache (`sde_ray.train.step.train_step`) against plain autograd, on real DeepSpeed engines.

Every engine runs AdamW with lr = 1, eps = 1, no weight decay, no clipping and a constant schedule,
so one optimizer step moves each parameter by exactly Δθ = −g / (|g| + 1) (first Adam step: the
bias-corrected moments are g and g²). That map is one-to-one and not scale-invariant, so comparing
Δθ compares the gradients themselves, including their scale (a loss divided by DeepSpeed's
accumulation factor, or a missing objective-parameter gradient, would show). Tolerance: every
|Δθ − Δθ_ref| ≤ 2e-5 and the loss to 1e-5 relative, fp32 throughout (the worst deviation seen is
~2e-7).

The reference is a plain torch module (no DeepSpeed, no Ray, no GradCache): the local batch
encoded in one graph, the objective, `loss.backward()`. With dropout on, a chunked forward draws
other masks than one forward over all rows, so the reference builds its one graph chunk by chunk
from the same RNG state, drawing exactly the masks the cached pass drew; the step must replay them
in its second forward, or its gradients differ. With dropout off, the reference is literally one
forward over the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from sde_ray.config import Config, load_config
from sde_ray.losses import OBJECTIVES, StepContext

pytestmark = [pytest.mark.ray]

ROWS = 8  # the local batch of one worker
DROPOUT = 0.1
ATOL, RTOL_LOSS = 2e-5, 1e-5
BF16_LORA = ["deepspeed.precision=bf16", "deepspeed.zero_stage=2", "model.lora.enabled=true"]
MODELS = {"dual_encoder": ["model.kind=dual_encoder", "model.name_or_path=tiny-clip"],
          "vlm": ["model.kind=vlm", "model.name_or_path=tiny-qwen2-vl"]}
# Adam's first step as a readable function of the gradient (see the module docstring).
EXACT_ADAM = ['train.lr=1.0', 'train.weight_decay=0.0', 'train.grad_clip=0.0', 'train.lr_schedule=constant',
              'deepspeed.overrides={"optimizer": {"params": {"eps": 1.0}}, "scheduler": {"params": {"warmup_min_lr": 1.0}}}']


def case_config(data_cache, model: str, loss: str, chunk: int, *extra: str, workers: int = 1) -> Config:
    return load_config(None, [
        "data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64",
        f"data.cache_dir={data_cache}", "logging.wandb=false", f"scaling.num_workers={workers}",
        f"train.global_batch_size={ROWS * workers}", f"train.micro_batch_size={chunk}",
        f"loss.name={loss}", "loss.learnable_temperature=true", *MODELS[model], *EXACT_ADAM, *extra])


def set_dropout(module: torch.nn.Module, p: float) -> None:
    """Dropout probability `p` on every nn.Dropout and every attention's dropout attribute."""
    for child in module.modules():
        if isinstance(child, torch.nn.Dropout):
            child.p = p
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(child, name, None), float):
                setattr(child, name, p)


def build_module(config: Config, dropout: float):
    from sde_ray.train.loop import build_train_module, seed_everything

    seed_everything(config.train.seed)
    module = build_train_module(config)
    set_dropout(module, dropout)
    return module.train()


def step_context(batch: dict, rank: int, world_size: int) -> StepContext:
    return StepContext(progress=0.3, rank=rank, world_size=world_size, training=True,
                       target_ids=batch.get("target_id"), generator=torch.Generator().manual_seed(11))


def trainable(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def reference(config: Config, batch: dict, chunk: int, dropout: float, rng_seed: int) -> tuple[float, dict]:
    """(loss, expected Δθ) of one plain full-batch forward/backward (one graph, built chunk-wise)."""
    module = build_module(config, dropout)
    torch.manual_seed(rng_seed)
    rows = len(batch["target_id"])
    parts = [module({k: v[i:i + chunk] for k, v in batch.items()}) for i in range(0, rows, chunk)]
    query, target = torch.cat([q for q, _ in parts]), torch.cat([t for _, t in parts])
    loss, _ = module.objective(query, target, step_context(batch, 0, 1))
    loss.backward()
    deltas = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            deltas[name] = -grad / (grad.abs() + 1.0)
    return float(loss.detach()), deltas


def assert_deltas(before: dict, after: dict, expected: dict) -> None:
    assert set(expected) <= set(after)
    for name, want in expected.items():
        got = after[name].reshape(want.shape) - before[name].reshape(want.shape)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# The Ray Train side: one worker function runs a list of cases on fresh engines.


def run_cases(loop_config: dict) -> None:
    """Each case: a fresh module and engine, `train_step` on this rank's rows, the weights after."""
    import os

    import ray.train

    from sde_ray.config import from_dict
    from sde_ray.distributed import all_gather_object
    from sde_ray.train.checkpoint import consolidated_state_dict
    from sde_ray.train.deepspeed_config import build_deepspeed_config, chunk_size, local_batch_size
    from sde_ray.train.loop import build_engine
    from sde_ray.train.step import train_step

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)  # a busy 2-core box: one thread per worker is the fast setting
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    results = []
    for case in loop_config["cases"]:
        config = from_dict(case["config"])
        module = build_module(config, case["dropout"])
        before = trainable(module)
        engine = build_engine(module, build_deepspeed_config(config, world_size))
        local, chunk = local_batch_size(config, world_size), chunk_size(config, world_size)
        outcomes, lrs = [], []
        torch.manual_seed(case["rng_seed"])
        for step, batch in enumerate(case["batches"]):
            mine = {k: v[rank * local:(rank + 1) * local] for k, v in batch.items()}
            poison = case.get("poison")  # (step, rank, model call) whose features turn NaN
            handle = None
            if poison and poison[0] == step and poison[1] == rank:
                calls = [0]

                def nan_at_call(_module, _inputs, output, calls=calls, target_call=poison[2]):
                    calls[0] += 1
                    if calls[0] == target_call:
                        return output[0] * float("nan"), output[1]
                    return output

                handle = engine.module.model.register_forward_hook(nan_at_call)
            lrs.append(float(engine.get_lr()[0]))
            result = train_step(engine, mine, step_context(mine, rank, world_size), chunk, world_size,
                                config.train.chunk_tokens)
            if handle is not None:
                handle.remove()
            outcomes.append({"finite": result.finite, "loss": result.loss,
                             "chunks": all_gather_object(result.chunks, world_size),
                             "rows_objective": result.metrics.get("rows_objective"),
                             "rng_after": torch.get_rng_state()})
        weights = consolidated_state_dict(engine)
        results.append({"name": case["name"], "outcomes": outcomes, "lrs": lrs, "before": before,
                        "global_steps": engine.global_steps, "weights": weights})
    if rank == 0:
        torch.save(results, loop_config["out"])


def fit_cases(cases: list[dict], workers: int, tmp_path, name: str) -> dict[str, dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = tmp_path / f"{name}.pt"
    TorchTrainer(
        run_cases,
        train_loop_config={"cases": cases, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path), name=name,
                                       worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}),
    ).fit()
    return {result["name"]: result for result in torch.load(out, weights_only=False)}


def local_batches(data_cache, model: str, count: int, rows: int) -> list[dict]:
    from sde_ray.bench.train import fixed_batch

    batch = fixed_batch(case_config(data_cache, model, "infonce", 0), rows * count)
    return [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(count)]


# ---------------------------------------------------------------------------------------------
# (a) One process: k = 1, 2, 4 chunks against the plain full-batch step, every objective, both kinds.

SINGLE = [pytest.param(model, loss, chunks, marks=[pytest.mark.slow] if model == "vlm" else [])
          for model in MODELS for loss in sorted(OBJECTIVES) for chunks in (1, 2, 4)]


@pytest.fixture(scope="module")
def single_process(ray_cluster, data_cache, tmp_path_factory):
    """`single_process(model)`: every one-process case of that model kind in one Ray Train worker
    (a fresh engine each), run once per module on first use; the VLM cases only under `slow`."""
    from sde_ray.config import to_dict

    runs: dict[str, tuple] = {}

    def run(model: str) -> tuple:
        if model not in runs:
            batches = local_batches(data_cache, model, 1, ROWS)
            cases = [{"name": f"{loss}-{chunks}", "dropout": DROPOUT, "rng_seed": 5, "batches": batches,
                      "config": to_dict(case_config(data_cache, model, loss, ROWS // chunks))}
                     for loss in sorted(OBJECTIVES) for chunks in (1, 2, 4)]
            # Dropout off: 4 chunks against literally one forward over all rows.
            cases.append({"name": "nodropout", "dropout": 0.0, "rng_seed": 5, "batches": batches,
                          "config": to_dict(case_config(data_cache, model, "sde", ROWS // 4))})
            # bf16 and LoRA (adapters only train) under ZeRO-2, 4 chunks.
            cases.append({"name": "bf16-lora", "dropout": DROPOUT, "rng_seed": 5, "batches": batches,
                          "config": to_dict(case_config(data_cache, model, "sde", ROWS // 4, *BF16_LORA))})
            runs[model] = batches, fit_cases(cases, 1, tmp_path_factory.mktemp(f"gradcache_{model}"),
                                             f"gradcache_{model}")
        return runs[model]

    return run


@pytest.mark.parametrize(("model", "loss", "chunks"), SINGLE)
def test_chunks_give_the_full_batch_loss_and_gradients(single_process, data_cache, model, loss, chunks):
    batches, results = single_process(model)
    result = results[f"{loss}-{chunks}"]
    config = case_config(data_cache, model, loss, ROWS // chunks)
    want_loss, want = reference(config, batches[0], ROWS // chunks, DROPOUT, rng_seed=5)
    assert result["outcomes"][0]["loss"] == pytest.approx(want_loss, rel=RTOL_LOSS)
    assert result["outcomes"][0]["rows_objective"] == ROWS
    assert result["global_steps"] == 1  # one optimizer step for the whole batch, whatever the chunks
    assert "objective.scale.log_scale" in want  # the learnable temperature is compared too
    assert_deltas(result["before"], result["weights"], want)


@pytest.mark.parametrize("model", [pytest.param("dual_encoder"), pytest.param("vlm", marks=pytest.mark.slow)])
def test_chunks_without_dropout_equal_one_forward_over_all_rows(single_process, data_cache, model):
    batches, results = single_process(model)
    result = results["nodropout"]
    want_loss, want = reference(case_config(data_cache, model, "sde", ROWS), batches[0], ROWS, 0.0, 5)
    assert result["outcomes"][0]["loss"] == pytest.approx(want_loss, rel=RTOL_LOSS)
    assert_deltas(result["before"], result["weights"], want)


# ---------------------------------------------------------------------------------------------
# (b) Two workers under ZeRO 0-3 and (d) the whole-step non-finite skip, in one Ray run.

@pytest.mark.parametrize("model", [pytest.param("dual_encoder"), pytest.param("vlm", marks=pytest.mark.slow)])
def test_bf16_lora_chunks_match_the_fp32_full_batch_gradients(single_process, data_cache, model):
    """bf16 rounds every activation, so the check is relative: ‖Δθ − Δθ_ref‖ ≤ 5% ‖Δθ_ref‖ per
    adapter tensor (a gradient scaled by 1/chunks would be 75% off)."""
    batches, results = single_process(model)
    result = results["bf16-lora"]
    config = case_config(data_cache, model, "sde", ROWS // 4, *BF16_LORA)
    config.deepspeed.precision = "fp32"
    _, want = reference(config, batches[0], ROWS // 4, DROPOUT, rng_seed=5)
    assert result["global_steps"] == 1
    lora = [name for name in want if "lora_" in name]
    assert lora and set(want) == set(lora) | {"objective.scale.log_scale"}  # LoRA: only adapters train
    for name in want:
        # The engine holds bf16 weights: the step's move is measured from the bf16-rounded start.
        start = result["before"][name].to(torch.bfloat16).float().reshape(want[name].shape)
        got = result["weights"][name].float().reshape(want[name].shape) - start
        error = float((got - want[name]).norm() / want[name].norm().clamp_min(1e-12))
        assert error <= 0.05, f"{name}: relative error {error:.3f}"


# Every ZeRO stage with SDE (its instance term is InfoNCE with gathered features, its spectral terms
# all-reduced energies), and InfoNCE alone at ZeRO-0, the stage whose reduction path is DeepSpeed's
# engine itself rather than a ZeRO optimizer (the one that divided by the chunk count).
TWO_WORKER_CASES = [("sde", 0), ("sde", 1), ("sde", 2), ("sde", 3), ("infonce", 0)]


@pytest.fixture(scope="module")
def two_workers(ray_cluster, data_cache, tmp_path_factory):
    from sde_ray.config import to_dict

    batch = local_batches(data_cache, "dual_encoder", 1, 2 * ROWS)
    cases = [{"name": f"{loss}-zero{stage}", "dropout": 0.0, "rng_seed": 5, "batches": batch,
              "config": to_dict(case_config(data_cache, "dual_encoder", loss, ROWS // 2,
                                            f"deepspeed.zero_stage={stage}", workers=2))}
             for loss, stage in TWO_WORKER_CASES]
    # (d): three global batches; in the second, rank 1's third chunk (of 4) encodes to NaN.
    three = local_batches(data_cache, "dual_encoder", 3, 2 * ROWS)
    skip_config = to_dict(case_config(data_cache, "dual_encoder", "sde", ROWS // 4, "deepspeed.zero_stage=2",
                                      "train.nan_policy=skip", "train.lr_schedule=cosine", workers=2))
    skip_config["deepspeed"]["overrides"] = {}  # a real schedule: the LR must not drift on a skip
    cases.append({"name": "poisoned", "dropout": DROPOUT, "rng_seed": 5, "batches": three,
                  "config": skip_config, "poison": (1, 1, 3)})
    cases.append({"name": "without_that_batch", "dropout": DROPOUT, "rng_seed": 5,
                  "batches": [three[0], three[2]], "config": skip_config})
    # (f): chunks by a token budget under which the two ranks need different chunk counts.
    budget, needs = uneven_token_budget(batch[0])
    for stage in range(4):
        cases.append({"name": f"tokens-zero{stage}", "dropout": 0.0, "rng_seed": 5, "batches": batch,
                      "config": to_dict(case_config(data_cache, "dual_encoder", "sde", 0,
                                                    f"deepspeed.zero_stage={stage}", f"train.chunk_tokens={budget}",
                                                    workers=2))})
    return batch, fit_cases(cases, 2, tmp_path_factory.mktemp("gradcache_two"), "gradcache_two"), needs


def uneven_token_budget(batch: dict) -> tuple[int, list[int]]:
    """A token budget under which rank 0's rows and rank 1's need different numbers of chunks (>= 2)."""
    from sde_ray.train.step import row_spans, token_budget_sizes

    halves = [{k: v[rank * ROWS:(rank + 1) * ROWS] for k, v in batch.items()} for rank in range(2)]
    for budget in range(8, 4096, 8):
        needs = [len(token_budget_sizes(row_spans(half), budget, ROWS)) for half in halves]
        if min(needs) >= 2 and needs[0] != needs[1]:
            return budget, needs
    raise AssertionError("no token budget splits the two ranks' rows into different chunk counts")


@pytest.mark.slow
@pytest.mark.parametrize(("loss", "stage"), TWO_WORKER_CASES)
def test_two_workers_step_equals_one_process_on_the_concatenated_batch(two_workers, data_cache, loss, stage):
    """2 workers × 2 chunks of 4 rows against one process on the 16 rows. The batch repeats target
    texts, so the target spectrum is rank-deficient: SDE must not depend on its rounding-level
    directions (tests/spectral/test_distributed.py checks that in isolation)."""
    batch, results, _ = two_workers
    result = results[f"{loss}-zero{stage}"]
    config = case_config(data_cache, "dual_encoder", loss, 0, workers=2)
    _, want = reference(config, batch[0], 2 * ROWS, 0.0, rng_seed=5)  # the concatenated batch, world 1
    # Rank 0's loss is its share; both ranks' rows entered the objective (all-gathered).
    assert result["outcomes"][0]["rows_objective"] == 2 * ROWS
    assert result["global_steps"] == 1
    assert_deltas(result["before"], result["weights"], want)


@pytest.mark.slow
def test_a_non_finite_chunk_skips_the_whole_step_on_every_rank(two_workers):
    _, results, _ = two_workers
    poisoned, clean = results["poisoned"], results["without_that_batch"]
    assert [o["finite"] for o in poisoned["outcomes"]] == [True, False, True]  # rank 0 saw the skip too
    assert poisoned["global_steps"] == clean["global_steps"] == 2
    assert poisoned["lrs"][2] == clean["lrs"][1]  # the schedule did not advance on the skip
    assert poisoned["outcomes"][2]["loss"] == clean["outcomes"][1]["loss"]
    for name, value in clean["weights"].items():
        torch.testing.assert_close(poisoned["weights"][name], value, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", range(4))
def test_token_budget_chunks_agree_across_ranks_and_equal_one_process(two_workers, data_cache, stage):
    """(f) `train.chunk_tokens`: rank 0's rows and rank 1's need different chunk counts under the
    budget; both run the larger count (the collectives of ZeRO-2/3 per chunk would hang otherwise),
    DeepSpeed steps once (the step owns the accumulation boundary), and the update is the plain
    one-process step on the 16 rows."""
    batch, results, needs = two_workers
    result = results[f"tokens-zero{stage}"]
    assert result["outcomes"][0]["chunks"] == [max(needs)] * 2  # the rank that needed fewer ran the max
    assert result["global_steps"] == 1
    config = case_config(data_cache, "dual_encoder", "sde", 0, workers=2)
    _, want = reference(config, batch[0], 2 * ROWS, 0.0, rng_seed=5)
    assert_deltas(result["before"], result["weights"], want)


# ---------------------------------------------------------------------------------------------
# (c) The training loop with chunks, killed and resumed: tests/train/test_exact_resume.py (its runs
# step 32 rows per rank in 2 chunks, and the resumed run must equal the uninterrupted one to 1e-6).
# Chunks against no chunks is (a) and (b) above and (e) below, step by step against plain torch.


# ---------------------------------------------------------------------------------------------
# (e) Several steps with dropout: each step draws fresh masks and leaves the RNG where its one
# forward pass over the chunks left it, one chunk or four (issue 32: a one-chunk step rewound the
# RNG to its own start, so every step replayed the first step's dropout masks).

STEPS = 3
# A plain AdamW at a constant, ordinary learning rate: several steps stay comparable to float rounding.
# ε = 1e-3, not 1e-6: a parameter whose true gradient is 0 (an attention key bias) gets rounding noise
# of ~1e-9, which Adam would blow up to a full-lr step whose sign depends on the summation order.
PLAIN_ADAM = ["train.lr=0.001", "train.adam_eps=0.001", "train.weight_decay=0.0", "train.grad_clip=0.0",
              "train.lr_schedule=constant",
              'deepspeed.overrides={"scheduler": {"params": {"warmup_min_lr": 0.001}}}']
# A learning rate of 0: the weights never move, so the same batch twice differs only by its randomness.
FROZEN = ["train.lr_schedule=constant", 'deepspeed.overrides={"optimizer": {"params": {"lr": 0.0}}, '
          '"scheduler": {"params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.0}}}']


def several_step_config(data_cache, chunk: int, *extra: str) -> Config:
    return load_config(None, [
        "data.synth.train_per_subset=32", "data.synth.eval_per_dataset=16", "data.samples_per_shard=64",
        f"data.cache_dir={data_cache}", "logging.wandb=false", "scaling.num_workers=1", f"train.global_batch_size={ROWS}",
        f"train.micro_batch_size={chunk}", "loss.name=infonce", *MODELS["dual_encoder"], *extra])


def reference_run(config: Config, batches: list[dict], chunk: int, rng_seed: int) -> tuple[list, list, dict]:
    """Plain torch over several steps: each step one graph built chunk by chunk from where the previous
    step's forward left the RNG, `loss.backward()`, `torch.optim.AdamW.step()`. Returns the losses,
    the RNG state after each step and the final weights."""
    module = build_module(config, DROPOUT)
    train = config.train
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=train.lr,
                                  betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps, weight_decay=0.0)
    torch.manual_seed(rng_seed)
    losses, states = [], []
    for batch in batches:
        parts = [module({k: v[i:i + chunk] for k, v in batch.items()}) for i in range(0, ROWS, chunk)]
        query, target = torch.cat([q for q, _ in parts]), torch.cat([t for _, t in parts])
        loss, _ = module.objective(query, target, step_context(batch, 0, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        states.append(torch.get_rng_state())
    return losses, states, {name: p.detach().clone() for name, p in module.named_parameters()}


@pytest.fixture(scope="module")
def several_steps(ray_cluster, data_cache, tmp_path_factory):
    from sde_ray.config import to_dict

    batches = local_batches(data_cache, "dual_encoder", STEPS, ROWS)
    cases = [{"name": f"chunks-{chunks}-dropout-{p}", "dropout": p, "rng_seed": 5, "batches": batches,
              "config": to_dict(several_step_config(data_cache, ROWS // chunks, *PLAIN_ADAM))}
             for chunks in (1, 4) for p in (DROPOUT, 0.0)]
    # The same batch twice at frozen weights, with dropout and without.
    cases += [{"name": f"frozen-dropout-{p}", "dropout": p, "rng_seed": 5, "batches": [batches[0]] * 2,
               "config": to_dict(several_step_config(data_cache, ROWS, *FROZEN))} for p in (DROPOUT, 0.0)]
    return batches, fit_cases(cases, 1, tmp_path_factory.mktemp("gradcache_steps"), "gradcache_steps")


def test_consecutive_steps_draw_fresh_dropout_masks(several_steps):
    _, results = several_steps
    with_dropout, without = results[f"frozen-dropout-{DROPOUT}"], results["frozen-dropout-0.0"]
    assert with_dropout["weights"]["model.backbone.text_projection.weight"].equal(
        with_dropout["before"]["model.backbone.text_projection.weight"])  # lr 0: the weights did not move
    # Same weights, same rows: without dropout the two steps' losses are equal, so a difference with
    # dropout is the masks' (a rewound RNG gave the same loss twice).
    assert without["outcomes"][0]["loss"] == without["outcomes"][1]["loss"]
    assert with_dropout["outcomes"][0]["loss"] != with_dropout["outcomes"][1]["loss"]
    assert not with_dropout["outcomes"][0]["rng_after"].equal(with_dropout["outcomes"][1]["rng_after"])


@pytest.mark.parametrize("chunks", [1, 4])
def test_several_steps_with_dropout_follow_the_plain_run(several_steps, data_cache, chunks):
    """Every step leaves the RNG where the plain run's forward left it, and the weights after
    STEPS steps are the plain run's."""
    batches, results = several_steps
    result = results[f"chunks-{chunks}-dropout-{DROPOUT}"]
    config = several_step_config(data_cache, ROWS // chunks, *PLAIN_ADAM)
    losses, states, weights = reference_run(config, batches, ROWS // chunks, rng_seed=5)
    for step, (outcome, loss, state) in enumerate(zip(result["outcomes"], losses, states)):
        assert outcome["rng_after"].equal(state), f"step {step}: the RNG is not where the forward left it"
        assert outcome["loss"] == pytest.approx(loss, rel=RTOL_LOSS), f"step {step}"
    assert result["global_steps"] == STEPS
    for name, want in weights.items():
        torch.testing.assert_close(result["weights"][name].reshape(want.shape), want, rtol=0, atol=ATOL, msg=name)


def test_chunked_and_one_chunk_runs_stay_equal_over_several_steps(several_steps):
    """Without dropout the two runs differ only by the float summation order, step after step. (With
    dropout they draw masks of other shapes, so each is held to the plain run of its own chunking,
    above.)"""
    _, results = several_steps
    one, four = results["chunks-1-dropout-0.0"], results["chunks-4-dropout-0.0"]
    for step in range(STEPS):
        assert one["outcomes"][step]["loss"] == pytest.approx(four["outcomes"][step]["loss"], rel=RTOL_LOSS)
    for name, value in one["weights"].items():
        torch.testing.assert_close(four["weights"][name], value, rtol=1e-4, atol=1e-5, msg=name)
