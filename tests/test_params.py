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
    with pytest.raises(UserError, match=r"p.yaml: data.seq_len must be >= 1"):
        P.load(bad)


def test_flatten_gives_mlflow_params():
    flat = P.flatten(P.as_dict(P.parse(smoke())))
    assert flat["methods.depth.search.generations"] == "3"
    assert flat["methods.depth.search.survivors"] == "2,1"
    assert flat["model.source"] == "embedded:smollm2-135m"
