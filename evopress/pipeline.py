"""The pipeline's stages on params.yaml and the `Layout`: what `evopress stage <name>` (every dvc.yaml cmd) runs.

`run_stage(name, params, layout, method, on_generation)` calls the stage's function in stages.py with the typed
settings of params.yaml and the layout's paths, and returns a `StageResult` (files written, metrics, tags, the
stitched model) that tracking records from outside.

Resume: databases and searches are `persist: true` outputs. A stamp beside each (`<out>.params.json`) holds the
settings and the sha256 of the code it was made with (`Layout.code`): the same ones resume the partial work,
others start afresh, so a database is never a mix of levels made by two versions of the code. Settings are
validated (params.check) before any stamp is compared, so a bad value never deletes finished work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from evopress import stages
from evopress.errors import require
from evopress.io import atomic_write_json, atomic_write_text, sha256_file
from evopress.layout import PER_METHOD, STAGES, Layout
from evopress.params import Params


@dataclass
class StageResult:
    """What a stage run wrote and measured, for tracking to record."""

    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)  # (file, artifact folder)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Callable] = field(default_factory=dict)  # artifact name -> () -> matplotlib figure
    model: tuple[str, Path, str, dict] | None = None  # (name, folder, sha256, params) of a stitched model


SOURCE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding the evopress package that runs


def code_sha256(layout: Layout, stage: str, method: str | None) -> str:
    """sha256 over the stage's code dependencies (every .py file under them, in a fixed order), read from the
    package that runs (the project's checkout when installed editable, as `make` does)."""
    files: list[Path] = []
    for dep in layout.code(stage, method):
        path = SOURCE_ROOT / dep
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(SOURCE_ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def superseded_name(path: Path) -> Path:
    """Where an output made with other settings is moved: beside it, stamped with the time it was superseded."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.superseded-{stamp}")
    n = 1
    while candidate.exists():  # two moves within one second keep both
        candidate, n = path.with_name(f"{path.name}.superseded-{stamp}-{n}"), n + 1
    return candidate


def move_aside(paths: list[Path], log=print) -> Path | None:
    """Move every existing path of `paths` into one `<first>.superseded-<time>` folder; returns it (None: nothing).

    Settings that change a persisted output never delete it: the old one stays on disk, named, for the user to
    compare or remove."""
    present = [p for p in paths if p.exists()]
    if not present:
        return None
    first = paths[0]
    aside = superseded_name(first)
    if len(paths) == 1:
        os.replace(first, aside)
    else:
        aside.mkdir(parents=True)
        for p in present:
            os.replace(p, aside / p.name)
    log(f"{first}: made with other settings or code; moved aside to {aside}, starting afresh")
    return aside


def fresh_unless_same(stamp: Path, out: Path, settings: dict, log=print, together: list[Path] = ()) -> None:
    """Keep `out` (to resume it) only when `stamp` holds the same settings; else move it (and `together`) aside.
    Then stamp it with them. The caller has validated `settings`: a bad value must never move finished work."""
    if out.exists() and (not stamp.is_file() or _read_json(stamp) != settings):
        move_aside([out, *together], log)
    elif out.exists():
        log(f"{out}: resuming (same settings and code)")
    atomic_write_json(stamp, settings)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # an unreadable stamp says nothing about the output: treat it as other settings


def _compute_tags(summary: dict) -> dict[str, str]:
    return {f"compute.{k}": str(v) for k, v in (summary or {}).items()}


def _ran_in(dtype: str, device: str = "cpu") -> dict[str, str]:
    """compute.* tags of a stage that ran its forward passes in `dtype` on `device` (resolved here when 'auto')."""
    from evopress.device import describe

    return _compute_tags(describe(dtype, device))


# --- the stages on params + layout -------------------------------------------------------------------------------
def prepare_model(p: Params, layout: Layout, _m, log) -> StageResult:
    manifest = stages.prepare_model(p.model.source, layout.model, p.model.dtype)
    log(f"saved {p.model.source} -> {layout.model} (sha256 {manifest['sha256'][:12]})")
    return StageResult(artifacts=[(layout.model / "evopress_model.json", None)], tags=_ran_in(p.model.dtype))


def prepare_data(p: Params, layout: Layout, _m, log) -> StageResult:
    manifest = stages.prepare_data(layout.model, p.data, layout.text)
    log(
        f"wrote {layout.text}: {manifest['calibration_tokens']} calibration, {manifest['heldout_tokens']} held-out tokens"
    )
    return StageResult(artifacts=[(layout.text / "data.json", None)])


def build_db(p: Params, layout: Layout, m: str, log) -> StageResult:
    from evopress.device import describe

    mp, out = p.methods[m], layout.db(m)
    settings = {"target": mp.target, **mp.database, "code_sha256": code_sha256(layout, "build_db", m)}
    fresh_unless_same(layout.stamp(out), out, settings, log)
    db = stages.build_db(m, layout.model, layout.text, out, mp.target, mp.database, p.compute)
    if db is None:
        return StageResult()
    db.manifest["code_sha256"] = settings["code_sha256"]
    db.manifest["compute"] = describe("float32")  # builders always run in float32
    db.flush()
    log(f"database {out}: {len(db.pairs())} files, {db.size_on_disk() / 1e6:.1f} MB")
    return StageResult(
        artifacts=[(out / "manifest.json", None)],
        tags={"database.sha256": db.content_sha256(), **_ran_in("float32")},
    )


def search(p: Params, layout: Layout, m: str, log, on_generation=None) -> StageResult:
    from evopress.report import fitness_figure, profile_figure

    mp, out = p.methods[m], layout.search(m)
    # Seeds that are also baselines start from the baselines stage's files (computed once, and the search then
    # starts from a row of the results table); a changed seed file is another search.
    seed_files = {
        n: layout.baselines(m) / n / "profile.json" for n in mp.search.seed_baselines if n in mp.baselines
    }
    settings = {
        "method": asdict(mp),
        "compute": asdict(p.compute),
        "code_sha256": code_sha256(layout, "search", m),
        "seed_files": {n: sha256_file(f) for n, f in seed_files.items() if f.is_file()},
    }
    checkpoint = out / "checkpoint.json"
    # A search's outputs belong together: moved aside as one, so no profile outlives the checkpoint it came from.
    others = [out / n for n in ("profile.json", "search.json", "history.csv", "layers.csv")]
    fresh_unless_same(
        layout.stamp(checkpoint), checkpoint, json.loads(json.dumps(settings)), log, together=others
    )
    summary = stages.search(
        m,
        layout.model,
        layout.text,
        layout.db(m),
        out,
        mp.target,
        mp.options,
        mp.search,
        p.compute,
        on_generation,
        seed_files,
        mp.fitness_rows,
    )
    log(
        f"profile -> {out / 'profile.json'} (fitness KL {summary['fitness']}, from {summary['initial_source']})"
    )
    metrics = {f"final_{k}": v for k, v in summary.items() if isinstance(v, int | float) and k != "budget"}
    tags = {"search.initial_source": str(summary["initial_source"]), **_compute_tags(summary["compute"])}
    if summary["database_sha256"]:
        tags["database.sha256"] = summary["database_sha256"]
    return StageResult(
        artifacts=[(out / n, None) for n in ("profile.json", "history.csv", "search.json", "layers.csv")],
        metrics=metrics,
        tags=tags,
        figures={
            "plots/fitness.png": lambda: fitness_figure(out / "history.csv"),
            "plots/profile.png": lambda: profile_figure(out / "profile.json"),
        },
    )


def baselines(p: Params, layout: Layout, m: str, log) -> StageResult:
    mp, out = p.methods[m], layout.baselines(m)
    atomic_write_json(
        out / "index.json", {"method": m, "baselines": mp.baselines}
    )  # the out exists when empty
    result = StageResult(tags=_ran_in(p.compute.dtype, p.compute.device))
    for name in mp.baselines:
        t0 = time.perf_counter()
        profile = stages.baseline(
            m, name, layout.model, layout.text, layout.db(m), out / name, mp.target, mp.options, p.compute,
            seed=mp.baseline_seed, tokens=mp.baseline_tokens, fitness_rows=mp.fitness_rows,
        )  # fmt: skip
        log(f"baseline {name}: budget {profile['budget']}")
        result.metrics[f"{name}_seconds"] = time.perf_counter() - t0
        result.artifacts.append((out / name / "profile.json", f"profiles/{name}"))
    return result


def stitch(p: Params, layout: Layout, m: str, log) -> StageResult:
    out, profile = layout.stitched(m), layout.search(m) / "profile.json"
    report = stages.stitch(m, layout.model, profile, layout.db(m), out, p.methods[m].stitch)
    log(f"stitched {out}")
    manifest = json.loads((out / "evopress_model.json").read_text())
    tags = {"database.sha256": report["database_sha256"]} if report.get("database_sha256") else {}
    tags.update(_ran_in("float32"))  # stitching loads and writes the float32 reference
    return StageResult(
        artifacts=[(out / "evopress_model.json", None), (profile, None)],
        tags=tags,
        model=(f"evopress-{m}", out, manifest["sha256"], {"method": m, "target": str(p.methods[m].target)}),
    )


def candidates(p: Params, layout: Layout) -> list:
    """The dense model, then per method its searched profile (with its stitched folder, models/<method>) and every
    baseline (stitched by the evaluate stage itself into a temporary folder): what evaluate measures."""
    from evopress.evaluate import Candidate

    out = [Candidate("dense")]
    for m in p.methods:
        searched = layout.search(m) / "profile.json"
        if searched.is_file():
            out.append(Candidate("evopress", m, searched, layout.db(m), layout.stitched(m)))
        for path in sorted(layout.baselines(m).glob("*/profile.json")):
            out.append(Candidate(path.parent.name, m, path, layout.db(m), stitch=p.methods[m].stitch))
    return out


# Rows on which each delivered folder is checked against its profile applied live: 2 x seq_len tokens show a wrong
# artifact (the figures agree to ~1e-7 when it is right) at an eighth of a 16-row pass, not a second full pass.
LIVE_CHECK_ROWS = 2


def evaluate(p: Params, layout: Layout, _m, log) -> StageResult:
    from evopress.evaluate import evaluate_candidates

    rows = evaluate_candidates(
        layout.model,
        layout.text,
        candidates(p, layout),
        p.compute,
        tuple(p.evaluate.sets),
        p.evaluate.kl,
        log,
        p.evaluate.lm_eval,
        scratch=layout.metrics.parent,  # baselines are stitched here for their row, then removed
        check_rows=LIVE_CHECK_ROWS,
    )
    atomic_write_json(layout.metrics, rows)
    # The target, not the budget (its cost sum, 12 for "6 sublayers of each kind"): what the table shows.
    metrics = {f"{label}.{k}": v for label, row in rows.items() for k, v in row.items() if k != "budget"}
    tags = _compute_tags(next(iter(rows.values()))["compute"])
    for row in rows.values():
        if row.get("database_sha256"):
            tags[f"database.sha256.{row['method']}"] = row["database_sha256"]
    return StageResult(artifacts=[(layout.metrics, None)], metrics=metrics, tags=tags)


def report(p: Params, layout: Layout, _m, log) -> StageResult:
    from evopress.report import load_metrics, markdown, table_rows

    table = markdown(table_rows(load_metrics(layout.metrics)))
    atomic_write_text(layout.results, table)
    log(table)
    return StageResult(
        artifacts=[(layout.results, None), (layout.at("dvc.lock"), None), (layout.at("params.yaml"), None)]
    )


def run_stage(
    name: str, p: Params, layout: Layout, method: str | None, log=print, on_generation=None
) -> StageResult:
    """Run one stage of the pipeline with params.yaml's settings and the layout's paths.

    The settings are checked (again: `params.load` checks them too) before the stage touches any output, so a
    caller that built `Params` itself cannot reach a stage with a bad value."""
    from evopress.params import check

    check(p)
    require(name in STAGES, f"unknown stage {name!r}; allowed: {', '.join(STAGES)}")
    if name in PER_METHOD:
        require(bool(method), f"stage {name!r} needs --method (one of {', '.join(p.methods)})")
        require(
            method in p.methods, f"method {method!r} is not in the params' methods: {', '.join(p.methods)}"
        )
    if name == "search":
        return search(p, layout, method, log, on_generation)
    return globals()[name](p, layout, method, log)
