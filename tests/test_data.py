"""Text sources, the deterministic split with no shared text, and their one-line errors."""

import json

import pytest
import torch

from evopress.data import DataSpec, load_tokens, prepare_data, read_documents, split_and_tokenize
from evopress.errors import UserError


def _docs(n=40):
    return [f"document number {i}: " + "lorem ipsum " * (5 + i % 7) for i in range(n)]


def test_split_has_no_shared_document_and_is_deterministic(tokenizer):
    spec = DataSpec(seq_len=16, n_calibration=20, n_heldout=10)
    docs = _docs()
    cal1, held1 = split_and_tokenize(docs, tokenizer, spec)
    cal2, held2 = split_and_tokenize(
        list(reversed(docs)), tokenizer, spec
    )  # order of the source does not matter
    assert torch.equal(cal1, cal2) and torch.equal(held1, held2)
    assert cal1.shape == (20, 16) and held1.shape == (10, 16)
    cal_text = bytes(cal1.flatten().clamp_max(255).tolist()).decode("utf-8", "ignore")
    held_text = bytes(held1.flatten().clamp_max(255).tolist()).decode("utf-8", "ignore")

    def numbers(text):
        return {int(part.split(":")[0]) for part in text.split("number ")[1:] if part.split(":")[0].isdigit()}

    assert numbers(cal_text) and numbers(held_text)
    assert not numbers(cal_text) & numbers(held_text)


def test_too_little_text_names_the_sizes(tokenizer):
    with pytest.raises(UserError, match=r"too little text.*n_calibration 1000"):
        split_and_tokenize(_docs(), tokenizer, DataSpec(seq_len=16, n_calibration=1000, n_heldout=2))


def test_file_sources_txt_jsonl_parquet(tmp_path):
    import pandas as pd

    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n" + json.dumps({"body": "y"}) + "\n")
    pd.DataFrame({"body": ["p", "q", "r"]}).to_parquet(tmp_path / "c.parquet")
    assert read_documents(f"file:{tmp_path}/a.txt") == ["first paragraph", "second paragraph"]
    assert read_documents(f"file:{tmp_path}/b.jsonl", field="body") == ["x", "y"]
    assert read_documents(f"file:{tmp_path}/c.parquet", field="body") == ["p", "q", "r"]
    with pytest.raises(UserError, match="unknown field 'text'.*body"):
        read_documents(f"file:{tmp_path}/b.jsonl")


@pytest.mark.parametrize(
    "source, message",
    [
        ("file:/no/such/file.txt", "no text file matches '/no/such/file.txt'"),
        ("web:http://x", "unknown text source 'web:http://x'; allowed: builtin:pydoc"),
        ("hf:only-a-name", "bad hf source"),
    ],
)
def test_bad_sources_are_one_line_errors(source, message):
    with pytest.raises(UserError, match=message):
        read_documents(source)


def test_builtin_pydoc_is_real_prose():
    docs = read_documents("builtin:pydoc")
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000


def test_prepare_data_writes_tokens_and_manifest(tmp_path, tokenizer):
    spec = DataSpec(seq_len=64, n_calibration=8, n_heldout=4)
    manifest = prepare_data(spec, tokenizer, tmp_path, max_context=128)
    assert load_tokens(tmp_path, "calibration").shape == (8, 64)
    assert load_tokens(tmp_path, "heldout").shape == (4, 64)
    on_disk = json.loads((tmp_path / "data.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest)) and len(on_disk["sha256"]) == 2
    with pytest.raises(UserError, match="seq_len 256 exceeds the model's context 128"):
        prepare_data(DataSpec(seq_len=256), tokenizer, tmp_path, max_context=128)


def test_builtin_docstrings_is_real_prose_without_imports():
    import sys

    before = set(sys.modules)
    docs = read_documents("builtin:docstrings")
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert "antigravity" not in set(sys.modules) - before  # read from source, never imported


@pytest.mark.parametrize(
    "n, weights, rows",
    [
        (16, [0.5, 0.5], [8, 8]),
        (16, [0.7, 0.3], [11, 5]),
        (10, [1 / 3] * 3, [4, 3, 3]),
        (5, [0.8, 0.2], [4, 1]),
        (3, [0.5, 0.5], [2, 1]),
    ],
)
def test_rows_are_shared_by_weight(n, weights, rows):
    from evopress.data import split_rows

    assert split_rows(n, weights) == rows and sum(rows) == n


def test_a_mix_gives_each_source_its_rows_and_no_shared_text(tokenizer):
    from evopress.data import interleaved_order, mix_and_tokenize

    corpora = {"a": _docs(40), "b": [f"other text {i}: " + "dolor sit " * (4 + i % 5) for i in range(40)]}
    spec = DataSpec(source={"a": 3.0, "b": 1.0}, seq_len=16, n_calibration=8, n_heldout=4)
    cal, held, parts = mix_and_tokenize(spec, tokenizer, read=corpora.__getitem__)
    assert cal.shape == (8, 16) and held.shape == (4, 16)
    assert [(p["source"], p["weight"], p["calibration_rows"], p["heldout_rows"]) for p in parts] == [
        ("a", 0.75, 6, 3),
        ("b", 0.25, 2, 1),
    ]
    alone_cal, alone_held = split_and_tokenize(
        corpora["b"], tokenizer, DataSpec(seq_len=16, n_calibration=2, n_heldout=1)
    )
    # each source split as on its own; rows come interleaved, source b's where the order put them
    order = interleaved_order([6, 2])
    assert torch.equal(cal[[order.index(6), order.index(7)]], alone_cal)
    assert torch.equal(held[[interleaved_order([3, 1]).index(3)]], alone_held)
    assert order != sorted(order)  # interleaved, not stacked
    text = bytes(cal[[order.index(r) for r in range(6)]].flatten().clamp_max(255).tolist()).decode(
        "utf-8", "ignore"
    )
    assert "lorem" in text and "dolor" not in text


@pytest.mark.parametrize(
    "source, message",
    [
        ({}, "data.source: name at least one source"),
        ({"builtin:pydoc": 0.0}, "data.source weight of 'builtin:pydoc' is 0.0; allowed: > 0"),
        ({"builtin:pydoc": 1.0, "builtin:docstrings": 0.01}, "gives it no calibration row of 8"),
    ],
)
def test_bad_mixes_are_one_line_errors(tokenizer, tmp_path, source, message):
    with pytest.raises(UserError, match=message):
        prepare_data(DataSpec(source=source, seq_len=16, n_calibration=8, n_heldout=2), tokenizer, tmp_path)


def test_a_mix_from_params_yaml_is_typed():
    from evopress.config import from_tree

    spec = from_tree(DataSpec, {"source": {"builtin:pydoc": 1, "builtin:docstrings": 0.5}}, "data")
    assert spec.source == {"builtin:pydoc": 1.0, "builtin:docstrings": 0.5}
    with pytest.raises(UserError, match="data.source: expected str or dict"):
        from_tree(DataSpec, {"source": ["builtin:pydoc"]}, "data")


@pytest.mark.parametrize("counts", [[32, 32], [3, 1], [5, 2, 1], [4]])
def test_interleaved_order_keeps_the_mix_in_every_prefix(counts):
    from evopress.data import interleaved_order

    order = interleaved_order(counts)
    assert sorted(order) == list(range(sum(counts)))
    source = [s for s, n in enumerate(counts) for _ in range(n)]
    total = sum(counts)
    for n in range(1, total + 1):
        seen = [sum(source[r] == s for r in order[:n]) for s in range(len(counts))]
        assert all(abs(seen[s] - n * counts[s] / total) <= 1 for s in range(len(counts)))
