"""Which calibration rows a search and its baselines score: `methods.<m>.fitness_rows` (`--fitness-rows`).

A level database fits every level to its first `n_samples` calibration rows (GPTQ and SparseGPT minimise the
reconstruction error on exactly those inputs). Scored on the same rows, every level looks better than it is, and
unevenly so, and a search then fits the database's fit: on the main job (SmolLM2, 3 bits, database on rows 0..15,
DP start, 8 generations) the mean KL of the DP profile is 0.270 on those rows and 0.355 on rows 16..31; the search
scored on rows 0..15 gained 0.2% there and 0.3% on held-out text, the same search scored on rows 16..31 gained 1.1%
there and 0.7% on held-out text (and 0.5% on perplexity, where the first lost 0.3%).

    all      every calibration row (the default)
    unseen   the rows after the database's n_samples: the search fits the model, not the database's sample
    N        the first N rows (e.g. depth beside a database method with a larger calibration set)
"""

from __future__ import annotations

from pathlib import Path

import torch

from evopress.errors import require

ALL_ROWS = "all"
UNSEEN = "unseen"
ALLOWED = "all, unseen or a number of rows"


def check_fitness_rows(value) -> None:
    """One-line error unless `value` is one of the allowed settings (not yet checked against any data)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise_bad(value)
    if isinstance(value, str) and value not in (ALL_ROWS, UNSEEN):
        raise_bad(value)
    if isinstance(value, int):
        require(value >= 1, f"fitness_rows {value}: a number of rows must be >= 1; allowed: {ALLOWED}")


def raise_bad(value) -> None:
    require(False, f"fitness_rows {value!r}; allowed: {ALLOWED}")


def database_rows(db: Path | None) -> int | None:
    """How many calibration rows the database at `db` was fitted on (its `n_samples`), None without one."""
    if db is None:
        return None
    from evopress.database import LevelDatabase

    return int(LevelDatabase.open(Path(db)).params["n_samples"])


def row_span(value, n_calibration: int, n_database: int | None) -> tuple[int, int]:
    """[first, end) of the calibration rows `value` names, with a one-line error where there are none."""
    check_fitness_rows(value)
    if value == ALL_ROWS:
        return 0, n_calibration
    if value == UNSEEN:
        require(
            n_database is not None,
            f"fitness_rows {UNSEEN!r} needs a level database (none here: depth has none); allowed here: all "
            "or a number of rows",
        )
        require(
            n_database < n_calibration,
            f"fitness_rows {UNSEEN!r}: the database was fitted on {n_database} of the {n_calibration} calibration "
            f"rows, so none is left; raise data.n_calibration above the database's n_samples",
        )
        return n_database, n_calibration
    require(
        value <= n_calibration,
        f"fitness_rows {value} is more than the {n_calibration} calibration rows; allowed: 1..{n_calibration}",
    )
    return 0, int(value)


def fitness_tokens(calibration: torch.Tensor, value, db: Path | None) -> torch.Tensor:
    """The rows of `calibration` ([n, seq_len]) a search or baseline scores."""
    first, end = row_span(value, len(calibration), database_rows(db))
    return calibration[first:end]
