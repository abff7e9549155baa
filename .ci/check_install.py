"""CI check in the main job's venv (runtime dependencies only): every module of the package imports,
and every `sde-ray` subcommand answers --help.

The main job exercises one path through the package; this catches the rest of it importing a module
that only the test extra provides (scipy was once such a module).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

import sde_ray
from sde_ray.cli import build_parser


def all_modules() -> list[str]:
    names = [sde_ray.__name__]
    for info in pkgutil.walk_packages(sde_ray.__path__, prefix=f"{sde_ray.__name__}."):
        names.append(info.name)
    return sorted(names)


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser (`train`, `data synth`, ...), nested subparsers included."""
    paths = []
    for action in parser._actions:  # argparse exposes subparsers only through this attribute
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.append(prefix + (name,))
                paths.extend(subcommands(child, prefix + (name,)))
    return paths


def main() -> int:
    failures = []
    modules = all_modules()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every broken module, not just the first
            failures.append(f"import {name}: {type(exc).__name__}: {exc}")
    commands = subcommands(build_parser()) + [("eval", "compare")]
    for path in commands:
        result = subprocess.run(["sde-ray", *path, "--help"], capture_output=True, text=True)
        if result.returncode != 0 or "usage" not in result.stdout.lower():
            failures.append(f"sde-ray {' '.join(path)} --help: exit {result.returncode}: {result.stderr.strip()[-300:]}")
    print(f"check_install: {len(modules)} modules imported, {len(commands)} subcommands answered --help, "
          f"{len(failures)} failures")
    for failure in failures:
        print(f"  FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
