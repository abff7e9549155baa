"""scripts/device_check.py in its CPU mode (tiny sizes): every stage runs the project's code and
passes against its CPU reference, the JSON names each stage with its figures, and the script never
imports Ray (the GPU machine it is written for has none)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_check_passes_on_the_cpu_without_ray(tmp_path):
    out = tmp_path / "check.json"
    # `-X importtime` lists every module imported, so a Ray import anywhere in the check shows.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)
    run = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "scripts" / "device_check.py"),
                          "--device", "cpu", "--out", str(out)], capture_output=True, text=True, env=env,
                         timeout=600)
    report = json.loads(out.read_text())
    failed = {name: stage for name, stage in report["stages"].items() if not stage["pass"]}
    assert run.returncode == 0 and report["pass"], failed
    assert set(report["stages"]) == {"objective", "gradcache_zero2", "gradcache_zero3", "eval_encoding",
                                     "clip_throughput"}
    for stage in ("gradcache_zero2", "gradcache_zero3"):
        assert report["stages"][stage]["optimizer_steps"] == 2
        assert report["stages"][stage]["update_rel_error"] < 0.1
    assert report["stages"]["clip_throughput"]["samples_per_s"] > 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in run.stderr.splitlines()
                if line.startswith("import time:")}
    assert "deepspeed" in imported and "ray" not in imported
