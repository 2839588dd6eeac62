"""Text sources -> fixed-length token sequences, split into calibration and held-out sets with no shared text.

Sources:
  builtin:pydoc                          the language reference topics every CPython ships (pydoc_data.topics)
  builtin:docstrings                     the docstrings of the standard library's own source files (one document
                                         per module: module, class and function docstrings; no import, no side
                                         effects; fixed by the Python version like builtin:pydoc)
  file:<path-or-glob>                    .txt (one document per blank-line paragraph group), .jsonl, .parquet
  hf:<dataset>[/<config>]:<split>[:<field>]   through `datasets` (needs a reachable hub or a local cache)

A mix of sources with weights (`source: {"builtin:pydoc": 0.5, "builtin:docstrings": 0.5}`) gives each source its
share of the calibration and of the held-out rows (largest remainder, at least one calibration row each), so a
search calibrated on it cannot fit one domain only. Rows are interleaved so any first n rows keep the mix.

The split is made on whole documents, ordered by the sha256 of their text, so it is the same on every run and
on every machine, and no document contributes to both sides. Held-out documents are taken first until they
fill the held-out sequences; the rest is calibration.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import math
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from evopress.errors import UserError, require
from evopress.io import atomic_save_safetensors, atomic_write_json, sha256_file

DATA_MANIFEST = "data.json"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


BUILTIN_SOURCES = ("builtin:pydoc", "builtin:docstrings")
SOURCE_KINDS = (
    "builtin:pydoc, builtin:docstrings, file:<path-or-glob>, hf:<dataset>[/<config>]:<split>[:<field>]"
)


@dataclass(frozen=True)
class DataSpec:
    source: str | dict[str, float] = "builtin:pydoc"  # one source, or {source: weight} for a mix
    seq_len: int = 512
    n_calibration: int = 128
    n_heldout: int = 32
    field: str = "text"


# --- reading documents ---------------------------------------------------------------------------------------
def read_documents(source: str, field: str = "text") -> list[str]:
    """Documents (strings) of a text source, in the source's own order."""
    if source == "builtin:pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if source == "builtin:docstrings":
        return _stdlib_docstrings()
    if source.startswith("file:"):
        return _read_files(source.removeprefix("file:"), field)
    if source.startswith("hf:"):
        return _read_hub(source.removeprefix("hf:"), field)
    raise UserError(f"unknown text source {source!r}; allowed: {SOURCE_KINDS}")


def _stdlib_docstrings() -> list[str]:
    """One document per standard-library module file: its module, class and function docstrings, in file order.

    Read with `ast` from the source files (nothing is imported); test suites are left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if (
            rel.startswith(("site-packages/", "test/", "idlelib/idle_test/", "lib2to3/tests/"))
            or "/tests/" in rel
        ):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few files are deliberately broken (bad-syntax fixtures)
        nodes = [tree] + [
            n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ]
        parts = [d for d in (ast.get_docstring(n) for n in nodes) if d and len(d) > 40]
        if parts:
            docs.append("\n\n".join(parts))
    return docs


def _read_files(pattern: str, field: str) -> list[str]:
    paths = (
        sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if any(c in pattern for c in "*?[")
        else [Path(pattern)]
    )
    require(paths and all(p.is_file() for p in paths), f"no text file matches {pattern!r}")
    docs: list[str] = []
    for path in paths:
        suffix = path.suffix.lower()
        require(
            suffix in FILE_SUFFIXES, f"unsupported text file {str(path)!r}; allowed suffixes: {FILE_SUFFIXES}"
        )
        if suffix == ".txt":
            docs += [d.strip() for d in read_text_file(path).split("\n\n") if d.strip()]
        else:
            docs += _read_records(path, suffix, field)
    return docs


def read_text_file(path: Path) -> str:
    """A file's text as utf-8; a binary (or otherwise non-utf-8) file is a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{str(path)!r} is not utf-8 text (byte {err.start}: {err.reason}); allowed: a utf-8 text file"
        ) from err


