"""Atomic writes and checksums: a reader never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors.save to bytes, then an atomic write (so an interrupted save leaves nothing behind)."""
    from safetensors.torch import save

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(contiguous, metadata=metadata))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def require_apart(out: Path, folders: dict | None = None, files: dict | None = None) -> None:
    """One-line error when an output would write over the command's own inputs.

    `folders` (name -> folder read): the output may not be one, lie inside one, or hold one (a folder output is
    replaced by a rename, which would delete what it holds). `files` (name -> file read): the output may not be
    the file, its folder, or a folder holding it. Paths are compared resolved (symlinks, `..`)."""
    from evopress.errors import require

    target = Path(out).resolve()
    for name, folder in (folders or {}).items():
        if folder is None:
            continue
        where = Path(folder).resolve()
        require(
            not _inside(target, where),
            f"--out {str(out)!r} is or lies inside the {name} {str(folder)!r}; "
            "allowed: an --out outside every input",
        )
        require(
            not _inside(where, target),
            f"--out {str(out)!r} holds the {name} {str(folder)!r}; allowed: an --out outside every input",
        )
    for name, file in (files or {}).items():
        if file is None:
            continue
        where = Path(file).resolve()
        require(
            target != where and target != where.parent and target not in where.parents,
            f"--out {str(out)!r} would write over the {name} {str(file)!r} (the file, its folder or a folder "
            "holding it); allowed: an --out elsewhere",
        )


def read_config_json(folder: Path) -> dict | None:
    """A model folder's config.json as a dict; None when absent or unreadable (format detectors then say no)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return config if isinstance(config, dict) else None


def unique_tensors(model, skip: set[str] | frozenset[str] = frozenset()) -> dict:
    """The state dict with tied tensors (lm_head = embed_tokens) kept once under their first name, as
    save_pretrained does, and the keys in `skip` left out (the writer stores those in its own layout)."""
    seen, tensors = set(), {}
    for key, tensor in model.state_dict().items():
        if key in skip or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.detach().contiguous()
    return tensors
