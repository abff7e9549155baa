"""Sweep search spaces and sweep files: key validation, spec checks, grid and random sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray.tune.search.variant_generator import generate_variants

from sde_ray.config import ConfigError, load_config
from sde_ray.ray_cluster import run_resources
from sde_ray.tune.sweep import concurrent_trials, load_sweep, validation_reports
from sde_ray.tune.space import build_param_space, grid_size, leaf_keys, validate_space

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def base():
    return load_config(None)


def _samples(space: dict, search_alg: str = "random", n: int = 1, seed: int = 0) -> list[dict]:
    """What Tune's variant generator (the random / grid search) draws from our param space."""
    rng = np.random.RandomState(seed)
    param_space = {"overrides": build_param_space(space, search_alg)}
    out = []
    for _ in range(n):
        out.extend(resolved["overrides"] for _, resolved in generate_variants(param_space, random_state=rng))
    return out


def test_leaf_keys_are_the_dotted_config_leaves():
    keys = leaf_keys()
    assert {"train.lr", "spectral.alpha.kind", "loss.lambda_schedule.start", "loss.fanoise.schedule.kind"} <= set(keys)
    assert "spectral.alpha" not in keys and "spectral" not in keys  # sections are not searchable values


def test_typo_names_the_key_and_the_close_valid_ones(base):
    with pytest.raises(ConfigError) as info:
        validate_space({"spectral.eps_strnog": {"type": "uniform", "low": 0.0, "high": 0.2}}, base)
    message = str(info.value)
    assert "spectral.eps_strnog" in message and "spectral.eps_strong" in message and "Valid keys" in message


def test_sections_and_tune_keys_are_not_searchable(base):
    for key in ("spectral.alpha", "tune.num_samples"):
        with pytest.raises(ConfigError, match="unknown config key"):
            validate_space({key: {"type": "choice", "values": [1]}}, base)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ({"type": "normal", "mu": 0, "sigma": 1}, "is not one of"),
        ({"type": "uniform", "low": 0.1}, "missing high"),
        ({"type": "uniform", "low": 0.1, "high": 0.2, "q": 0.01}, "unexpected q"),
        ({"type": "uniform", "low": 0.3, "high": 0.2}, "must be < high"),
        ({"type": "loguniform", "low": 0.0, "high": 0.2}, "low > 0"),
        ({"type": "randint", "low": 0.5, "high": 3}, "an integer"),
        ({"type": "choice", "values": []}, "non-empty list"),
        ([0.1, 0.2], "expected a mapping"),
    ],
)
def test_malformed_specs_are_rejected_with_the_key(base, spec, fragment):
    with pytest.raises(ConfigError) as info:
        validate_space({"spectral.eps_strong": spec}, base)
    assert "spectral.eps_strong" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize(
    "key, spec, fragment",
    [
        ("spectral.eps_weak", {"type": "uniform", "low": 0.5, "high": 1.5}, "eps_weak"),  # validate(): <= 1
        ("train.max_steps", {"type": "uniform", "low": 10, "high": 20}, "expected an integer"),
        ("spectral.alpha.kind", {"type": "choice", "values": ["cosine", "zigzag"]}, "'zigzag' is not one of"),
        ("loss.temperature", {"type": "grid", "values": [0.05, -0.1]}, "loss.temperature must be in [0.01, 1]"),
    ],
)
def test_values_the_config_would_reject_fail_before_any_trial(base, key, spec, fragment):
    with pytest.raises(ConfigError) as info:
        validate_space({key: spec}, base)
    assert key in str(info.value) and fragment in str(info.value)


