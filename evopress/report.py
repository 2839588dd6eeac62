"""Evaluation of every profile the pipeline made, the results table, and the plots the tracking logs.

Size is reported the same way for every method: the share of the dense model's transformer-block weights that the
compressed model keeps, counted in bits at 16-bit precision (depth: parameters of the kept sublayers; sparsity:
non-zero weights, index overhead not counted; quantization: bits per weight / 16, group scales not counted).
Embeddings and the LM head are never compressed here, so they are left out of the share.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from evopress.errors import require

TABLE_COLUMNS = ("method", "profile", "budget", "heldout ppl", "KL", "size (% dense blocks)")


# --- size --------------------------------------------------------------------------------------------------------
def _depth_unit_params(adapter, unit: str) -> int:
    parts = unit.split(".")  # block.<i> or block.<i>.<attn|mlp>
    module = adapter.blocks[int(parts[1])] if len(parts) == 2 else adapter.sublayer(int(parts[1]), parts[2])
    return sum(p.numel() for p in module.parameters())


def size_share(method: str, adapter, comp, units: dict) -> float:
    """Share (0..1) of the dense block weights' bits the profile keeps."""
    total = sum(p.numel() for b in adapter.blocks for p in b.parameters())
    if method == "depth":
        removed = sum(_depth_unit_params(adapter, u) for u, lvl in units.items() if lvl)
        return 1.0 - removed / total
    if method == "sparsity":
        return 1.0 - comp.total_cost(units) / total  # cost = pruned weights
    if method == "quantization":
        linear = sum(comp.sizes.values())
        bits = comp.total_cost(units) + 16 * (total - linear)  # norms and any other block weights stay 16-bit
        return bits / (16 * total)
    raise ValueError(f"no size rule for method {method!r}")


# --- evaluation --------------------------------------------------------------------------------------------------
def profile_paths(root: Path, method: str) -> list[tuple[str, Path]]:
    """(label, profile.json) of the searched profile and every baseline of one method, searched first."""
    out = []
    searched = root / "runs/search" / method / "profile.json"
    if searched.is_file():
        out.append(("evopress", searched))
    for p in sorted((root / "runs/baselines" / method).glob("*/profile.json")):
        out.append((p.parent.name, p))
    return out


def evaluate_all(root: Path, params, log=print) -> dict:
    """Held-out metrics of the dense model and of every profile; one fresh model per method (profiles mutate it)."""
    from evopress.adapter import ModelAdapter
    from evopress.data import load_tokens
    from evopress.evaluate import evaluate_live, evaluate_profile
    from evopress.fitness import DenseReference
    from evopress.methods import make_compressor
    from evopress.models import load_model
    from evopress.profile import read_profile

    c = params.compute
    model_dir, data_dir = root / "data/model", root / "data/text"
    sets = {name: load_tokens(data_dir, name) for name in params.evaluate.sets}

    def load():
        return ModelAdapter(load_model(str(model_dir), dtype=c.dtype)[0])

    def measure(adapter, refs, apply=None) -> dict:
        out = {}
        for name, tokens in sets.items():
            m = (
                apply(tokens, refs.get(name))
                if apply
                else evaluate_live(adapter, tokens, refs.get(name), c.batch_size)
            )
            out[f"{name}_perplexity"] = m["perplexity"]
            if "kl" in m:
                out[f"{name}_kl"] = m["kl"]
        return out

    adapter = load()
    refs = {}
    if params.evaluate.kl:
        refs = {
            n: DenseReference.build(adapter, t, topk=c.topk or None, batch_size=c.batch_size)
            for n, t in sets.items()
        }
    rows = {
        "dense": {"method": "dense", "profile": "dense", "budget": 0.0, "size": 1.0, **measure(adapter, {})}
    }
    log(f"dense: {rows['dense']}")
    for method in params.methods:
        for label, path in profile_paths(root, method):
            adapter = (
                load()
            )  # profiles of database methods overwrite weights: start each from the dense model
            spec = read_profile(path)
            db = root / "data/db" / method
            comp = make_compressor(method, adapter, spec["target"], db=db, options=spec["options"])
            units = spec["units"]

            def apply(tokens, ref, comp=comp, units=units, adapter=adapter):
                return evaluate_profile(adapter, comp, units, tokens, ref, c.batch_size)

            row = {"method": method, "profile": label, "budget": spec["budget"], "target": spec["target"]}
            row["size"] = size_share(method, adapter, comp, units)  # before applying: dropped modules may go
            row.update(measure(adapter, refs, apply))
            stitched = root / "models" / method
            if label == "evopress" and stitched.is_dir():
                # The deliverable itself, loaded from its folder: must match the live profile's perplexity.
                s = ModelAdapter(load_model(str(stitched), dtype=c.dtype)[0])
                row["stitched_perplexity"] = evaluate_live(
                    s, sets[params.evaluate.sets[0]], None, c.batch_size
                )["perplexity"]
            rows[f"{method}/{label}"] = row
            log(f"{method}/{label}: {row}")
    return rows


# --- table -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


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
                "budget": _fmt(row.get("target", row.get("budget")), 3).rstrip("0").rstrip("."),
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
def write_layers_csv(profile_path: Path, out: Path) -> None:
    """unit, block, kind, level of a profile: the per-layer plot DVC and MLflow show."""
    from evopress.io import atomic_write_text

    units = json.loads(Path(profile_path).read_text())["units"]
    rows = ["unit,block,kind,level"]
    for unit, level in units.items():
        parts = unit.split(".")
        block = next((p for p in parts if p.isdigit()), "")
        rows.append(f"{unit},{block},{parts[-1]},{level}")
    atomic_write_text(out, "\n".join(rows) + "\n")


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
