"""The comparison harness: records, mean ± std aggregation, tables and plot, request checks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from sde_ray.config import Config, ConfigError, load_config, to_dict
from sde_ray.tune.compare import (
    check_request,
    comparison_markdown,
    run_config,
    run_record,
    summarize_runs,
    write_comparison,
)


def _result(overall: float, gap: float, strong: float = 0.2) -> dict:
    """Shaped like `sde_ray.train.driver.run_train`'s return value."""
    return {
        "train": {
            "loss": 1.5,
            "gap_centroid": gap,
            "energy_strong_q": strong,
            "energy_weak_q": 0.1,
            "energy_noise_q": 0.7,
            "effective_rank_q": 12.0,
            "step": 60,
            "model_dir": "/x",
        },
        "output_dir": "/runs/x",
        "eval": {
            "overall": overall,
            "ind": overall + 0.1,
            "ood": overall - 0.1,
            "meta_tasks": {"classification": overall + 0.05, "retrieval": overall - 0.05},
            "datasets": {},
        },
    }


def _records() -> list[dict]:
    return [
        run_record(_result(0.40, 0.8), "infonce", 0, 0.0),
        run_record(_result(0.50, 0.6), "infonce", 1, 0.0),
        run_record(_result(0.45, 0.7), "infonce", 2, 0.0),
        run_record(_result(0.60, 0.3), "sde", 0, 0.0),
        {
            "objective": "sde",
            "seed": 1,
            "noisy_correspondence": 0.0,
            "output_dir": "/r",
            "error": "FloatingPointError: nan",
        },
        run_record(_result(0.30, 0.9), "infonce", 0, 0.5),
    ]


def test_run_record_flattens_p_at_1_spectrum_and_gap():
    record = run_record(_result(0.4, 0.8), "disncl", 2, 0.2)
    assert record["objective"] == "disncl" and record["seed"] == 2 and record["noisy_correspondence"] == 0.2
    assert record["p_at_1_overall"] == 0.4 and record["p_at_1_ind"] == pytest.approx(0.5)
    assert record["p_at_1_classification"] == pytest.approx(0.45)
    assert record["gap_centroid"] == 0.8 and record["energy_strong_q"] == 0.2
    assert record["energy_strong_t"] is None  # absent from the run: recorded as missing, not as 0
    assert "step" not in record and "model_dir" not in record


def test_summary_means_and_sample_stds_match_numpy():
    rows = summarize_runs(_records())
    assert [(r["noisy_correspondence"], r["objective"]) for r in rows] == [
        (0.0, "infonce"),
        (0.0, "sde"),
        (0.5, "infonce"),
    ]
    infonce = rows[0]["metrics"]
    assert infonce["p_at_1_overall"]["mean"] == pytest.approx(np.mean([0.40, 0.50, 0.45]))
    assert infonce["p_at_1_overall"]["std"] == pytest.approx(np.std([0.40, 0.50, 0.45], ddof=1))
    assert infonce["gap_centroid"]["std"] == pytest.approx(np.std([0.8, 0.6, 0.7], ddof=1))
    assert infonce["p_at_1_overall"]["n"] == 3
    assert infonce["energy_strong_t"] == {"mean": None, "std": None, "n": 0}


def test_failed_runs_are_counted_and_left_out_of_the_means():
    sde = summarize_runs(_records())[1]
    assert sde["num_runs"] == 1 and sde["num_failed"] == 1
    assert sde["metrics"]["p_at_1_overall"] == {"mean": 0.60, "std": 0.0, "n": 1}


def test_markdown_table_shows_percent_mean_and_std_per_noise_rate():
    text = comparison_markdown(summarize_runs(_records()))
    assert "### Noisy correspondence 0" in text and "### Noisy correspondence 0.5" in text
    header = next(line for line in text.splitlines() if line.startswith("| Objective | runs |"))
    assert header.split(" | ")[2:5] == ["Overall", "IND", "OOD"]
    std = 100 * np.std([0.40, 0.50, 0.45], ddof=1)
    assert f"| infonce | 3 | 45.0 ± {std:.1f} | 55.0 ± {std:.1f} |" in text
    assert "| sde | 1 (1 failed) | 60.0 ± 0.0 |" in text
    assert "strong (query)" in text and "modality gap" in text and "0.700 ± 0.100" in text


