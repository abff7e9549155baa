"""MMEB-V2 score files in the harness's layout and the per-model summary (hand-computed means)."""

import json

import pytest

from sde_ray.eval.mmeb_v2 import BENCHMARK_VERSION, summary_line, write_model_summary, write_score_file


def test_score_files_and_summary(tmp_path):
    write_score_file(tmp_path, "image", "MSCOCO_t2i", {"hit@1": 0.5, "num_data": 4}, model="m")
    write_score_file(tmp_path, "video", "MSR-VTT", {"hit@1": 0.25}, model="m")
    write_score_file(tmp_path, "video", "SynthMotion", {"hit@1": 1.0}, model="m")
    write_score_file(tmp_path, "visdoc", "ViDoRe_docvqa", {"hit@1": 0.0, "ndcg_linear@5": 0.75}, model="m")
    stored = json.loads((tmp_path / "video" / "MSR-VTT_score.json").read_text())
    assert stored == {"hit@1": 0.25, "benchmark_version": BENCHMARK_VERSION, "model": "m", "in_catalog": True}

    report = write_model_summary(tmp_path, "m", {"num_frames": 8})
    assert json.loads((tmp_path / "m.json").read_text()) == report
    assert report["metadata"] == {"model_name": "m", "benchmark_version": BENCHMARK_VERSION, "num_frames": 8}
    assert set(report["metrics"]["video"]) == {"MSR-VTT", "SynthMotion"}
    summary = report["summary"]
    # visdoc uses ndcg_linear@5, not hit@1; overall is the mean over datasets.
    assert summary["catalog"] == pytest.approx({"image": 0.5, "video": 0.25, "visdoc": 0.75, "overall": 0.5})
    assert summary["all"]["video"] == pytest.approx(0.625)
    assert summary["all"]["overall"] == pytest.approx((0.5 + 0.25 + 1.0 + 0.75) / 4)
    assert summary["outside_catalog"] == ["SynthMotion"] and summary["complete"] is False
    assert summary["datasets_scored"]["video"] == "1/18"
    assert summary_line(summary) == "image 0.500 | video 0.625 | visdoc 0.750 | overall 0.625"


def test_versions_are_never_mixed(tmp_path):
    write_score_file(tmp_path, "visdoc", "ViDoRe_docvqa", {"ndcg_linear@5": 0.7}, model="m", benchmark_version="v2.0.0")
    with pytest.raises(ValueError, match="v2.0.0"):
        write_model_summary(tmp_path, "m")


def test_tiny_vlm_scored_on_the_synthetic_v2_as_video(tmp_path):
    """The one end-to-end check: a tiny Qwen2-VL with a video path, the synthetic V2, score files."""
    from sde_ray.config import ModelConfig
    from sde_ray.data.synth_v2 import write_synthetic_v2
    from sde_ray.eval.encode import ModelEncoder
    from sde_ray.eval.mmeb_v2 import evaluate_v2
    from sde_ray.models import BatchProcessor, build_model

    config = ModelConfig(kind="vlm", name_or_path="tiny-qwen2-vl", video_frames=4)
    encoder = ModelEncoder(build_model(config), BatchProcessor(config), batch_size=8)
    root = write_synthetic_v2(tmp_path / "v2", videos=6, frames=6, documents=2)
    report = evaluate_v2(root, encoder, tmp_path / "out", model="tiny", num_frames=4)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*_score.json")) == [
        "SynthClips_score.json", "SynthDocs_score.json", "SynthMotion_score.json"]
    motion, docs = report["metrics"]["video"]["SynthMotion"], report["metrics"]["visdoc"]["SynthDocs"]
    assert motion["num_data"] == 6 and motion["num_corpus"] == 4 and docs["num_corpus"] == 4
    # k=10 covers each whole corpus: every relevant item is retrieved.
    assert motion["hit@10"] == 1.0 and docs["recall@10"] == 1.0 and 0 < docs["ndcg_linear@10"] <= 1
    assert all(0 <= v <= 1 for s in (motion, docs) for k, v in s.items() if "@" in k)
    assert report["metadata"]["video_input"] == "video" and report["summary"]["all"]["overall"] is not None
