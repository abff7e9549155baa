"""The package's import arrows, read from the source: a forbidden arrow fails here, not in review.

docs/architecture.md draws the parts and these rules. Every `import` / `from ... import` of every
module under sde_ray/ counts, at the top or inside a function, so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sde_ray"

# The Ray-free library: torch / numpy maths, encoders and data formats; rank and world_size are
# arguments. It may import itself and the two shared leaves below, nothing of the application.
LIBRARY = ("spectral", "losses", "models", "data")
SHARED_LEAVES = ("config", "distributed", "storage")
APPLICATION = ("train", "tune", "eval", "bench", "cli", "runs", "ray_cluster", "config_doc")
FRAMEWORKS = ("ray", "deepspeed", "wandb")
# Objectives and the spectral maths take plain values or their own small frozen dataclasses
# (`SDESpectral`, `SpectrumRule`, ...), never config sections: they do not import the config. The
# registry builders (`build_x(config, embed_dim)`, `spectrum_rule`) read the `Config` they are handed.
CONFIG_FREE = ("spectral", "losses")

# Explicit exceptions: (file relative to sde_ray/, imported top-level name). None today.
ALLOWED: set[tuple[str, str]] = set()


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, relative ones resolved."""
    package = list(path.relative_to(root.parent).parts[:-1])  # the file's package, __init__ or not
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            # `from sde_ray import train` names a part through its alias
            if name == "sde_ray":
                found.extend((node.lineno, f"sde_ray.{alias.name}") for alias in node.names)
    return found


def _part(path: Path, root: Path = PACKAGE) -> str:
    """The top-level part of the package a file belongs to: `spectral`, `train`, `config`, ..."""
    relative = path.relative_to(root)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _target(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "sde_ray":
        return parts[1] if len(parts) > 1 else None
    return parts[0] if parts[0] in FRAMEWORKS else None


def _violations(root: Path = PACKAGE, allowed: set = ALLOWED) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        part, relative = _part(path, root), path.relative_to(root).as_posix()
        for line, name in _imports(path, root):
            target = _target(name)
            if target is None or target == part or (relative, target) in allowed:
                continue
            where = f"sde_ray/{relative}:{line} imports {name}"
            if part in LIBRARY + SHARED_LEAVES and target not in LIBRARY + SHARED_LEAVES:
                out.append(f"{where}: the library (and config/distributed) must not import {target}")
            if part in CONFIG_FREE and target == "config":
                out.append(f"{where}: objectives and spectral maths take plain values, not config sections")
            if part in SHARED_LEAVES and target in LIBRARY:
                out.append(f"{where}: config/distributed are leaves, imported by the library, never importing it")
            if part == "eval" and target in ("train", "tune"):
                out.append(f"{where}: Eval must not import Train or Tune (Train -> Eval is the allowed direction)")
            if part in ("runs", "ray_cluster") and target not in ("config", "storage", "ray", "wandb"):
                out.append(f"{where}: runs/ray_cluster are shared by Train, Tune and Eval and import none of them")
    return out


def test_no_forbidden_import_arrow():
    violations = _violations()
    assert not violations, "\n".join(violations)


def test_the_allow_list_only_names_arrows_that_still_exist():
    """An exception that no longer matches anything is stale: delete it."""
    present = {(path.relative_to(PACKAGE).as_posix(), _target(name))
               for path in PACKAGE.rglob("*.py") for _, name in _imports(path)}
    assert ALLOWED <= present, f"stale ALLOWED entries: {sorted(ALLOWED - present)}"


def test_private_ray_apis_and_ray_init_are_fenced():
    """`ray._private` / generated protobufs only in tune/placement.py (the fence says why and for
    which Ray version); `ray.init` only in ray_cluster.py (one place joins or starts Ray)."""
    private, inits = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        for line, name in _imports(path):
            if name.startswith(("ray._private", "ray.core.generated")) and relative != "tune/placement.py":
                private.append(f"{relative}:{line} {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                    and relative != "ray_cluster.py"):
                inits.append(f"{relative}:{node.lineno}")
    assert not private, f"private Ray APIs outside sde_ray/tune/placement.py: {private}"
    assert not inits, f"ray.init outside sde_ray/ray_cluster.py: {inits}"


def test_the_rules_see_a_forbidden_arrow(tmp_path):
    """The reader itself: a planted `import ray` in a library file, an Eval -> Train import and an
    objective importing the config are caught."""
    fake = tmp_path / "sde_ray"
    (fake / "losses").mkdir(parents=True)
    (fake / "eval").mkdir()
    (fake / "losses" / "bad.py").write_text("def f():\n    import ray\n")
    (fake / "eval" / "bad.py").write_text("from ..train import loop\n")
    (fake / "losses" / "typed.py").write_text("from sde_ray.config import LossConfig\n")
    found = _violations(fake, set())
    assert any("losses/bad.py:2 imports ray" in v for v in found), found
    assert any("eval/bad.py:1 imports sde_ray.train" in v and "Eval must not" in v for v in found), found
    assert any("losses/typed.py:1 imports sde_ray.config" in v and "plain values" in v for v in found), found


def test_readme_layout_matches_the_tree():
    """README's Layout block names every top-level module and package of sde_ray/, and nothing else."""
    text = (PACKAGE.parent / "README.md").read_text()
    block = text[text.index("## Layout"):]
    block = block[block.index("```") + 3:]
    block = block[: block.index("```")]
    listed = {line.split()[0].rstrip("/") for line in block.splitlines() if line.startswith("  ") and line.strip()}
    present = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    present |= {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    listed = {name.removesuffix(".py") for name in listed}
    assert listed == present, f"README lists {sorted(listed - present)} that do not exist; misses {sorted(present - listed)}"
    for top in ("jobs", "cluster", "configs", "tests", "docs"):
        assert f"\n{top}/" in block and (PACKAGE.parent / top).is_dir()
