"""The SDE objective end to end on one process: registry, metrics, eval vs training, modes agree,
the λ-weighted total, and no NaN/Inf on degenerate batches (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sde_ray.config import Config, ScheduleConfig, load_config
from sde_ray.losses import StepContext, build_objective
from sde_ray.losses.objectives import build_infonce
from sde_ray.losses.sde import SDELoss, SDEObjective, SDESpectral
from sde_ray.spectral import PartitionRule, SpectrumRule


def _features(rows=32, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(rows, 3, generator=g) @ torch.randn(3, dim, generator=g) * 3.0
    return shared + torch.randn(rows, dim, generator=g), shared + torch.randn(rows, dim, generator=g)


def _context(progress=0.3, training=True, seed=0):
    return StepContext(progress=progress, training=training, generator=torch.Generator().manual_seed(seed))


def test_registry_builds_sde_and_metrics_are_complete():
    objective = build_objective(Config(), 16)
    query, target = _features()
    loss, metrics = objective(query, target, _context())
    assert torch.isfinite(loss) and loss.dim() == 0
    expected = {
        "loss",
        "loss_instance",
        "loss_hellinger",
        "loss_subspace",
        "loss_snr",
        "alpha",
        "lambda",
        "gap_centroid",
        "gap_min_angle",
        "hellinger_distance",
    }
    for side in "qt":
        expected |= {f"energy_{n}_{side}" for n in ("strong", "weak", "noise")}
        expected |= {f"effective_rank_{side}", f"num_strong_{side}", f"num_weak_{side}", f"num_noise_{side}"}
    assert expected <= set(metrics)
    # Floats, or 0-dim tensors for the loss terms (read back by the training loop at its log step).
    assert all((isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0)) and math.isfinite(v)
               for v in metrics.values())
    assert metrics["num_strong_q"] + metrics["num_weak_q"] == 3  # the three planted directions
    assert sum(metrics[f"energy_{n}_q"] for n in ("strong", "weak", "noise")) == pytest.approx(1.0)


def test_the_objective_takes_plain_settings_and_the_builder_maps_every_key():
    """SDEObjective is built from its own frozen dataclasses of plain values; `build_sde` fills each
    field from the config key of the same name (every value below differs from its default and from
    the other fields', so a swapped or dropped key fails)."""
    config = load_config(None, [
        "loss.name=sde", "spectral.mode=gram", "spectral.auto_gram_ratio=2.0", "spectral.noise_estimator=iqr",
        "spectral.tw_margin=2.5", "spectral.fence=energy", "spectral.iqr_k=1.25", "spectral.energy_fraction=0.6",
        "spectral.soft_width=0.75", "spectral.eps_strong=0.2", "spectral.eps_weak=0.15", "spectral.eps_noise=0.4",
        "spectral.rho=0.05", "spectral.strong_perturbation=adversarial", "spectral.alpha.kind=linear",
        "loss.temperature=0.07", "loss.learnable_temperature=true", "loss.duplicate_targets=mask",
        "loss.lambda_schedule.start=0.3", "loss.w_hellinger=0.5", "loss.w_subspace=0.25", "loss.w_snr=0.35",
        "loss.hellinger_on=energy", "loss.hellinger_numerical_rank=false", "loss.subspace_k=4",
        "loss.subspace_form=projector",
    ])
    spectral = SDESpectral(
        spectrum=SpectrumRule(mode="gram", auto_gram_ratio=2.0, partition=PartitionRule(
            noise_estimator="iqr", tw_margin=2.5, fence="energy", iqr_k=1.25, energy_fraction=0.6,
            partition="hard", soft_width=0.75)),
        alpha=ScheduleConfig(kind="linear"), eps_strong=0.2, eps_weak=0.15, eps_noise=0.4, rho=0.05,
        strong_perturbation="adversarial",
    )
    loss = SDELoss(
        temperature=0.07, learnable_temperature=True, duplicate_targets="mask",
        lambda_schedule=ScheduleConfig(kind="linear", start=0.3, end=1.0), w_hellinger=0.5, w_subspace=0.25,
        w_snr=0.35, hellinger_on="energy", hellinger_numerical_rank=False, subspace_k=4, subspace_form="projector",
    )
    built = build_objective(config, 16)
    assert (built.spectral, built.loss) == (spectral, loss)
    query, target = _features()
    context = StepContext(progress=0.3, generator=torch.Generator().manual_seed(0),
                          target_ids=torch.arange(32) % 5)
    expected, expected_metrics = built(query, target, context)
    got, got_metrics = SDEObjective(spectral, loss)(query, target, context)
    assert float(got.detach()) == float(expected.detach()) and got_metrics == expected_metrics


def test_eval_mode_has_no_enhancement_and_training_mode_does():
    config = Config()
    objective = build_objective(config, 16)
    query, target = _features()
    plain, _ = build_infonce(config, 16)(query, target, _context())
    _, eval_metrics = objective(query, target, _context(training=False))
    _, train_metrics = objective(query, target, _context(training=True))
    assert eval_metrics["loss_instance"] == pytest.approx(float(plain), rel=1e-6)
    assert train_metrics["loss_instance"] != pytest.approx(float(plain), rel=1e-4)


def test_total_is_the_lambda_weighted_sum():
    config = Config()
    config.loss.lambda_schedule.start = 0.3
    config.loss.lambda_schedule.end = 0.3
    config.loss.w_hellinger, config.loss.w_subspace, config.loss.w_snr = 2.0, 0.5, 0.7
    objective = build_objective(config, 16)
    loss, m = objective(*_features(), _context())
    m = {k: float(v) for k, v in m.items()}  # the metrics are device tensors (read once per log window)
    expected = (
        0.3 * m["loss_instance"]
        + 0.7 * (2.0 * m["loss_hellinger"] + 0.5 * m["loss_subspace"])
        + 0.7 * m["loss_snr"]
    )
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert m["lambda"] == pytest.approx(0.3)


@pytest.mark.parametrize("partition", ["hard", "soft"])
@pytest.mark.parametrize("perturbation", ["random", "adversarial"])
@pytest.mark.parametrize("form", ["surrogate", "projector"])
def test_gather_and_gram_modes_give_the_same_loss_and_gradient(perturbation, form, partition):
    results = []
    for mode in ("gather", "gram"):
        config = Config()
        config.spectral.partition = partition
        config.spectral.mode = mode
        config.spectral.strong_perturbation = perturbation
        config.loss.subspace_form = form
        query, target = (x.double().requires_grad_() for x in _features(seed=3))
        loss, metrics = build_objective(config, 16)(query, target, _context())
        loss.backward()
        results.append((loss.detach(), query.grad, target.grad, metrics["spectral_mode_gram"]))
    assert [r[3] for r in results] == [0.0, 1.0]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-9)


