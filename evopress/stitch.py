"""Stitching: a profile (+ its level database) -> a compressed model folder that transformers and evopress load.

Each method module exposes `stitch(model_dir, profile, db, out_dir) -> report dict`; this module dispatches by
method and reads the profile; `models.write_model_folder` writes a model folder atomically for all of them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from evopress.errors import require
from evopress.methods import METHODS, check_method, needs_database
from evopress.profile import read_profile

STITCH_REPORT = "stitch.json"


def stitch(method: str, model_dir: Path, profile_path: Path, db: Path | None, out_dir: Path) -> dict:
    check_method(method)
    profile = read_profile(profile_path, keys=("method", "target", "units"))
    require(
        profile["method"] == method,
        f"profile {str(profile_path)!r} is for method {profile['method']!r}, not {method!r}",
    )
    if needs_database(method):
        require(db is not None, f"stitching {method} needs its level database (--db)")
    module = importlib.import_module(METHODS[method][0])
    require(hasattr(module, "stitch"), f"method {method!r} has no stitch yet")
    return module.stitch(Path(model_dir), profile, None if db is None else Path(db), Path(out_dir))