def test_write_comparison_writes_json_csv_markdown_and_plot(tmp_path):
    result = write_comparison(_records(), tmp_path)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["runs"]) == 6 and saved["summary"] == result["summary"]
    with (tmp_path / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    overall = [r for r in rows if r["objective"] == "infonce" and r["metric"] == "p_at_1_overall"]
    assert [float(r["noisy_correspondence"]) for r in overall] == [0.0, 0.5]
    assert float(overall[0]["mean"]) == pytest.approx(0.45) and overall[0]["n"] == "3"
    assert (tmp_path / "compare.md").read_text().startswith("### Noisy correspondence 0")
    png = (tmp_path / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_run_config_changes_only_objective_seed_noise_and_outputs(tmp_path):
    base = Config()
    changed = run_config(base, "fanoise", 2, 0.2, tmp_path / "run")
    assert changed.loss.name == "fanoise" and changed.train.seed == base.train.seed + 2
    assert changed.data.synth.noisy_correspondence == 0.2
    assert changed.train.output_dir == str(tmp_path / "run")
    before, after = to_dict(base), to_dict(changed)
    for section, key in (
        ("loss", "name"),
        ("train", "seed"),
        ("train", "output_dir"),
        ("train", "storage_path"),
        ("train", "run_name"),
        ("logging", "wandb_group"),
    ):
        before[section].pop(key), after[section].pop(key)
    before["data"]["synth"].pop("noisy_correspondence"), after["data"]["synth"].pop("noisy_correspondence")
    assert before == after


def test_a_modified_objective_runs_its_base_objective_with_the_modifier_applied(tmp_path):
    # Reference: the config a user would write by hand for "sde-soft-no_hellinger".
    by_hand = load_config(None, ["loss.name=sde", "spectral.partition=soft", "loss.w_hellinger=0"])
    changed = run_config(Config(), "sde-soft-no_hellinger", 0, 0.0, tmp_path / "run")
    assert changed.loss.name == "sde"
    assert changed.spectral.partition == by_hand.spectral.partition == "soft"
    assert changed.loss.w_hellinger == by_hand.loss.w_hellinger == 0.0
    assert "sde-soft-no_hellinger" in changed.train.run_name


@pytest.mark.parametrize(
    ("objectives", "seeds", "rates", "message"),
    [
        (["sde", "simclr"], 1, [0.0], "unknown objective\\(s\\) simclr"),
        ([], 1, [0.0], "at least one objective"),
        (["sde", "sde"], 1, [0.0], "listed twice"),
        (["sde"], 0, [0.0], "--seeds must be an integer >= 1"),
        (["sde"], 1, [1.5], "rates must be in \\[0, 1\\]"),
        (["sde"], 1, [], "at least one rate"),
    ],
)
def test_bad_requests_are_rejected_by_name(objectives, seeds, rates, message):
    with pytest.raises(ConfigError, match=message):
        check_request(objectives, seeds, rates, Config())


def test_noise_needs_the_synthetic_generator():
    config = Config()
    config.data.source = "mmeb"
    with pytest.raises(ConfigError, match="data.source=synthetic"):
        check_request(["sde"], 1, [0.2], config)
    check_request(["sde"], 1, [0.0], config)


@pytest.mark.slow
def test_compare_end_to_end_two_seeds(tmp_path, ray_cluster):
    """One objective × 2 seeds through the real driver (Ray Train, 2 gloo workers, DeepSpeed on CPU).
    The objective axis of the grid is the same loop (test_run_config_changes_only_objective_seed_noise_and_outputs
    checks the configs it makes); one objective keeps this to two real runs."""
    from sde_ray.config import load_config
    from sde_ray.tune.compare import run_compare

    config = load_config(
        "configs/default.yaml",
        [
            "train.max_steps=3",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.warmup_steps=1",
            "eval.datasets=[SynObject,SynCaption_t2i]",
            "logging.wandb=false",
        ],
    )
    result = run_compare(config, ["dsrsd"], 2, [0.0], str(tmp_path))
    assert [r.get("error") for r in result["runs"]] == [None] * 2
    assert [(r["objective"], r["seed"]) for r in result["runs"]] == [("dsrsd", 0), ("dsrsd", 1)]
    for record in result["runs"]:
        assert 0.0 <= record["p_at_1_overall"] <= 1.0
        assert np.isfinite(record["loss"]) and record["gap_centroid"] >= 0
        saved = json.loads(
            (
                tmp_path / "nc0" / record["objective"] / f"seed{record['seed']}" / "compare_run.json"
            ).read_text()
        )
        assert saved["config"]["loss"]["name"] == record["objective"]
        assert saved["config"]["train"]["seed"] == config.train.seed + record["seed"]
    assert result["runs"][0]["loss"] != result["runs"][1]["loss"]  # the seeds really differ
    assert [(row["objective"], row["num_runs"]) for row in result["summary"]] == [("dsrsd", 2)]
    assert "| dsrsd | 2 |" in (tmp_path / "compare.md").read_text()
    # A second call finds every run finished with the same config and only rebuilds the table.
    again = run_compare(config, ["dsrsd"], 2, [0.0], str(tmp_path))
    assert again["runs"] == result["runs"]


# ---------------------------------------------------------------------------------------------
# Objective modifiers: SDE's parts alone and left out


def test_a_leave_one_out_changes_only_its_own_keys():
    from sde_ray.config import replace
    from sde_ray.train.run_dir import config_changes
    from sde_ray.tune.compare import objective_overrides

    def changed_keys(name: str) -> set[str]:  # the dotted keys the variant changes
        return set(config_changes(to_dict(Config()), to_dict(replace(Config(), objective_overrides(name)))))

    expected = {
        "sde-no_hellinger": {"loss.w_hellinger"},
        "sde-no_subspace": {"loss.w_subspace"},
        "sde-no_snr": {"loss.w_snr"},
        "sde-no_enhancement": {"spectral.eps_strong", "spectral.eps_weak", "spectral.eps_noise"},
        "sde-soft": {"spectral.partition"},
        "sde-soft-no_snr": {"spectral.partition", "loss.w_snr"},
    }
    for name, keys in expected.items():
        assert changed_keys(name) == keys, name
    assert changed_keys("sde-no_lambda_schedule") <= {
        "loss.lambda_schedule.kind", "loss.lambda_schedule.start", "loss.lambda_schedule.end"
    }


def test_sde_with_every_part_removed_is_plain_infonce():
    """`sde-no_all` through the SDE objective gives InfoNCE's loss and gradients (the infonce objective)."""
    import torch

    from sde_ray.config import replace
    from sde_ray.losses import StepContext, build_objective
    from sde_ray.tune.compare import objective_overrides

    g = torch.Generator().manual_seed(0)
    # A few strong directions over a noise floor: a spectrum the partition splits (with pure noise
    # every direction is scaled alike, which the L2 normalisation undoes).
    spikes = torch.tensor([8.0, 5.0, 3.0] + [0.0] * 13, dtype=torch.float64)
    query = torch.randn(32, 16, generator=g, dtype=torch.float64) * (spikes + 0.3)
    target = (query + 0.5 * torch.randn(32, 16, generator=g, dtype=torch.float64)).requires_grad_()
    query.requires_grad_()
    losses, grads = [], []
    for name in ("sde-no_all", "infonce"):
        objective = build_objective(replace(Config(), objective_overrides(name)), 16)
        context = StepContext(progress=0.3, generator=torch.Generator().manual_seed(1))
        loss, _ = objective(query, target, context)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, (query, target)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-9, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    # Keeping the enhancement alone changes the loss: the modifiers act.
    enhanced = build_objective(replace(Config(), objective_overrides("sde-only_enhancement")), 16)
    loss, _ = enhanced(query, target, StepContext(progress=0.3, generator=torch.Generator().manual_seed(1)))
    assert abs(float(loss.detach()) / float(losses[1].detach()) - 1) > 1e-4


@pytest.mark.parametrize(
    "name, message",
    [("sde-bogus", "unknown modifier 'bogus'"), ("infonce-soft", "applies to sde only"), ("nope-soft", "unknown objective")],
)
def test_unknown_or_misapplied_modifiers_are_rejected(name, message):
    with pytest.raises(ConfigError, match=message):
        check_request([name], 1, [0.0], Config())


def test_soft_modifier_with_a_hard_only_fence_is_rejected_before_any_run():
    config = Config()
    config.spectral.fence = "energy"
    with pytest.raises(ConfigError, match="spectral.partition=soft needs spectral.fence=iqr"):
        check_request(["sde-soft"], 1, [0.0], config)


def test_the_starting_record_is_found_from_the_run_directory_or_its_export(tmp_path):
    # run_compare resolves --init-from RUN to RUN/model before looking up the starting point's
    # record, which compare writes in RUN itself.
    from sde_ray.tune.compare import RUN_RECORD, _init_record

    run = tmp_path / "pre" / "nc0" / "infonce" / "seed0"
    (run / "model").mkdir(parents=True)
    record = run_record(_result(0.48, 0.2), "infonce", 0, 0.0)
    (run / RUN_RECORD).write_text(json.dumps({"config": {}, "record": record}))
    assert _init_record(run) == record
    assert _init_record(run / "model") == record
    assert _init_record(tmp_path) is None


def test_a_finished_run_recorded_before_a_config_key_existed_is_reused(tmp_path):
    """A compare run finished by an older sde_ray lacks keys added since (eval.val_data_dir): at
    their defaults it is the same run and is reused; any real difference reruns it."""
    from sde_ray.config import Config, to_dict, with_values
    from sde_ray.tune.compare import RUN_RECORD, _reusable

    config = Config()
    older = to_dict(config)
    del older["eval"]["val_data_dir"]
    record = {"objective": "infonce", "seed": 0, "p_at_1_overall": 0.5}
    (tmp_path / RUN_RECORD).write_text(json.dumps({"config": older, "record": record}))
    assert _reusable(tmp_path, config) == record
    assert _reusable(tmp_path, with_values(config, {"eval.val_data_dir": str(tmp_path)})) is None
    assert _reusable(tmp_path, with_values(config, {"train.lr": 0.5})) is None