def test_search_algorithm_and_spec_compatibility(base):
    with pytest.raises(ConfigError, match="search_alg=grid enumerates values"):
        validate_space({"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}, base, "grid")
    with pytest.raises(ConfigError, match="not supported by search_alg=optuna"):
        validate_space({"train.lr": {"type": "grid", "values": [1e-3]}}, base, "optuna")
    with pytest.raises(ConfigError, match="at least one key"):
        validate_space({}, base)


def test_grid_is_the_full_cross_product_and_random_dims_are_sampled():
    space = {
        "loss.w_hellinger": {"type": "grid", "values": [0.0, 0.5]},
        "spectral.alpha.kind": {"type": "grid", "values": ["linear", "cosine", "step"]},
        "spectral.eps_strong": {"type": "uniform", "low": 0.05, "high": 0.2},
    }
    samples = _samples(space)
    assert grid_size(space) == 6 and len(samples) == 6
    pairs = {(s["loss.w_hellinger"], s["spectral.alpha.kind"]) for s in samples}
    assert pairs == {(w, k) for w in (0.0, 0.5) for k in ("linear", "cosine", "step")}
    eps = [s["spectral.eps_strong"] for s in samples]
    assert all(0.05 <= e <= 0.2 for e in eps) and len(set(eps)) == 6  # drawn per trial, not fixed


def test_grid_search_alg_enumerates_choices_too():
    space = {"train.lr": {"type": "choice", "values": [1e-3, 3e-3]}, "loss.subspace_k": {"type": "grid", "values": [4, 8]}}
    samples = _samples(space, "grid")
    assert grid_size(space, "grid") == 4
    assert sorted((s["train.lr"], s["loss.subspace_k"]) for s in samples) == [
        (1e-3, 4), (1e-3, 8), (3e-3, 4), (3e-3, 8)
    ]


def test_random_samples_follow_their_distributions_and_are_seeded():
    space = {
        "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
        "train.seed": {"type": "randint", "low": 0, "high": 3},
        "spectral.rho": {"type": "choice", "values": [0.05, 0.1, 0.2]},
    }
    samples = _samples(space, n=600, seed=1)
    lrs = np.array([s["train.lr"] for s in samples])
    assert lrs.min() >= 1e-5 and lrs.max() <= 1e-1
    # log-uniform: each decade of the four holds about a quarter of the draws (binomial sd ≈ 0.018).
    decades = np.histogram(np.log10(lrs), bins=[-5, -4, -3, -2, -1])[0] / len(lrs)
    assert np.all(np.abs(decades - 0.25) < 0.07), decades
    assert {s["train.seed"] for s in samples} == {0, 1, 2}  # high is exclusive, as in Tune
    assert {s["spectral.rho"] for s in samples} == {0.05, 0.1, 0.2}
    assert _samples(space, n=5, seed=7) == _samples(space, n=5, seed=7)
    assert _samples(space, n=5, seed=7) != _samples(space, n=5, seed=8)


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_loads_and_validates(path):
    sweep = load_sweep(path)
    assert sweep.name == path.stem and sweep.config.logging.wandb_group == sweep.name
    assert sweep.config.train.max_steps % sweep.config.train.eval_every == 0
    assert sweep.tune.space and sweep.tune.num_samples * grid_size(sweep.tune.space, sweep.tune.search_alg) >= 4


def test_smoke_sweep_is_small():
    sweep = load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml")
    assert sweep.config.scaling.num_workers == 1 and not sweep.config.scaling.use_gpu
    assert sweep.config.train.max_steps <= 30 and not sweep.config.logging.wandb
    # Two trials at a time on the 4 logical CPUs of the test cluster.
    assert concurrent_trials(sweep.config, {"CPU": 4.0}) == 2


def _write_sweep(tmp_path: Path, **sweep) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_file_errors_name_the_problem(tmp_path):
    space = {"train.lr": {"type": "choice", "values": [1e-3]}}
    with pytest.raises(ConfigError, match="unknown sweep key 'tunes'.*Did you mean tune"):
        load_sweep(_write_sweep(tmp_path, base={}, tunes={"space": space}))
    with pytest.raises(ConfigError, match="base config not found: nowhere.yaml"):
        load_sweep(_write_sweep(tmp_path, base="nowhere.yaml", tune={"space": space}))
    with pytest.raises(ConfigError, match="Unknown config key 'tune.num_sample'"):
        load_sweep(_write_sweep(tmp_path, base={}, tune={"num_sample": 3, "space": space}))
    with pytest.raises(ConfigError, match="train.eval_every must be > 0"):
        load_sweep(_write_sweep(tmp_path, base={"train": {"eval_every": 0}}, tune={"space": space}))
    with pytest.raises(ConfigError, match=r"train.max_steps \(60\) must be a multiple of train.eval_every \(7\)"):
        load_sweep(_write_sweep(tmp_path, base={"train": {"eval_every": 7}}, tune={"space": space}))
    # A space value that breaks the same rule is caught too (trial configs are checked, not just the base).
    bad_space = {"train.max_steps": {"type": "choice", "values": [60, 61]}}
    with pytest.raises(ConfigError, match="tune.space.train.max_steps: value 61"):
        load_sweep(_write_sweep(tmp_path, base={"train": {"eval_every": 10}}, tune={"space": bad_space}))


def test_base_path_inline_base_and_cli_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 40\n  eval_every: 10\nloss:\n  name: infonce\n")
    space = {"train.lr": {"type": "choice", "values": [1e-3, 2e-3]}}
    path = _write_sweep(tmp_path, name="mine", base="base.yaml", overrides=["train.max_steps=20"], tune={"space": space})
    sweep = load_sweep(path, ["tune.num_samples=3", "logging.wandb_group=explicit"])
    assert sweep.name == "mine" and sweep.config.loss.name == "infonce"
    assert sweep.config.train.max_steps == 20 and sweep.tune.num_samples == 3
    assert sweep.config.logging.wandb_group == "explicit"  # an explicit group is kept
    inline = load_sweep(_write_sweep(tmp_path, base={"loss": {"name": "gap"}, "train": {"eval_every": 10}},
                                     tune={"space": space}))
    assert inline.config.loss.name == "gap" and inline.name == "sweep"


def test_space_entries_can_be_added_from_the_command_line():
    sweep = load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml",
                       ["tune.space.loss.w_snr={type: choice, values: [0.0, 0.2]}"])
    assert sweep.tune.space["loss.w_snr"] == {"type": "choice", "values": [0.0, 0.2]}
    assert {"train.lr", "spectral.eps_strong"} <= set(sweep.tune.space)
    with pytest.raises(ConfigError, match="unknown config key 'loss.w_snrr'"):
        load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml", ["tune.space.loss.w_snrr={type: choice, values: [0.1]}"])


def test_validation_reports_and_concurrency_follow_the_config():
    sweep = load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml")
    t = sweep.config.train
    assert validation_reports(sweep.config) == t.max_steps // t.eval_every
    needs = run_resources(sweep.config, trial=True)
    assert needs["CPU"] == pytest.approx(1 * sweep.config.scaling.cpus_per_worker + sweep.config.data.data_cpus + 0.01)
    for cpus in (4.0, 9.0, 64.0):
        assert concurrent_trials(sweep.config, {"CPU": cpus}) == math.floor(cpus / needs["CPU"])
    assert concurrent_trials(sweep.config, {"CPU": 1.0}) == 1  # never zero: the capacity check reports it
    gpu = load_sweep(REPO / "configs" / "sweeps" / "curriculum.yaml")
    assert concurrent_trials(gpu.config, {"CPU": 200.0, "GPU": 3.0}) == 3  # one trial per free GPU
    fixed = load_sweep(REPO / "configs" / "sweeps" / "smoke.yaml", ["tune.max_concurrent_trials=2"])
    assert concurrent_trials(fixed.config, {"CPU": 64.0}) == 2