def test_same_generator_seed_same_loss_and_different_seed_differs():
    objective = build_objective(Config(), 16)
    query, target = _features()
    a = objective(query, target, _context(seed=1))[0]
    b = objective(query, target, _context(seed=1))[0]
    c = objective(query, target, _context(seed=2))[0]
    assert float(a) == float(b) and float(a) != float(c)


def test_bad_shapes_are_named():
    objective = build_objective(Config(), 16)
    with pytest.raises(ValueError, match="same shape"):
        objective(torch.randn(4, 16), torch.randn(5, 16), _context())
    with pytest.raises(ValueError, match="embed_dim"):
        build_objective(Config(), 0)


@st.composite
def batches(draw):
    rows, dim = draw(st.integers(2, 10)), draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 10_000)))
    kind = draw(st.sampled_from(["random", "zero_query", "repeated", "tiny", "rank_one", "identical_pair"]))
    query, target = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    if kind == "zero_query":
        query = torch.zeros(rows, dim)
    elif kind == "repeated":
        query, target = query[:1].repeat(rows, 1), target[:1].repeat(rows, 1)
    elif kind == "tiny":
        query, target = query * 1e-20, target * 1e-20
    elif kind == "rank_one":
        query = torch.randn(rows, 1, generator=g) @ torch.randn(1, dim, generator=g)
    elif kind == "identical_pair":
        target = query.clone()
    return query, target


@settings(max_examples=60, deadline=None)
@given(
    batches(),
    st.sampled_from(["gather", "gram"]),
    st.sampled_from(["random", "adversarial"]),
    st.sampled_from(["surrogate", "projector"]),
    st.sampled_from(["singular", "energy"]),
    st.floats(0, 1),
)
def test_no_nan_or_inf_on_degenerate_batches(batch, mode, perturbation, form, on, progress):
    config = Config()
    config.spectral.mode, config.spectral.strong_perturbation = mode, perturbation
    config.loss.subspace_form, config.loss.hellinger_on = form, on
    query, target = (x.clone().requires_grad_() for x in batch)
    loss, metrics = build_objective(config, query.shape[1])(query, target, _context(progress=progress))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(query.grad).all() and torch.isfinite(target.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())


def test_nonfinite_features_give_a_nan_loss_not_an_exception():
    query, target = _features()
    query[3, 2] = float("nan")
    query.requires_grad_()
    loss, metrics = build_objective(Config(), 16)(query, target, _context())
    assert math.isnan(float(loss)) and metrics["nonfinite_features"] == 1.0
    loss.backward()  # still connected to the graph, so a trainer can run its skip policy


def test_numerical_rank_floor_makes_the_hellinger_gradient_row_order_invariant():
    """Duplicate rows (as in synthetic MMEB's text sides) leave directions at rounding level, whose
    singular vectors are noise. Through them the Hellinger gradient depends on the row order; with
    `loss.hellinger_numerical_rank` it does not, and the loss value is the same."""
    g = torch.Generator().manual_seed(0)
    unique = torch.randn(12, 8, generator=g) @ torch.randn(8, 24, generator=g)
    rows = torch.randint(0, 12, (32,), generator=g)
    query, target = unique[rows], unique[rows] + 0.1 * torch.randn(32, 24, generator=g)
    order = torch.arange(31, -1, -1)
    results = {}
    for flag in (False, True):
        config = Config()
        config.loss.hellinger_numerical_rank = flag
        config.spectral.eps_strong = config.spectral.eps_weak = config.spectral.eps_noise = 0.0
        config.loss.w_subspace = config.loss.w_snr = 0.0
        grads, losses = [], []
        for permutation in (torch.arange(32), order):
            q = query[permutation].clone().requires_grad_()
            t = target[permutation].clone().requires_grad_()
            loss, _ = build_objective(config, 24)(q, t, _context())
            loss.backward()
            inverse = torch.argsort(permutation)
            grads.append(torch.cat([q.grad[inverse], t.grad[inverse]]))
            losses.append(float(loss.detach()))
        results[flag] = (float((grads[0] - grads[1]).norm() / grads[0].norm()), losses)
    assert results[True][0] < 1e-3  # float32 rounding of the kept directions
    assert results[False][0] > 0.1  # the defect the floor removes (why the option exists)
    assert math.isclose(results[True][1][0], results[False][1][0], rel_tol=1e-6)
