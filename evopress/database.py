"""Level database: one safetensors file per (unit, level), a manifest with checksums, resumable builds.

Method-agnostic: a unit at a level is a dict of named tensors (e.g. {"weight": ...}); what they mean is the
method's business. Layout of a database folder:

  manifest.json                    model sha256, method, build parameters, units -> levels and tensor shapes,
                                   the encoding of the files, and per file its size and sha256 (only files whose
                                   write completed)
  files/<unit>/L<level>.safetensors   written atomically (temp file + rename)

Encoding (evopress/level_codecs.py): new databases are "compact" (GPTQ codes as bit planes, sparse weights as
bitmask + non-zeros: exact, several times smaller); databases written before it have no `encoding` entry and
read as "plain". `recode` converts one into the other. The cache holds files as stored, so compact databases
also keep several times more levels in the same memory; they are decoded on every load.

Guarantees:
- nothing half-written is ever read: files appear only through atomic renames, and a file is used only when its
  size and sha256 match the manifest; a mismatch on load is a one-line `UserError`, never silently read;
- an interrupted build resumes: `todo()` lists (unit, level) pairs whose file is missing, unrecorded or fails
  its checksum, so the builder redoes exactly those (a file written but not yet recorded is redone too);
- opening a database with a different model, method, parameters or levels than asked is a one-line error;
- loaded tensors are kept in an LRU cache bounded in bytes.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evopress.errors import UserError, require
from evopress.io import atomic_save_safetensors, atomic_write_json, sha256_file
from evopress.level_codecs import check_encoding, decode, encode, nbytes

MANIFEST = "manifest.json"
FORMAT = 1
_SAFE = re.compile(r"[^A-Za-z0-9._-]")

Tensors = dict[str, torch.Tensor]


def unit_dirname(unit: str) -> str:
    """A file-system-safe folder name for a unit ('block.3.self_attn.q_proj' stays as is)."""
    require(unit and unit not in (".", ".."), f"bad unit name {unit!r}")
    return _SAFE.sub("_", unit)


@dataclass
class DatabaseSpec:
    """What a database is built for; two specs must match exactly for a database to be reused."""

    model_sha256: str
    method: str
    params: dict  # build parameters (json-serializable)
    units: dict[str, dict]  # unit -> {"levels": [int...], "shapes": {tensor name: [dims]}}

    def to_json(self) -> dict:
        return {
            "model_sha256": self.model_sha256,
            "method": self.method,
            "params": self.params,
            "units": self.units,
        }


def _normalize(obj):
    """Round-trip through json so tuples/lists and int keys compare the way they will after reading back."""
    return json.loads(json.dumps(obj))


def spec_mismatch(want: DatabaseSpec, have: dict) -> str | None:
    """A short description of the first difference between a wanted spec and a manifest, or None."""
    want_json = _normalize(want.to_json())
    for key in ("model_sha256", "method"):
        if want_json[key] != have.get(key):
            return f"{key} is {have.get(key)!r}, wanted {want_json[key]!r}"
    for name, value in want_json["params"].items():
        if have.get("params", {}).get(name) != value:
            return f"build parameter {name}={have.get('params', {}).get(name)!r}, wanted {value!r}"
    extra = set(have.get("params", {})) - set(want_json["params"])
    if extra:
        return f"unexpected build parameters {sorted(extra)}"
    have_units = have.get("units", {})
    if list(have_units) != list(want_json["units"]):
        return f"units differ ({len(have_units)} in the database, {len(want_json['units'])} wanted)"
    for unit, entry in want_json["units"].items():
        if have_units[unit] != entry:
            return f"unit {unit!r} has levels/shapes {have_units[unit]}, wanted {entry}"
    return None


@dataclass
class LevelDatabase:
    root: Path
    manifest: dict
    cache_bytes: int = 2 << 30
    _cache: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _cached: int = 0
    _verified: set = field(default_factory=set, repr=False)
    load_seconds: float = 0.0  # time spent reading files (cache misses), for benchmarks
    decode_seconds: float = 0.0  # time spent decoding compact files (every load)
    loads: int = 0
    hits: int = 0

    # --- opening ---------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, spec: DatabaseSpec, encoding: str = "compact", **kw) -> LevelDatabase:
        """Open `root` for building `spec`: a new database, or an existing one with exactly the same spec (which
        keeps its own encoding, so a resumed build writes the files the way it started)."""
        check_encoding(encoding)
        root = Path(root)
        path = root / MANIFEST
        if path.exists():
            db = cls.open(root, **kw)
            problem = spec_mismatch(spec, db.manifest)
            require(
                problem is None,
                f"database {str(root)!r} was built for something else ({problem}); use another --out or delete it",
            )
            return db
        require(
            not root.exists() or not any(root.iterdir()),
            f"{str(root)!r} exists, is not empty and has no {MANIFEST}; refusing to build a database into it",
        )
        manifest = {
            "format": FORMAT,
            **_normalize(spec.to_json()),
            "encoding": encoding,
            "files": {},
            "complete": False,
        }
        atomic_write_json(path, manifest)
        return cls(root, manifest, **kw)

    @classmethod
    def open(cls, root: Path, **kw) -> LevelDatabase:
        root = Path(root)
        path = root / MANIFEST
        require(path.exists(), f"no level database at {str(root)!r} (no {MANIFEST}); run `evopress build-db`")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"unreadable database manifest {str(path)!r}: {err}") from err
        require(
            manifest.get("format") == FORMAT,
            f"database {str(root)!r} has format {manifest.get('format')!r}, this version reads {FORMAT}",
        )
        return cls(root, manifest, **kw)

    def require_matches(self, spec: DatabaseSpec, complete: bool = True) -> None:
        """One-line error unless this database was built for `spec` (and, if asked, is fully built)."""
        problem = spec_mismatch(spec, self.manifest)
        require(problem is None, f"database {str(self.root)!r} does not match: {problem}")
        if complete:
            missing = self.missing()
            if missing:
                raise UserError(
                    f"database {str(self.root)!r} is incomplete or damaged ({len(missing)} files missing or not of "
                    f"their recorded size, first {str(self.path(*missing[0]))!r}); rerun `evopress build-db` to finish it"
                )

    # --- layout ----------------------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def encoding(self) -> str:
        return self.manifest.get("encoding", "plain")

    @property
    def params(self) -> dict:
        return self.manifest["params"]

    def units(self) -> list[str]:
        return list(self.manifest["units"])

    def levels(self, unit: str) -> list[int]:
        return list(self.manifest["units"][unit]["levels"])

    def shapes(self, unit: str) -> dict[str, list[int]]:
        return self.manifest["units"][unit]["shapes"]

    @staticmethod
    def key(unit: str, level: int) -> str:
        return f"{unit_dirname(unit)}/L{int(level)}.safetensors"

    def path(self, unit: str, level: int) -> Path:
        return self.root / "files" / self.key(unit, level)

    def pairs(self) -> list[tuple[str, int]]:
        return [(u, lvl) for u in self.units() for lvl in self.levels(u)]

    # --- state -----------------------------------------------------------------------------------------------
    def _check_known(self, unit: str, level: int) -> None:
        require(unit in self.manifest["units"], f"unit {unit!r} is not in database {str(self.root)!r}")
        require(
            level in self.levels(unit),
            f"level {level} of {unit!r} is not in database {str(self.root)!r}; "
            f"it has {self.levels(unit)[0]}..{self.levels(unit)[-1]}",
        )

    def _file_ok(self, unit: str, level: int, verify: bool) -> bool:
        entry = self.manifest["files"].get(self.key(unit, level))
        path = self.path(unit, level)
        if entry is None or not path.exists() or path.stat().st_size != entry["size"]:
            return False
        return not verify or sha256_file(path) == entry["sha256"]

    def missing(self) -> list[tuple[str, int]]:
        """Pairs whose file is absent, unrecorded or of the wrong size (fast: no hashing)."""
        return [(u, lvl) for u, lvl in self.pairs() if not self._file_ok(u, lvl, verify=False)]

    def todo(self, verify: bool = True) -> list[tuple[str, int]]:
        """Pairs a (resumed) build must (re)write: missing, unrecorded, truncated or failing the checksum."""
        return [(u, lvl) for u, lvl in self.pairs() if not self._file_ok(u, lvl, verify=verify)]

    # --- writing ---------------------------------------------------------------------------------------------
    def write(self, unit: str, level: int, tensors: Tensors, flush: bool = True) -> None:
        """Write one (unit, level) file atomically and record its checksum (in the manifest when `flush`)."""
        self._check_known(unit, level)
        shapes = self.shapes(unit)
        require(
            set(tensors) == set(shapes),
            f"{unit} level {level}: tensors {sorted(tensors)} do not match the manifest's {sorted(shapes)}",
        )
        for name, t in tensors.items():
            require(
                list(t.shape) == list(shapes[name]),
                f"{unit} level {level}: tensor {name} has shape {list(t.shape)}, manifest says {shapes[name]}",
            )
        path = self.path(unit, level)
        atomic_save_safetensors(path, encode(tensors, self.encoding))
        key = self.key(unit, level)
        self.manifest["files"][key] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        self._verified.add(key)
        self._evict(key)
        if flush:
            self.flush()

    def flush(self, complete: bool | None = None) -> None:
        """Write the manifest (atomically); `complete` marks a finished build."""
        if complete is not None:
            self.manifest["complete"] = complete
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def finish(self) -> None:
        missing = self.missing()
        self.flush(complete=not missing)

    # --- reading ---------------------------------------------------------------------------------------------
    def load(self, unit: str, level: int) -> Tensors:
        """Tensors of (unit, level), checked against the manifest on first read; the file as stored is cached."""
        self._check_known(unit, level)
        key = self.key(unit, level)
        if key in self._cache:
            self._cache.move_to_end(key)
            self.hits += 1
            stored = self._cache[key]
        else:
            start = time.perf_counter()
            stored = self._read_verified(unit, level, key)
            self.load_seconds += time.perf_counter() - start
            self.loads += 1
            self._remember(key, stored)
        start = time.perf_counter()
        tensors = decode(stored, self.shapes(unit))
        self.decode_seconds += time.perf_counter() - start
        return tensors

    def _read_verified(self, unit: str, level: int, key: str) -> Tensors:
        from safetensors.torch import load

        entry = self.manifest["files"].get(key)
        path = self.path(unit, level)
        hint = "rerun `evopress build-db` to rebuild it"
        require(entry is not None and path.exists(), f"database file missing: {str(path)!r}; {hint}")
        data = path.read_bytes()
        require(
            len(data) == entry["size"],
            f"database file truncated: {str(path)!r} has {len(data)} bytes, manifest says {entry['size']}; {hint}",
        )
        if key not in self._verified:
            import hashlib

            require(
                hashlib.sha256(data).hexdigest() == entry["sha256"],
                f"database file corrupt (sha256 mismatch): {str(path)!r}; {hint}",
            )
            self._verified.add(key)
        return load(data)

    def _remember(self, key: str, tensors: Tensors) -> None:
        size = nbytes(tensors)
        if size > self.cache_bytes:
            return
        self._cache[key] = tensors
        self._cached += size
        while self._cached > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached -= nbytes(old)

    def _evict(self, key: str) -> None:
        old = self._cache.pop(key, None)
        if old is not None:
            self._cached -= nbytes(old)

    def content_sha256(self) -> str:
        """One hash of the database's content: every file's recorded sha256, in a fixed order (no re-hashing)."""
        import hashlib

        files = self.manifest["files"]
        lines = [f"{key} {files[key]['sha256']}" for key in sorted(files)]
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def size_on_disk(self) -> int:
        return sum(e["size"] for e in self.manifest["files"].values())

    def stats(self) -> dict:
        return {
            "loads": self.loads,
            "cache_hits": self.hits,
            "load_seconds": self.load_seconds,
            "seconds_per_load": self.load_seconds / max(self.loads, 1),
            "decode_seconds": self.decode_seconds,
            "cached_bytes": self._cached,
        }


def verify_database(root: Path) -> LevelDatabase:
    """Open a database and check every file it records (size first, then sha256), before a stage relies on all of
    them (stitching writes a deliverable from them); one-line error naming the first bad file."""
    db = LevelDatabase.open(Path(root))
    hint = "rerun `evopress build-db` to rebuild it"
    files = db.manifest.get("files", {})
    for key, entry in files.items():
        path = db.root / "files" / key
        require(path.is_file(), f"database file missing: {str(path)!r}; {hint}")
        size = path.stat().st_size
        require(
            size == entry["size"],
            f"database file truncated: {str(path)!r} has {size} bytes, manifest says {entry['size']}; {hint}",
        )
    for key, entry in files.items():
        path = db.root / "files" / key
        require(
            sha256_file(path) == entry["sha256"],
            f"database file corrupt (sha256 mismatch): {str(path)!r}; {hint}",
        )
        db._verified.add(key)
    return db


def recode(src: Path, dst: Path, encoding: str) -> LevelDatabase:
    """Write a copy of the complete database `src` into `dst` with every file in `encoding` (e.g. an old plain
    database made compact); the content is unchanged (every tensor decodes to the same values). Resumable: files
    already in `dst` are kept. `dst` must be new or a copy of the same spec."""
    check_encoding(encoding)
    source = verify_database(Path(src))
    require(source.manifest.get("complete"), f"database {str(src)!r} is not complete; finish its build first")
    spec = DatabaseSpec(**{k: source.manifest[k] for k in ("model_sha256", "method", "params", "units")})
    target = LevelDatabase.create(Path(dst), spec, encoding=encoding)
    require(
        target.encoding == encoding,
        f"{str(dst)!r} already holds this database as {target.encoding!r}, not {encoding!r}; use another folder",
    )
    todo = set(target.todo())
    for unit, level in source.pairs():
        if (unit, level) in todo:
            target.write(unit, level, source.load(unit, level), flush=False)
            source._evict(source.key(unit, level))
    target.finish()
    return target
