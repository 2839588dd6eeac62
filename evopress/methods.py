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


def baselines(method: str) -> dict:
    check_method(method)
    return importlib.import_module(METHODS[method][1]).BASELINES


def get_baseline(method: str, name: str):
    table = baselines(method)
    require(name in table, f"unknown baseline {name!r} for method {method!r}; allowed: {', '.join(table)}")
    return table[name]
