"""Stitching: a profile (+ its level database) -> a compressed model folder that transformers and evopress load.

Each method module exposes `stitch(model_dir, profile, db, out_dir) -> report dict`; this module dispatches by
method and holds the helpers they share (reading a profile, writing a model folder atomically).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

from evopress.errors import UserError, require
from evopress.io import atomic_write_json, sha256_file
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


def write_model_folder(model, tokenizer, out_dir: Path, source: str, extra: dict[str, dict]) -> dict:
    """save_pretrained + tokenizer + evopress manifest + extra json files into a temp folder, then one rename.

    A reader sees either the previous folder or the complete new one, never a half-written model.
    """
    from evopress.models import MANIFEST, strip_gguf_quantization

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    strip_gguf_quantization(model)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, obj in extra.items():
        atomic_write_json(tmp / name, obj)
    manifest = {
        "source": source,
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    atomic_write_json(tmp / MANIFEST, manifest)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return manifest
