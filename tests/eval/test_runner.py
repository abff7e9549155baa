"""End to end: a tiny-clip export / run directory / training checkpoint evaluated on a synthetic
MMEB-eval by Ray actors, with results files, plots, diagnostics, a gap remedy and wandb (offline)."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from sde_ray.config import load_config, to_dict
from sde_ray.data.mmeb import eval_image_source
from sde_ray.eval.evaluation import evaluate_model
from sde_ray.eval.runner import run_eval
from sde_ray.eval.validation import validation_p_at_1

from .conftest import E2E_DATASETS
from .test_report_and_plots import assert_real_png

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _history(path):
    rows = []
    for step in (10, 20, 30):
        row = {
            "step": step,
            "loss": 3.0 - step / 20,
            "gap_centroid": 1.0 - step / 60,
            "effective_rank_q": 5.0 + step,
        }
        for side in "qt":
            row.update(
                {
                    f"energy_strong_{side}": 0.1 + step / 200,
                    f"energy_weak_{side}": 0.08,
                    f"energy_noise_{side}": 0.82 - step / 200,
                }
            )
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")


def break_one_query_image(eval_root, dataset: str) -> None:
    """Truncates the first query image of `dataset` (a file under eval_images/ is read before the
    zip's member of that path): its row must be a miss, not an abort."""
    query_image = pq.read_table(next((eval_root / dataset).glob("*.parquet"))).column("qry_img_path")[0].as_py()
    source = eval_image_source(eval_root)
    broken = eval_root / "eval_images" / query_image
    broken.parent.mkdir(parents=True)
    broken.write_bytes(source.read(query_image)[:40])
    source.close()


def test_run_directory_on_ray_matches_in_process_eval(ray_cluster, synthetic_mmeb, tiny_export, tmp_path):
    """The actors, fed by Ray Data CPU tasks (`sde_ray.eval.streamed`), score every dataset as the
    in-process evaluation of the original model does, an undecodable image included; the decoding
    ran in the CPU tasks' processes, not the actors'."""
    folder, model, processor = tiny_export
    run = tmp_path / "run"
    shutil.copytree(folder, run / "model")
    _history(run / "metrics.jsonl")
    eval_root = tmp_path / "MMEB-eval"
    shutil.copytree(synthetic_mmeb["eval_dir"], eval_root)
    break_one_query_image(eval_root, "SynObject")
    config = load_config(
        None, ["eval.num_workers=2", "eval.batch_size=16", "logging.wandb=true", "logging.wandb_mode=offline"]
    )
    results = run_eval(run, eval_root, datasets=E2E_DATASETS, config=config, gap_remedy="procrustes")
    out = run / "eval"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["overall"] == pytest.approx(results["overall"])
    assert list(on_disk["datasets"]) == E2E_DATASETS  # the catalog's report order
    for name, row in on_disk["datasets"].items():
        assert row["num_queries"] == 8 and row["num_missing"] == (name == "SynObject") and 0.0 <= row["p_at_1"] <= 1.0
    actors = on_disk["evaluated_by"]
    assert len({a["pid"] for a in actors}) == 2 and on_disk["decoded_by"]
    assert not set(on_disk["decoded_by"]) & {a["pid"] for a in actors}
    assert {(a["precision"], a["weights_dtype"]) for a in actors} == {("fp32", "float32")}
    assert set(on_disk["meta_tasks"]) == {"classification", "vqa", "retrieval", "grounding"}
    assert on_disk["ind"] is not None and on_disk["ood"] is not None
    assert "| SynObject |" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().count("\n") == len(E2E_DATASETS) + 4 + 3 + 1

    # Ray actors reloading the export score exactly like the in-process path on the original model.
    local = evaluate_model(model, processor, eval_root, datasets=E2E_DATASETS, batch_size=16)
    assert {n: r["p_at_1"] for n, r in local["datasets"].items()} == {
        n: r["p_at_1"] for n, r in on_disk["datasets"].items()
    }

    diagnostics = on_disk["diagnostics"]
    shares = [diagnostics[f"energy_{s}_q"] for s in ("strong", "weak", "noise")]
    assert sum(shares) == pytest.approx(1.0)
    assert 1.0 <= diagnostics["effective_rank_q"] <= model.embed_dim
    assert diagnostics["gap_centroid"] > 0 and 0 <= diagnostics["gap_min_principal_angle"] <= 1.5708
    remedy = on_disk["gap_remedy"]
    assert remedy["name"] == "procrustes" and set(remedy["datasets"]) == set(E2E_DATASETS)
    assert all(r["num_queries"] == 4 for r in remedy["datasets"].values())
    for name in ("p_at_1", "spectrum", "energy_over_training", "spectral_over_training"):
        assert_real_png(out / "plots" / f"{name}.png")
    offline_runs = list((out / "wandb").glob("offline-run-*"))
    assert offline_runs and any(offline_runs[0].rglob("*.wandb"))


def test_training_checkpoint_through_the_cli(ray_cluster, synthetic_mmeb, tiny_export, tmp_path, capsys):
    """A Ray Train checkpoint (consolidated.pt + state.json) is exported and evaluated; compare works."""
    from sde_ray.cli import main

    _, model, processor = tiny_export
    checkpoint = tmp_path / "ray" / "checkpoint_000001"
    checkpoint.mkdir(parents=True)
    config = load_config(None, ["model.name_or_path=tiny-clip"])
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    weights["objective.logit_scale"] = torch.tensor(3.0)  # the objective's own parameters ride along
    torch.save(weights, checkpoint / "consolidated.pt")
    (checkpoint / "state.json").write_text(json.dumps({"step": 1, "config": to_dict(config)}))

    datasets = E2E_DATASETS[:2]
    out = tmp_path / "ckpt-eval"
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(checkpoint),
                "--data",
                synthetic_mmeb["eval_dir"],
                "--datasets",
                *datasets,
                "--output-dir",
                str(out),
                "eval.num_workers=1",
                "logging.wandb=false",
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    local = evaluate_model(model, processor, synthetic_mmeb["eval_dir"], datasets=datasets)
    assert {n: r["p_at_1"] for n, r in results["datasets"].items()} == {
        n: r["p_at_1"] for n, r in local["datasets"].items()
    }
    assert (out / "model_from_checkpoint" / "sde_ray_model.json").is_file()

    capsys.readouterr()
    assert main(["eval", "compare", str(out), str(out / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "| **Overall** |" in table and "+0.0" in table


def test_validation_slice_is_small_and_matches_full_eval_on_it(synthetic_mmeb, tiny_export):
    _, model, processor = tiny_export
    root = synthetic_mmeb["eval_dir"]
    value = validation_p_at_1(model, processor, root, max_queries=10, datasets=E2E_DATASETS)
    # 10 queries over 5 datasets: the first 2 rows of each, scored like evaluate_model does
    expected = evaluate_model(model, processor, root, datasets=E2E_DATASETS, max_queries=2)
    assert value == pytest.approx(expected["overall"])
    assert expected["num_queries"] == 10


def test_bad_inputs_are_named(synthetic_mmeb, tmp_path):
    config = load_config(None, [])
    with pytest.raises(FileNotFoundError, match="not an exported model"):
        run_eval(tmp_path, synthetic_mmeb["eval_dir"], config=config, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="NoSuchSet"):
        from sde_ray.eval.roots import select_datasets

        select_datasets(__import__("pathlib").Path(synthetic_mmeb["eval_dir"]), ["NoSuchSet"])


def test_wandb_is_not_imported_when_logging_wandb_is_off(tmp_path):
    """A machine without wandb (the GPU check's) must evaluate with logging.wandb=false: the
    evaluator's logging step returns before importing it (a fresh interpreter, so no other test
    has imported wandb already)."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from sde_ray.config import load_config;"
        "from sde_ray.eval.runner import log_to_wandb;"
        "log_to_wandb({'datasets': {}, 'meta_tasks': {}, 'ind': None, 'ood': None, 'overall': None}, {},"
        f" load_config(None, ['logging.wandb=false']), Path({str(tmp_path)!r}));"
        "print('wandb imported' if 'wandb' in sys.modules else 'wandb not imported')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "wandb not imported"
