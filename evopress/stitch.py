"""Stitching: a profile (+ its level database) -> a compressed model folder that transformers and evopress load.

Each method module exposes `stitch(model_dir, profile, db, out_dir) -> report dict`; this module dispatches by
method and reads the profile; `models.write_model_folder` writes a model folder atomically for all of them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from evopress.errors import UserError, require
from evopress.methods import METHODS, check_method, needs_database

STITCH_REPORT = "stitch.json"


def load_profile(path: Path) -> dict:
    """A profile json as written by `search` / `baseline`, checked for the keys stitching needs."""
    path = Path(path)
    require(path.exists(), f"no profile at {str(path)!r}")
    try:
        profile = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"unreadable profile {str(path)!r}: {err}") from err
    missing = [k for k in ("method", "target", "units") if k not in profile]
    require(not missing, f"profile {str(path)!r} lacks {', '.join(missing)}")
    return profile


def stitch(method: str, model_dir: Path, profile_path: Path, db: Path | None, out_dir: Path) -> dict:
    check_method(method)
    profile = load_profile(profile_path)
    require(
        profile["method"] == method,
        f"profile {str(profile_path)!r} is for method {profile['method']!r}, not {method!r}",
    )
    if needs_database(method):
        require(db is not None, f"stitching {method} needs its level database (--db)")
    module = importlib.import_module(METHODS[method][0])
    require(hasattr(module, "stitch"), f"method {method!r} has no stitch yet")
    return module.stitch(Path(model_dir), profile, None if db is None else Path(db), Path(out_dir))