def _jsonl_rows(path: Path) -> list:
    rows = []
    for number, line in enumerate(read_text_file(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(
                    f"{str(path)!r} line {number} is not json ({err.msg}); allowed: one json object per line"
                ) from err
    require(all(isinstance(r, dict) for r in rows), f"{str(path)!r}: every line must be a json object")
    return rows


def _read_records(path: Path, suffix: str, field: str) -> list[str]:
    if suffix == ".jsonl":
        rows = _jsonl_rows(path)
    else:
        import pandas as pd

        try:
            rows = pd.read_parquet(path).to_dict("records")
        except Exception as err:  # pyarrow raises its own types for a file that is not parquet
            raise UserError(f"{str(path)!r} is not a readable parquet file ({type(err).__name__})") from err
    require(bool(rows), f"{str(path)!r} holds no records")
    require(field in rows[0], f"unknown field {field!r} in {str(path)!r}; fields there: {sorted(rows[0])}")
    return [str(r[field]) for r in rows if str(r[field]).strip()]


def _read_hub(spec: str, default_field: str) -> list[str]:
    parts = spec.split(":")
    require(
        len(parts) in (2, 3), f"bad hf source 'hf:{spec}'; expected hf:<dataset>[/<config>]:<split>[:<field>]"
    )
    name, split = parts[0], parts[1]
    field = parts[2] if len(parts) == 3 else default_field
    # A dataset id is org/name, so a config is a third path part: org/name/config.
    pieces = name.split("/")
    dataset, config = ("/".join(pieces[:2]), pieces[2]) if len(pieces) == 3 else (name, None)
    import datasets

    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as err:  # datasets raises many types for "not reachable / not found"
        raise UserError(f"cannot load dataset {dataset!r} (config {config}, split {split!r}): {err}") from err
    require(field in ds.column_names, f"unknown field {field!r} in {dataset!r}; fields: {ds.column_names}")
    return [t for t in ds[field] if t and t.strip()]


# --- splitting and tokenizing --------------------------------------------------------------------------------
def _doc_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def source_weights(spec: DataSpec, key: str = "data.source") -> list[tuple[str, float]]:
    """[(source, weight)] with weights summing to 1: a single source has weight 1."""
    if isinstance(spec.source, str):
        return [(spec.source, 1.0)]
    require(bool(spec.source), f"{key}: name at least one source (a mapping source -> weight)")
    for source, weight in spec.source.items():
        require(math.isfinite(weight) and weight > 0, f"{key} weight of {source!r} is {weight}; allowed: > 0")
    total = sum(spec.source.values())
    return [(source, weight / total) for source, weight in spec.source.items()]


def split_rows(n: int, weights: list[float]) -> list[int]:
    """`n` rows shared by weight (largest remainder; ties to the earlier source): the counts sum to `n`."""
    exact = [n * w for w in weights]
    rows = [math.floor(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (rows[i] - exact[i], i))
    for i in order[: n - sum(rows)]:
        rows[i] += 1
    return rows


def interleaved_order(counts: list[int]) -> list[int]:
    """Rows stacked source after source, reordered so every prefix holds each source's share (within one row):
    database builds take the first `n_samples` rows, which would otherwise come from the first source only."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    keys = [((j + 0.5) / n, s, starts[s] + j) for s, n in enumerate(counts) for j in range(n)]
    return [row for _, _, row in sorted(keys)]


def mix_and_tokenize(spec: DataSpec, tokenizer, read=None) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Calibration and held-out rows of every source of the spec, each with its share of the rows, interleaved."""
    read = read or (lambda source: read_documents(source, spec.field))
    mix = source_weights(spec)
    calib_rows = split_rows(spec.n_calibration, [w for _, w in mix])
    heldout_rows = split_rows(spec.n_heldout, [w for _, w in mix])
    calibration, heldout, parts = [], [], []
    for (source, weight), n_cal, n_held in zip(mix, calib_rows, heldout_rows, strict=True):
        require(
            n_cal >= 1,
            f"data.source weight {weight:.3g} of {source!r} gives it no calibration row of {spec.n_calibration}; "
            "raise its weight or n_calibration",
        )
        docs = read(source)
        part = replace(spec, source=source, n_calibration=n_cal, n_heldout=n_held)
        cal, held = split_and_tokenize(docs, tokenizer, part)
        calibration.append(cal)
        heldout.append(held)
        parts.append(
            {
                "source": source,
                "weight": weight,
                "documents": len(docs),
                "calibration_rows": n_cal,
                "heldout_rows": n_held,
            }
        )
    calibration_order = interleaved_order([p["calibration_rows"] for p in parts])
    heldout_order = interleaved_order([p["heldout_rows"] for p in parts])
    return torch.cat(calibration)[calibration_order], torch.cat(heldout)[heldout_order], parts


def split_and_tokenize(docs: list[str], tokenizer, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration [n_calibration, seq_len], heldout [n_heldout, seq_len]) int64 token ids."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ordered = sorted(set(docs), key=_doc_key)
    heldout_need = spec.n_heldout * spec.seq_len  # a source of a mix may get no held-out row
    heldout_ids: list[int] = []
    calib_ids: list[int] = []
    for text in ordered:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        target = heldout_ids if len(heldout_ids) < heldout_need else calib_ids
        target.extend(ids)
        if len(calib_ids) >= spec.n_calibration * spec.seq_len:
            break  # both sides are full: the rest of a large source need not be tokenized
    total = len(heldout_ids) + len(calib_ids)
    need = (spec.n_calibration + spec.n_heldout) * spec.seq_len
    require(
        len(heldout_ids) >= heldout_need and len(calib_ids) >= spec.n_calibration * spec.seq_len,
        f"too little text: {spec.source} gives {total} tokens, the request needs at least {need} "
        f"((n_calibration {spec.n_calibration} + n_heldout {spec.n_heldout}) x seq_len {spec.seq_len}, "
        "split on whole documents); ask for fewer or shorter sequences",
    )
    return _chunk(calib_ids, spec.n_calibration, spec.seq_len), _chunk(
        heldout_ids, spec.n_heldout, spec.seq_len
    )


def _chunk(ids: list[int], n: int, seq_len: int) -> torch.Tensor:
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def validate_spec(spec: DataSpec, max_context: int | None = None, key: str = "data") -> None:
    """The rules on a data spec (params.check applies them too, without the model's context)."""
    for name, low in (("seq_len", 2), ("n_calibration", 1), ("n_heldout", 1)):  # seq_len 1 predicts no token
        value = getattr(spec, name)
        require(value >= low, f"{key}.{name} must be >= {low}, got {value}")
    source_weights(spec, f"{key}.source")
    if max_context:
        require(
            spec.seq_len <= max_context, f"seq_len {spec.seq_len} exceeds the model's context {max_context}"
        )


def prepare_data(spec: DataSpec, tokenizer, out_dir: Path, max_context: int | None = None) -> dict:
    """Write calibration.safetensors, heldout.safetensors and data.json into `out_dir`."""
    validate_spec(spec, max_context)
    calibration, heldout, parts = mix_and_tokenize(spec, tokenizer)
    out_dir = Path(out_dir)
    atomic_save_safetensors(out_dir / "calibration.safetensors", {"input_ids": calibration})
    atomic_save_safetensors(out_dir / "heldout.safetensors", {"input_ids": heldout})
    manifest = {
        **asdict(spec),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "documents": sum(p["documents"] for p in parts),
        "mix": parts,
        "calibration_tokens": calibration.numel(),
        "heldout_tokens": heldout.numel(),
        "sha256": {
            name: sha256_file(out_dir / name) for name in ("calibration.safetensors", "heldout.safetensors")
        },
        "sizes": {
            name: (out_dir / name).stat().st_size
            for name in ("calibration.safetensors", "heldout.safetensors")
        },
    }
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    return manifest


def load_tokens(data_dir: Path, split: str) -> torch.Tensor:
    """Token ids [n, seq_len] of 'calibration' or 'heldout' from a prepared data folder."""
    require(split in ("calibration", "heldout"), f"unknown split {split!r}; allowed: calibration, heldout")
    path = Path(data_dir) / f"{split}.safetensors"
    require(path.exists(), f"no prepared data at {str(path)!r}; run `evopress prepare-data`")
    verify_tokens(Path(data_dir), path.name)
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors' own error type for a truncated or foreign file
        raise UserError(f"unreadable token set {str(path)!r} ({err}); run `evopress prepare-data`") from err
    require("input_ids" in tensors, f"{str(path)!r} holds no input_ids; run `evopress prepare-data`")
    return tensors["input_ids"]


def verify_tokens(data_dir: Path, name: str) -> None:
    """Check a token set against what data.json records (size, then sha256: token sets are small); a folder
    without data.json (made by hand, or by tests) is read as it is."""
    manifest_path = data_dir / DATA_MANIFEST
    if not manifest_path.is_file():
        return
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"unreadable {str(manifest_path)!r} ({err}); run `evopress prepare-data`") from err
    path = data_dir / name
    hint = "run `evopress prepare-data` again"
    size = manifest.get("sizes", {}).get(name)
    if size is not None:
        require(
            path.stat().st_size == size,
            f"token set truncated or changed: {str(path)!r} has {path.stat().st_size} bytes, {DATA_MANIFEST} "
            f"says {size}; {hint}",
        )
    digest = manifest.get("sha256", {}).get(name)
    if digest is not None:
        require(
            sha256_file(path) == digest,
            f"token set corrupt (sha256 differs from {DATA_MANIFEST}): {str(path)!r}; {hint}",
        )
