"""The results table of the evaluate stage's metrics, and the files and plots the tracking logs.

Every figure of a compressed row is its stitched folder's, loaded through `evopress.load_model` (evaluate.py):
held-out perplexity and KL to dense as delivered, the folder's bytes on disk against the dense folder's, forward
tokens/s against the dense model's in the same run, and the storage format read from the folder. lm-eval's task
figures (`lm_eval.<task>.<metric>`, evaluate.lm_eval in params.yaml) get a column each when the rows hold them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from evopress.errors import require

TABLE_COLUMNS = (
    "method",
    "profile",
    "target",
    "heldout ppl",
    "KL",
    "size on disk (% dense)",
    "tokens/s (x dense)",
    "format",
    "loader",
)
LM_EVAL_PREFIX = "lm_eval."


# --- table -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _target(value) -> str:
    """3.0 -> '3', 0.625 -> '0.625'; the dense row has none."""
    return "-" if value is None else f"{value:.3f}".rstrip("0").rstrip(".")


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def lm_eval_keys(metrics: dict) -> list[str]:
    """Every `lm_eval.<task>.<metric>` key some row holds, in first-seen order."""
    keys: dict[str, None] = {}
    for row in metrics.values():
        keys.update((k, None) for k in row if k.startswith(LM_EVAL_PREFIX))
    return list(keys)


def table_rows(metrics: dict) -> list[dict]:
    first = next(iter(metrics.values()))
    ppl_key = next(k for k in first if k.endswith("_perplexity"))
    kl_key = ppl_key.replace("_perplexity", "_kl")
    tasks = lm_eval_keys(metrics)
    out = []
    for row in metrics.values():
        cells = {
            "method": row["method"],
            "profile": row["profile"],
            "target": _target(row.get("target")),
            "heldout ppl": _fmt(row.get(ppl_key), 2),
            "KL": _fmt(row.get(kl_key), 4),
            "size on disk (% dense)": _percent(row.get("size_on_disk")),
            "tokens/s (x dense)": _fmt(row.get("speed_vs_dense"), 2),
            "format": row.get("format", "-"),
            "loader": row.get("loader", "-"),
        }
        cells.update({k.removeprefix(LM_EVAL_PREFIX): _fmt(row.get(k), 4) for k in tasks})
        out.append(cells)
    return out


def markdown(rows: list[dict]) -> str:
    """A markdown table of `table_rows`: its columns, then any lm-eval columns the rows carry."""
    columns = list(TABLE_COLUMNS) + [k for k in (rows[0] if rows else {}) if k not in TABLE_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def load_metrics(path: Path) -> dict:
    path = Path(path)
    require(path.is_file(), f"no metrics at {str(path)!r}; run the evaluate stage first (dvc repro evaluate)")
    metrics = json.loads(path.read_text())
    require(bool(metrics), f"{str(path)!r} holds no rows")
    return metrics


# --- files the plots and the tracking read -----------------------------------------------------------------------
KL_LABEL = "KL to dense (lower is better)"
# What a level means, per method (0 is the method's reference), for the profile plot's axis.
LEVEL_LABELS = {
    "depth": "level (1 = removed)",
    "sparsity": "level (0 = target sparsity, higher = sparser)",
    "quantization": "bits",
    "joint": "bits (sublayer units: 1 = removed)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def best_so_far(values: list[float]) -> list[float]:
    """Running minimum: each generation scores fresh samples, so the per-generation fitness zigzags."""
    out, best = [], float("inf")
    for v in values:
        best = min(best, v)
        out.append(best)
    return out


def fitness_figure(history_csv: Path):
    plt = _pyplot()
    with open(history_csv) as f:
        rows = list(csv.DictReader(f))
    gens, fitness = [int(r["generation"]) for r in rows], [float(r["fitness"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(gens, fitness, marker=".", alpha=0.6, label="parent, this generation's samples")
    ax.plot(gens, best_so_far(fitness), drawstyle="steps-post", label="best so far")
    ax.set(
        xlabel="generation",
        ylabel=f"{KL_LABEL}\n(calibration)",
        title=f"search: {Path(history_csv).parent.name}",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    fig.tight_layout()
    return fig


def unit_kind(unit: str) -> tuple[int, str]:
    """(block index, kind) of a unit name: block.3.attn -> (3, attn), block.3.mlp.up_proj -> (3, mlp.up_proj),
    block.3 -> (3, block); a name outside that scheme is its own kind at index -1."""
    parts = unit.split(".")
    if len(parts) >= 2 and parts[0] == "block" and parts[1].isdigit():
        return int(parts[1]), ".".join(parts[2:]) or "block"
    return -1, unit


def profile_figure(profile_path: Path):
    """Levels per block, one colour (and legend entry) per unit kind: attention vs MLP, or each linear."""
    plt = _pyplot()
    spec = json.loads(Path(profile_path).read_text())
    by_kind: dict[str, list[tuple[int, int]]] = {}
    for unit, level in spec["units"].items():
        block, kind = unit_kind(unit)
        by_kind.setdefault(kind, []).append((block, level))
    blocks = 1 + max((b for pairs in by_kind.values() for b, _ in pairs), default=0)
    fig, ax = plt.subplots(figsize=(max(6, 2 + blocks * 0.25 * max(1, len(by_kind) / 2)), 3.5))
    width = 0.8 / len(by_kind)
    for i, (kind, pairs) in enumerate(by_kind.items()):
        xs = [b + (i - (len(by_kind) - 1) / 2) * width for b, _ in pairs]
        ax.bar(xs, [lv for _, lv in pairs], width=width, label=kind)
    ylabel = LEVEL_LABELS.get(spec.get("method"), "level")
    ax.set(xlabel="block", ylabel=ylabel, title=f"profile: {Path(profile_path).parent.name}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    # Beside the axes, not over the bars: a linear method has seven kinds.
    ax.legend(title="unit kind", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
