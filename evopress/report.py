"""The results table of the evaluate stage's metrics, and the files and plots the tracking logs.

Size is the compressor's `size_share` (one rule for every method: the share of the dense transformer-block
weights' bits the compressed model keeps, at 16 bits each); embeddings and the LM head are never compressed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from evopress.errors import require

TABLE_COLUMNS = ("method", "profile", "target", "heldout ppl", "KL", "size (% dense blocks)")


# --- table -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _target(value) -> str:
    """3.0 -> '3', 0.625 -> '0.625'; the dense row has none."""
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def table_rows(metrics: dict) -> list[dict]:
    first = next(iter(metrics.values()))
    ppl_key = next(k for k in first if k.endswith("_perplexity"))
    kl_key = ppl_key.replace("_perplexity", "_kl")
    out = []
    for row in metrics.values():
        out.append(
            {
                "method": row["method"],
                "profile": row["profile"],
                "target": _target(row.get("target")),
                "heldout ppl": _fmt(row.get(ppl_key), 2),
                "KL": _fmt(row.get(kl_key), 4),
                "size (% dense blocks)": f"{100 * row['size']:.1f}",
            }
        )
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_metrics(path: Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"no metrics at {str(path)!r}; run the evaluate stage first (dvc repro evaluate)")
    metrics = json.loads(path.read_text())
    require(bool(metrics), f"{str(path)!r} holds no rows")
    return metrics


# --- files the plots and the tracking read -----------------------------------------------------------------------
def fitness_figure(history_csv: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([int(r["generation"]) for r in rows], [float(r["fitness"]) for r in rows], marker=".")
    ax.set(
        xlabel="generation",
        ylabel="KL to dense (calibration)",
        title=f"search: {Path(history_csv).parent.name}",
    )
    fig.tight_layout()
    return fig


def profile_figure(profile_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units = json.loads(Path(profile_path).read_text())["units"]
    fig, ax = plt.subplots(figsize=(max(6, len(units) * 0.08), 3.5))
    ax.bar(range(len(units)), list(units.values()))
    ax.set(xlabel="unit (forward order)", ylabel="level", title=f"profile: {Path(profile_path).parent.name}")
    fig.tight_layout()
    return fig
