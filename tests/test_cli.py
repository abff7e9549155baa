"""The `sde-ray` console script: config show, override errors, and the README's two commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sde_ray.cli import build_parser, main
from sde_ray.config import from_dict, load_config

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sde_ray.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_config_show_prints_the_resolved_config():
    result = _run("config", "show", "--config", "configs/default.yaml", "loss.name=infonce", "train.lr=3e-4")
    assert result.returncode == 0, result.stderr
    shown = from_dict(yaml.safe_load(result.stdout))
    expected = load_config(REPO / "configs/default.yaml", ["loss.name=infonce", "train.lr=3e-4"])
    assert shown == expected
    assert shown.loss.name == "infonce" and shown.train.lr == 3e-4


def test_config_typo_is_one_clear_line_and_exit_code_2():
    result = _run("config", "show", "--config", "configs/default.yaml", "train.lrr=1")
    assert result.returncode == 2
    assert "config error: Unknown config key 'train.lrr'" in result.stderr
    assert "Did you mean lr" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_a_config_error(capsys):
    assert main(["config", "show", "--config", "nope/missing.yaml"]) == 2
    assert "config error: nope/missing.yaml: config file not found" in capsys.readouterr().err


def _quick_start_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", quick, re.S)


def test_readme_quick_start_has_the_two_commands():
    blocks = _quick_start_blocks()
    assert len(blocks) == 2
    run_block, test_block = blocks
    assert "pip install torch==2.13.0" in run_block.split("&&")[0]  # CPU torch before anything else
    assert "sde-ray train --config configs/default.yaml" in run_block
    assert "pytest" in test_block and "torch==2.13.0" in test_block.split("&&")[0]
    # CI runs both blocks verbatim, each in its own fresh venv, and checks the main job's venv.
    ci = (REPO / ".ci" / "run").read_text()
    assert "print(blocks[int(sys.argv[1])])" in ci
    assert "run_block main 0" in ci and "run_block test 1" in ci
    assert "python3 -m venv" in ci and ".ci/check_install.py" in ci
    # ...and checks what the main job printed (tests/train/test_console.py runs the same check).
    assert 'tee -a "$SDE_RAY_CONSOLE"' in ci and '.ci/check_console.py "$venvs/main.console"' in ci


def test_every_subcommand_answers_help():
    """What CI's install check runs in the main job's venv, here in-process for the parser's commands."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_install", REPO / ".ci" / "check_install.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    paths = check.subcommands(build_parser())
    assert ("train",) in paths and ("data", "synth") in paths and ("config", "show") in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0, path
    assert main(["eval", "compare", "--help"]) == 0
