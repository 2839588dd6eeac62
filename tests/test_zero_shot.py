"""Zero-shot tasks through lm-evaluation-harness: a local multiple-choice task (a YAML over a JSONL file the test
writes; no hub), run on the live model, and checked against the choice log-likelihoods computed here by hand."""

from __future__ import annotations

import json
import string

import pytest
import torch

from evopress.errors import UserError
from evopress.zero_shot import LmEvalParams, flatten, run_tasks

TASK = "evopress_tiny_mc"
DOCS = [
    {"question": "The cat sat on the", "choices": ["mat", "moon", "idea"], "label": 0},
    {"question": "One, two, three,", "choices": ["four", "blue"], "label": 0},
    {"question": "Water is", "choices": ["dry", "wet", "loud"], "label": 1},
    {"question": "The sky at noon is", "choices": ["green", "blue"], "label": 1},
    {"question": "Fire is", "choices": ["cold", "hot", "square"], "label": 1},
    {"question": "A year has twelve", "choices": ["months", "legs"], "label": 0},
]


def char_vocab() -> dict[str, int]:
    chars = string.ascii_letters + string.digits + string.punctuation + " "
    return {c: i for i, c in enumerate(chars)} | {"</s>": len(chars)}


def saveable_char_tokenizer():
    """One token per character, saved and reloaded like any fast tokenizer (AutoTokenizer reads tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.WordLevel(vocab=char_vocab(), unk_token="</s>"))
    inner.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="</s>", unk_token="</s>")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from conftest import tiny_llama

    return tiny_llama(num_layers=2, hidden=64, vocab=len(char_vocab()), seed=5), saveable_char_tokenizer()


@torch.no_grad()
def accuracy_by_hand(model, tokenizer, docs=DOCS) -> float:
    """The harness's multiple-choice rule written out: the choice with the highest summed log-probability of
    " " + choice after the question wins (a character tokenizer makes the token split obvious)."""
    hits = 0
    for doc in docs:
        context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([context + cont])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            targets = ids[0, 1:]
            scores.append(float(logp[torch.arange(len(targets)), targets][-len(cont) :].sum()))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return hits / len(docs)


def test_the_harness_scores_the_live_model_as_its_choice_likelihoods_say(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    params = LmEvalParams(tasks=[TASK], include_path=str(task_dir), batch_size=2)
    got = run_tasks(model, tokenizer, params)
    assert set(got) == {f"lm_eval.{TASK}.acc"}
    assert got[f"lm_eval.{TASK}.acc"] == pytest.approx(accuracy_by_hand(model, tokenizer))


def test_a_pruned_live_model_is_what_the_harness_sees(model_and_tokenizer, task_dir):
    """The harness must score the model as it is now (a profile applied in place), not a fresh copy."""
    from evopress.adapter import ModelAdapter

    model, tokenizer = model_and_tokenizer
    adapter = ModelAdapter(model)
    adapter.drop(0, "mlp")
    adapter.drop(1, "attn")
    try:
        got = run_tasks(model, tokenizer, LmEvalParams(tasks=[TASK], include_path=str(task_dir)))
        assert got[f"lm_eval.{TASK}.acc"] == pytest.approx(accuracy_by_hand(model, tokenizer))
    finally:
        adapter.restore_all()


def test_limit_scores_only_the_first_documents(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    got = run_tasks(model, tokenizer, LmEvalParams(tasks=[TASK], include_path=str(task_dir), limit=2))
    assert got[f"lm_eval.{TASK}.acc"] == pytest.approx(accuracy_by_hand(model, tokenizer, DOCS[:2]))


def test_an_unknown_task_fails_in_one_line_before_the_model_runs(task_dir, monkeypatch):
    """Names missing from include_path send the check to lm-eval's full index (thousands of YAMLs, minutes on a
    busy CPU); a stand-in index with the built-in names keeps this test about our error line."""
    from types import SimpleNamespace

    from evopress import zero_shot

    indexes = []

    def fake_index(include_path, defaults):
        indexes.append(defaults)
        return SimpleNamespace(all_tasks=[TASK] + (["arc_easy", "piqa"] if defaults else []))

    monkeypatch.setattr(zero_shot, "_indexed", fake_index)
    with pytest.raises(UserError, match="unknown task.*no_such_task"):
        zero_shot.check_tasks(LmEvalParams(tasks=["piqa", "no_such_task"], include_path=str(task_dir)))
    assert indexes == [False, True]  # the local index first, the full one only for names it lacks
    zero_shot.check_tasks(LmEvalParams(tasks=[TASK], include_path=str(task_dir)))
    assert indexes == [False, True, False]


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"limit": 0}, "limit"),
        ({"num_fewshot": -1}, "num_fewshot"),
        ({"include_path": "/no/such/dir"}, "include"),
    ],
)
def test_bad_settings_name_their_key(bad, key):
    with pytest.raises(UserError, match=f"evaluate.lm_eval.{key}"):
        LmEvalParams(tasks=["x"], **bad).validate()


def test_flatten_keeps_metrics_and_drops_stderr_and_aliases():
    raw = {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6}}
    assert flatten(raw) == {"lm_eval.piqa.acc": 0.5, "lm_eval.piqa.acc_norm": 0.6}
    assert flatten({"gsm": {"exact_match,strict-match": 0.25}}) == {
        "lm_eval.gsm.exact_match_strict_match": 0.25
    }
