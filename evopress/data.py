"""Text sources -> fixed-length token sequences, split into calibration and held-out sets with no shared text.

Sources:
  builtin:pydoc                          the language reference topics every CPython ships (pydoc_data.topics)
  file:<path-or-glob>                    .txt (one document per blank-line paragraph group), .jsonl, .parquet
  hf:<dataset>[/<config>]:<split>[:<field>]   through `datasets` (needs a reachable hub or a local cache)

The split is made on whole documents, ordered by the sha256 of their text, so it is the same on every run and
on every machine, and no document contributes to both sides. Held-out documents are taken first until they
fill the held-out sequences; the rest is calibration.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evopress.errors import UserError, require
from evopress.io import atomic_save_safetensors, atomic_write_json, sha256_file

DATA_MANIFEST = "data.json"
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class DataSpec:
    source: str = "builtin:pydoc"
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
    if source.startswith("file:"):
        return _read_files(source.removeprefix("file:"), field)
    if source.startswith("hf:"):
        return _read_hub(source.removeprefix("hf:"), field)
    raise UserError(
        f"unknown text source {source!r}; allowed: builtin:pydoc, file:<path-or-glob>, "
        "hf:<dataset>[/<config>]:<split>[:<field>]"
    )


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
            docs += [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        else:
            docs += _read_records(path, suffix, field)
    return docs


def _read_records(path: Path, suffix: str, field: str) -> list[str]:
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import pandas as pd

        rows = pd.read_parquet(path).to_dict("records")
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


def split_and_tokenize(docs: list[str], tokenizer, spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration [n_calibration, seq_len], heldout [n_heldout, seq_len]) int64 token ids."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ordered = sorted(set(docs), key=_doc_key)
    heldout_need = spec.n_heldout * spec.seq_len
    heldout_ids: list[int] = []
    calib_ids: list[int] = []
    for text in ordered:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        target = heldout_ids if len(heldout_ids) < heldout_need else calib_ids
        target.extend(ids)
    total = len(heldout_ids) + len(calib_ids)
    need = (spec.n_calibration + spec.n_heldout) * spec.seq_len
    require(
        len(heldout_ids) >= heldout_need and len(calib_ids) >= spec.n_calibration * spec.seq_len,
        f"too little text: the source gives {total} tokens, the request needs at least {need} "
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
    if max_context:
        require(
            spec.seq_len <= max_context, f"seq_len {spec.seq_len} exceeds the model's context {max_context}"
        )


def prepare_data(spec: DataSpec, tokenizer, out_dir: Path, max_context: int | None = None) -> dict:
    """Write calibration.safetensors, heldout.safetensors and data.json into `out_dir`."""
    validate_spec(spec, max_context)
    docs = read_documents(spec.source, spec.field)
    calibration, heldout = split_and_tokenize(docs, tokenizer, spec)
    out_dir = Path(out_dir)
    atomic_save_safetensors(out_dir / "calibration.safetensors", {"input_ids": calibration})
    atomic_save_safetensors(out_dir / "heldout.safetensors", {"input_ids": heldout})
    manifest = {
        **asdict(spec),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        "documents": len(docs),
        "calibration_tokens": calibration.numel(),
        "heldout_tokens": heldout.numel(),
        "sha256": {
            name: sha256_file(out_dir / name) for name in ("calibration.safetensors", "heldout.safetensors")
        },
    }
    atomic_write_json(out_dir / DATA_MANIFEST, manifest)
    return manifest


def load_tokens(data_dir: Path, split: str) -> torch.Tensor:
    """Token ids [n, seq_len] of 'calibration' or 'heldout' from a prepared data folder."""
    require(split in ("calibration", "heldout"), f"unknown split {split!r}; allowed: calibration, heldout")
    path = Path(data_dir) / f"{split}.safetensors"
    require(path.exists(), f"no prepared data at {str(path)!r}; run `evopress prepare-data`")
    from safetensors.torch import load_file

    return load_file(path)["input_ids"]
