"""params.yaml schema: the shipped files are valid; a bad key or type fails in one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evopress import params as P
from evopress.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["params.yaml", "params-smoke.yaml"])
def test_shipped_params_are_valid(name):
    p = P.load(REPO / name)
    assert "depth" in p.methods and p.methods["depth"].search.generations >= 1


def smoke() -> dict:
    return yaml.safe_load((REPO / "params-smoke.yaml").read_text())


def edit(tree: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = tree
    for k in parents:
        node = node[k]
    node[last] = value
    return tree


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("methods.depth.search.generatoins", 3, "unknown key 'methods.depth.search.generatoins'"),
        (
            "methods.depth.search.generations",
            "ten",
            "methods.depth.search.generations: expected int, got str 'ten'",
        ),
        ("methods.depth.search.generations", True, "methods.depth.search.generations: expected int"),
        ("methods.depth.target", "six", "methods.depth.target: expected a number"),
        ("methods.depth.search.survivors", [2], "need the same length"),
        ("methods.depth.baselines", ["nope"], "methods.depth.baselines: unknown 'nope'"),
        (
            "methods.depth.database",
            {"num_levels": 2},
            "methods.depth.database: method 'depth' has no level database",
        ),
        ("methods.pruning", {}, "unknown method 'methods.pruning'"),
        ("compute.dtype", "int8", "compute.dtype 'int8'; allowed"),
        ("evaluate.sets", ["test"], "evaluate.sets: unknown 'test'"),
        ("modle", {}, "unknown key 'modle'"),
    ],
)
def test_bad_params_are_one_line_errors(path, value, message):
    with pytest.raises(UserError) as err:
        P.parse(edit(smoke(), path, value))
    assert message in str(err.value) and "\n" not in str(err.value)


# Every rule a stage applies later, rejected by check-params already (one case per rule).
RULES = [
    ("methods.depth.search.generations", -1, "methods.depth.search.generations must be >= 0"),
    ("methods.depth.search.offspring", 0, "methods.depth.search.offspring must be >= 1"),
    ("methods.depth.search.survivors", [1, 2], "must be >= 1 and non-increasing"),
    ("methods.depth.search.survivors", [5, 1], "exceed offspring 4"),
    ("methods.depth.search.tokens", [0, 512], "methods.depth.search.tokens must be >= 1"),
    ("methods.depth.search.tokens", [128, 4096], "tokens 4096 exceeds the calibration set's 2048 tokens"),
    (
        "methods.depth.search.tokens",
        ["all", 512],
        "tokens[0] 'all'; allowed: a token count, or 'all' in the last",
    ),
    ("methods.depth.search.tokens", [128, "most"], "tokens[1] 'most'; allowed: a token count, or 'all'"),
    ("methods.depth.search.tokens", [128, 1.5], "tokens[1]: expected int or str, got float 1.5"),
    ("methods.depth.search.initial_tokens", 4096, "initial_tokens 4096 exceeds the calibration set's"),
    ("methods.depth.search.init", "best", "methods.depth.search.init 'best'; allowed: uniform, random"),
    ("methods.depth.search.initially_generated", 0, "initially_generated must be >= 1"),
    ("methods.depth.search.max_mutation_steps", 0, "max_mutation_steps must be >= 1"),
    ("methods.depth.search.seed_baselines", ["nope"], "methods.depth.search.seed_baselines: unknown 'nope'"),
    ("methods.depth.baseline_tokens", 4096, "methods.depth.baseline_tokens 4096 is outside 1..2048"),
    ("methods.depth.target", 2.5, "methods.depth: depth target 2.5 must be a whole number"),
    ("methods.depth.options", {"granularity": "layer"}, "methods.depth: unknown granularity 'layer'"),
    ("methods.depth.options", {"foo": 1}, "methods.depth: unknown depth options ['foo']"),
    ("methods.sparsity.target", 60, "methods.sparsity: sparsity target 60.0 outside (0, 1)"),
    ("methods.sparsity.database", {"num_levels": 100}, "methods.sparsity: num_levels=100 outside 0..64"),
    ("methods.sparsity.database", {"inputs": "x"}, "methods.sparsity: inputs='x'; allowed: dense, uniform"),
    ("methods.sparsity.options", {"blocksize": 0}, "methods.sparsity: blocksize=0 must be >= 1"),
    ("methods.quantization.database", {"bits": [2, 3, 9]}, "methods.quantization: bit-width 9 outside 1..8"),
    ("methods.quantization.database", {"bits": [2, 3, 5]}, "must be ascending and evenly spaced"),
    ("methods.quantization.options", {"kernel": "exllama"}, "unknown kernel 'exllama'; allowed: marlin"),
    ("methods.quantization.target", 7.0, "outside the database's range 2..4"),
    ("methods.quantization.database", {"group_size": -1}, "group_size=-1 must be >= 0"),
    ("methods.quantization.options", {"foo": 1}, "unknown quantization options ['foo']"),
    (
        "methods.quantization.stitch",
        {"format": "gguf"},
        "methods.quantization.stitch: stitch format 'gguf' for method 'quantization'; allowed: compressed-tensors,",
    ),
    (
        "methods.sparsity.stitch",
        {"fromat": "dense"},
        "unknown stitch options ['fromat'] for method 'sparsity'",
    ),
    (
        "methods.depth.stitch",
        {"format": "dense"},
        "unknown stitch options ['format'] for method 'depth'; allowed: none",
    ),
    ("compute.batch_size", 0, "compute.batch_size must be >= 1"),
    ("compute.topk", -1, "compute.topk must be >= 0"),
    ("compute.workers", 0, "compute.workers must be >= 1"),
    ("compute.device", "gpu", "compute.device 'gpu'; allowed: auto, cpu, cuda, cuda:<n>"),
    ("compute.device", "cuda:x", "compute.device 'cuda:x'; allowed"),
    ("model.dtype", "auto", "model.dtype 'auto'; allowed: float32"),
    ("data.n_calibration", 0, "data.n_calibration must be >= 1"),
    ("methods", {}, "methods: name at least one method"),
    (
        "methods.depth.fitness_rows",
        "unseen",
        "methods.depth.fitness_rows: fitness_rows 'unseen' needs a level",
    ),
    ("methods.depth.fitness_rows", "some", "fitness_rows 'some'; allowed: all, unseen or a number of rows"),
    ("methods.depth.fitness_rows", 0, "methods.depth.fitness_rows: fitness_rows 0: a number of rows must be"),
    ("methods.depth.fitness_rows", 17, "fitness_rows 17 is more than the 16 calibration rows"),
    ("methods.depth.fitness_rows", 1, "initial_tokens 256 exceeds the calibration set's 128 tokens"),
    (
        "methods.sparsity.database",
        {"num_levels": 1, "n_samples": 16},
        "methods.sparsity.fitness_rows: fitness_rows 'unseen': the database was fitted on 16 of the 16",
    ),
    # unseen leaves 12 of 16 rows of 128 tokens to the quantization baselines
    ("methods.quantization.baseline_tokens", 1600, "baseline_tokens 1600 is outside 1..1536"),
]


@pytest.mark.parametrize("path, value, message", RULES, ids=[f"{p}={v}" for p, v, _ in RULES])
def test_check_params_applies_every_stage_rule(path, value, message):
    with pytest.raises(UserError) as err:
        P.parse(edit(smoke(), path, value))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_search_command_applies_the_same_rules_as_check_params(monkeypatch, capsys):
    """The command line builds the same SearchConfig and validates it with the same rules (no model needed)."""
    import sys

    from evopress import cli

    monkeypatch.setattr(sys, "argv", ["evopress", "search", "--target", "1", "--survivors", "1,2"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    assert "search.survivors [1, 2] must be >= 1 and non-increasing" in capsys.readouterr().err


def test_cli_as_a_module_knows_every_command():
    """`python -m evopress.cli` registers the commands of every command module (one shared app)."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "evopress.cli", "check-params", "--params", str(REPO / "params-smoke.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_keys_dvc_tracks_must_be_written_out():
    tree = smoke()
    del tree["methods"]["depth"]["database"]
    with pytest.raises(UserError, match="missing key 'methods.depth.database'"):
        P.parse(tree)


def test_load_names_the_file_and_rejects_bad_yaml(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("methods: [unclosed\n")
    with pytest.raises(UserError, match="not valid yaml"):
        P.load(bad)
    bad.write_text(yaml.safe_dump(edit(smoke(), "data.seq_len", 0)))
    with pytest.raises(UserError, match=r"p.yaml: data.seq_len must be >= 2"):
        P.load(bad)


def test_flatten_gives_mlflow_params():
    flat = P.flatten(P.as_dict(P.parse(smoke())))
    assert flat["methods.depth.search.generations"] == "3"
    assert flat["methods.depth.search.survivors"] == "2,1"
    assert flat["model.source"] == "embedded:smollm2-135m"
