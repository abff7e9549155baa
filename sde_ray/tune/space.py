"""Search spaces for sweeps: dotted config keys mapped to Ray Tune domains, checked before any trial.

A sweep's `tune.space` maps any leaf key of the config tree to a spec:

    spectral.eps_strong:   {type: uniform, low: 0.0, high: 0.3}
    train.lr:              {type: loguniform, low: 1.0e-4, high: 3.0e-3}
    spectral.alpha.kind:   {type: choice, values: [linear, cosine, sigmoid]}
    train.seed:            {type: randint, low: 0, high: 1000}      # high is exclusive, as in Tune
    loss.w_hellinger:      {type: grid, values: [0.0, 0.5, 1.0]}    # every value, in every sample

`validate_space` rejects a key that is not in the config tree (naming it and the valid keys), a
malformed spec, and values the config would reject (a wrong type, or a combination `validate()`
refuses, e.g. `spectral.eps_weak` above 1), so a typo fails in a second instead of after the
first trial has started its workers.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from sde_ray.config import Config, ConfigError, _close_names, with_values

# Fields each spec type needs; the builders below turn a checked spec into a Tune domain.
SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "choice": ("values",),
    "grid": ("values",),
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "randint": ("low", "high"),
}


def _domain_choice(spec: dict) -> Any:
    from ray import tune

    return tune.choice(list(spec["values"]))


def _domain_grid(spec: dict) -> Any:
    from ray import tune

    return tune.grid_search(list(spec["values"]))


def _domain_uniform(spec: dict) -> Any:
    from ray import tune

    return tune.uniform(float(spec["low"]), float(spec["high"]))


def _domain_loguniform(spec: dict) -> Any:
    from ray import tune

    return tune.loguniform(float(spec["low"]), float(spec["high"]))


def _domain_randint(spec: dict) -> Any:
    from ray import tune

    return tune.randint(int(spec["low"]), int(spec["high"]))


DOMAIN_BUILDERS = {
    "choice": _domain_choice,
    "grid": _domain_grid,
    "uniform": _domain_uniform,
    "loguniform": _domain_loguniform,
    "randint": _domain_randint,
}

# Search algorithms that cannot enumerate a grid (they sample every dimension themselves).
MODEL_BASED_SEARCH = ("optuna", "hyperopt")


def leaf_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (what a search space may name)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(leaf_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def check_key(key: str) -> None:
    """Raises ConfigError unless `key` is a dotted leaf of the config tree (tune.* excluded)."""
    valid = [k for k in leaf_keys() if not k.startswith("tune.")]
    if key not in valid:
        raise ConfigError(f"tune.space: unknown config key '{key}'.{_close_names(key, valid)}")


def flatten_space(space: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested mappings: a CLI override `tune.space.train.lr={type: ...}` arrives nested."""
    flat: dict[str, Any] = {}
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(spec, dict) and spec and "type" not in spec and all(isinstance(v, dict) for v in spec.values()):
            flat.update(flatten_space(spec, dotted + "."))
        else:
            flat[dotted] = spec
    return flat


def _check_spec(key: str, spec: Any) -> None:
    where = f"tune.space.{key}"
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: expected a mapping with a 'type' ({', '.join(SPEC_FIELDS)}), got {spec!r}.")
    kind = spec["type"]
    if kind not in SPEC_FIELDS:
        raise ConfigError(f"{where}.type: {kind!r} is not one of {', '.join(SPEC_FIELDS)}.")
    expected = set(SPEC_FIELDS[kind]) | {"type"}
    missing = expected - set(spec)
    extra = set(spec) - expected
    if missing or extra:
        raise ConfigError(
            f"{where}: type {kind} takes exactly {', '.join(sorted(expected))}"
            + (f"; missing {', '.join(sorted(missing))}" if missing else "")
            + (f"; unexpected {', '.join(sorted(extra))}" if extra else "")
            + "."
        )
    if kind in ("choice", "grid"):
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(f"{where}.values: expected a non-empty list, got {spec['values']!r}.")
        return
    low, high = spec["low"], spec["high"]
    number = int if kind == "randint" else (int, float)
    for name, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, number):
            raise ConfigError(f"{where}.{name}: expected {'an integer' if kind == 'randint' else 'a number'}, got {bound!r}.")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be < high ({high}).")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: loguniform needs low > 0, got {low}.")


def _candidate_values(spec: dict) -> list[Any]:
    """The values a spec can produce that are worth checking against the config: all, or the ends."""
    kind = spec["type"]
    if kind in ("choice", "grid"):
        return list(spec["values"])
    if kind == "randint":
        return [int(spec["low"]), int(spec["high"]) - 1]
    return [float(spec["low"]), float(spec["high"])]


def validate_space(
    space: dict[str, Any], base: Config, search_alg: str = "random", check: Callable[[Config], None] | None = None
) -> None:
    """Checks every key, spec and candidate value of `space` against the config built on `base`.

    `check` adds the caller's own rules for a trial's config (run on every candidate).
    """
    if not isinstance(space, dict) or not space:
        raise ConfigError("tune.space: a sweep needs at least one key to search over.")
    for key, spec in space.items():
        check_key(key)
        _check_spec(key, spec)
        if search_alg in MODEL_BASED_SEARCH and spec["type"] == "grid":
            raise ConfigError(
                f"tune.space.{key}: type grid is not supported by search_alg={search_alg}; use choice."
            )
        if search_alg == "grid" and spec["type"] not in ("grid", "choice"):
            raise ConfigError(
                f"tune.space.{key}: search_alg=grid enumerates values; type {spec['type']} has none "
                "(use grid or choice, or search_alg=random)."
            )
        for value in _candidate_values(spec):
            try:
                candidate = with_values(base, {key: value})
                if check is not None:
                    check(candidate)
            except ConfigError as exc:
                raise ConfigError(f"tune.space.{key}: value {value!r} is rejected by the config: {exc}") from exc


def build_param_space(space: dict[str, Any], search_alg: str = "random") -> dict[str, Any]:
    """Tune domains keyed by dotted config key. With search_alg=grid, choices are enumerated too."""
    domains = {}
    for key, spec in space.items():
        kind = "grid" if search_alg == "grid" and spec["type"] == "choice" else spec["type"]
        domains[key] = DOMAIN_BUILDERS[kind](spec)
    return domains


def grid_size(space: dict[str, Any], search_alg: str = "random") -> int:
    """Trials one pass over the grid dimensions makes (Tune repeats the grid num_samples times)."""
    size = 1
    for spec in space.values():
        if spec["type"] == "grid" or (search_alg == "grid" and spec["type"] == "choice"):
            size *= len(spec["values"])
    return size
