"""Profiles on disk: human-readable json, unit -> level, with the budget, fitness and provenance beside it.

{"method", "target", "options", "source" ("search" | "baseline:<name>"), "budget", "fitness" (KL or null),
 "model_sha256", "units": {unit: level}}
"""

from __future__ import annotations

import json
from pathlib import Path

from evopress.errors import UserError, require
from evopress.io import atomic_write_json, atomic_write_text

KEYS = ("method", "target", "options", "source", "budget", "fitness", "model_sha256", "units")


def model_sha256(model_dir: Path | None) -> str | None:
    """The prepared model's identity (its manifest's sha256), or None for a model without a manifest."""
    path = Path(model_dir) / "evopress_model.json" if model_dir else None
    return json.loads(path.read_text()).get("sha256") if path and path.exists() else None


def make_profile(compressor, units: dict, *, target, source: str, fitness=None, sha=None) -> dict:
    return {
        "method": compressor.method,
        "target": target,
        "options": dict(getattr(compressor, "options", {}) or {}),
        "source": source,
        "budget": compressor.total_cost(units),
        "fitness": None if fitness is None else float(fitness),
        "model_sha256": sha,
        "units": {u: int(units[u]) for u in compressor.units()},
    }


def save_profile(path: Path, profile: dict) -> None:
    atomic_write_json(Path(path), profile)


def read_profile(path: Path, keys: tuple[str, ...] = KEYS) -> dict:
    """A profile json checked for `keys` (stitching accepts hand-written ones: method, target and units)."""
    path = Path(path)
    require(path.is_file(), f"no profile at {str(path)!r}")
    try:
        profile = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{str(path)!r} is not valid json: {err}") from err
    require(isinstance(profile, dict), f"{str(path)!r} is not a profile (expected a json object)")
    missing = [k for k in keys if k not in profile]
    require(not missing, f"{str(path)!r} is not a profile: missing {missing}")
    require(isinstance(profile["units"], dict), f"{str(path)!r}: 'units' must map unit -> level")
    return profile


def validate_units(units: dict, compressor) -> None:
    """One-line error unless `units` names exactly the compressor's units, each at one of its levels."""
    expected = compressor.units()
    unknown = [u for u in units if u not in set(expected)]
    missing = [u for u in expected if u not in units]
    require(
        not unknown,
        f"profile names {len(unknown)} unit(s) the model does not have, e.g. {unknown[:3]}; "
        f"expected units like {expected[:2]}",
    )
    require(not missing, f"profile lacks {len(missing)} unit(s) of the model, e.g. {missing[:3]}")
    bad = [(u, lvl) for u, lvl in units.items() if lvl not in compressor.levels(u)]
    require(not bad, f"profile has levels the units cannot take, e.g. {bad[:3]}")
    # A profile must spend exactly its target's budget: one off it (a hand edit, another target) would be stitched
    # and reported under a target it does not meet.
    problem = compressor.budget_problem(units) if hasattr(compressor, "budget_problem") else None
    require(problem is None, f"profile is off its target's budget: {problem}")


def load_profile(path: Path, compressor) -> dict:
    """Read a profile json and check it against `compressor`; returns the whole dict (units are ints)."""
    profile = read_profile(path)
    require(
        profile["method"] == compressor.method,
        f"profile {str(path)!r} is for method {profile['method']!r}, not {compressor.method!r}",
    )
    profile["units"] = {u: int(v) for u, v in profile["units"].items()}
    validate_units(profile["units"], compressor)
    return profile


def write_layers_csv(profile_path: Path, out: Path) -> None:
    """unit, block, kind, level of a profile: the per-layer plot DVC and MLflow show."""
    units = json.loads(Path(profile_path).read_text())["units"]
    rows = ["unit,block,kind,level"]
    for unit, level in units.items():
        parts = unit.split(".")
        block = next((p for p in parts if p.isdigit()), "")
        rows.append(f"{unit},{block},{parts[-1]},{level}")
    atomic_write_text(out, "\n".join(rows) + "\n")
