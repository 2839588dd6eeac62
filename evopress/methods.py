"""Registry of compression methods: name -> compressor factory and baselines, resolved lazily.

Each method lives in its own modules and exposes
  evopress.compressors.<method>.make(adapter, target, *, db=None, options=None) -> Compressor
  evopress.baselines.<method>.BASELINES: dict[name, callable]  (each returns a Profile)
so adding a method touches only METHODS below.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from evopress.errors import require

# method -> (module with `make`, module with `BASELINES`, needs a level database)
METHODS: dict[str, tuple[str, str, bool]] = {
    "depth": ("evopress.compressors.depth", "evopress.baselines.depth", False),
    "sparsity": ("evopress.compressors.sparsity", "evopress.baselines.sparsity", True),
    "quantization": ("evopress.compressors.quantization", "evopress.baselines.quantization", True),
    "joint": ("evopress.compressors.joint", "evopress.baselines.joint", True),
}


def check_method(method: str) -> None:
    require(method in METHODS, f"unknown method {method!r}; allowed: {', '.join(METHODS)}")


def needs_database(method: str) -> bool:
    check_method(method)
    return METHODS[method][2]


def make_compressor(
    method: str, adapter, target: float, *, db: Path | None = None, options: dict | None = None
):
    check_method(method)
    if needs_database(method):
        require(
            db is not None,
            f"method {method!r} needs a level database (--db); build it with `evopress build-db`",
        )
    module = importlib.import_module(METHODS[method][0])
    return module.make(adapter, target, db=db, options=options or {})


def check_settings(method: str, target: float, options: dict, database: dict) -> None:
    """The method's own rules on its target, options and database settings (no model needed)."""
    check_method(method)
    importlib.import_module(METHODS[method][0]).check_settings(target, options, database)


def method_function(method: str, function: str):
    """A method module's function (`build_database`, `stitch`), or a one-line error when it has none."""
    check_method(method)
    module = importlib.import_module(METHODS[method][0])
    require(hasattr(module, function), f"method {method!r} has no {function} (nothing to do for it)")
    return getattr(module, function)


def baselines(method: str) -> dict:
    check_method(method)
    return importlib.import_module(METHODS[method][1]).BASELINES


def get_baseline(method: str, name: str):
    table = baselines(method)
    require(name in table, f"unknown baseline {name!r} for method {method!r}; allowed: {', '.join(table)}")
    return table[name]


def database_of(method: str, db: Path | None) -> Path | None:
    """The database folder a method reads (None for methods without one)."""
    return Path(db) if needs_database(method) and db is not None else None


def database_sha256(method: str, db: Path | None) -> str | None:
    """Content hash of a method's level database (None without one): recorded by search, stitch, evaluate."""
    from evopress.database import LevelDatabase

    db = database_of(method, db)
    return LevelDatabase.open(db).content_sha256() if db is not None else None


def check_stitch_options(method: str, options: dict | None) -> dict:
    """The method's stitch keywords (quantization: format=compressed-tensors|compressed-tensors-group|
    evopress-packed; sparsity: format=dense|sparse-bitmask; depth: none), checked by name and, for `format`,
    by value; a one-line error otherwise."""
    import inspect

    options = dict(options or {})
    allowed = list(inspect.signature(method_function(method, "stitch")).parameters)[4:]  # after the 4 inputs
    unknown = sorted(k for k in options if k not in allowed)
    require(
        not unknown,
        f"unknown stitch options {unknown} for method {method!r}; allowed: {', '.join(allowed) or 'none'}",
    )
    formats = getattr(importlib.import_module(METHODS[method][0]), "FORMATS", None)
    if "format" in options and formats:
        require(
            options["format"] in formats,
            f"stitch format {options['format']!r} for method {method!r}; allowed: {', '.join(formats)}",
        )
    return options
