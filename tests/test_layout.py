"""The Layout is the pipeline's one spelling of paths: dvc.yaml must say the same, code deps must be complete,
and no module of the project imports itself back through others (function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from evopress.layout import PER_METHOD, STAGES, Layout

REPO = Path(__file__).resolve().parents[1]
METHODS = ("depth", "sparsity", "quantization")
# Wiring: how settings reach the library and where results are recorded; changing it changes no result.
WIRING = {
    "evopress.cli",
    "evopress.cli_app",
    "evopress.cli_compress",
    "evopress.cli_database",
    "evopress.cli_pipeline",
    "evopress.params",
    "evopress.pipeline",
    "evopress.tracking",
    "evopress.layout",
}
# The library entry points each stage calls (evopress.stages dispatches to the method modules by name).
# `module:function` = the module's top-level imports plus the imports inside that function.
ENTRIES = {
    "prepare_model": ["evopress.stages:prepare_model"],
    "prepare_data": ["evopress.stages:prepare_data"],
    "build_db": ["evopress.stages:build_db", "evopress.compressors.{m}"],
    "search": ["evopress.stages:search", "evopress.compressors.{m}", "evopress.baselines.{m}"],
    "baselines": ["evopress.stages:baseline", "evopress.compressors.{m}", "evopress.baselines.{m}"],
    "stitch": ["evopress.stages:stitch", "evopress.compressors.{m}"],
    "evaluate": ["evopress.evaluate", *(f"evopress.compressors.{m}" for m in METHODS)],
    "report": ["evopress.report"],
}


# --- the import graph, read from the source (every import statement, also inside functions) ----------------------
def module_files() -> dict[str, Path]:
    out = {}
    for root in ("evopress", "flows", "tasks"):
        for path in sorted((REPO / root).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _in_type_checking(node, parents) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, name: str, known: set[str], function: str | None = None) -> set[str]:
    """Project modules `path` imports; with `function`: only its top-level imports and that function's."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = list(ast.walk(tree))
    if function is not None:
        body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
        nodes = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)] + list(ast.walk(body))
    found = set()
    for node in nodes:
        if _in_type_checking(node, parents):
            continue  # typing only: never executed
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            # importing a.b.c runs a, a.b and a.b.c
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if prefix in known and prefix != name and not name.startswith(prefix + "."):
                    found.add(prefix)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path, name, set(files)) for name, path in files.items()}


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def closure(graph, entries: list[str]) -> set[str]:
    files = module_files()
    seen, todo = set(), []
    for entry in entries:
        module, _, function = entry.partition(":")
        if function:
            seen.add(module)
            todo += imports_of(files[module], module, set(files), function)
        else:
            todo.append(module)
    while todo:
        node = todo.pop()
        if node in seen or node in WIRING:
            continue
        seen.add(node)
        todo += graph[node]
    return seen


def covered(module_path: str, deps: list[str]) -> bool:
    return any(module_path == d or module_path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_code_deps_cover_every_module_the_stage_runs(graph, stage):
    files = module_files()
    for m in METHODS if stage in PER_METHOD else [None]:
        entries = [e.format(m=m) for e in ENTRIES[stage]]
        deps = Layout.code(stage, m)
        missing = sorted(
            files[mod].relative_to(REPO).as_posix()
            for mod in closure(graph, entries)
            if not covered(files[mod].relative_to(REPO).as_posix(), deps)
        )
        assert not missing, f"{stage}@{m}: code deps miss {missing}"
        for d in deps:
            assert (REPO / d).exists(), f"{stage}@{m}: code dep {d} does not exist"


# --- dvc.yaml says what the Layout says ---------------------------------------------------------------------------
def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_declares_the_layouts_paths(stage):
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    for m in METHODS if stage in PER_METHOD else [None]:
        body = spec["do"] if "foreach" in spec else spec

        def sub(paths, m=m):
            return sorted(p.replace("${key}", m) if m else p for p in paths)

        deps = sub(_paths(body.get("deps")))
        assert deps == sorted(Layout.deps(stage, m) + Layout.code(stage, m)), f"{stage}@{m} deps"
        outs = sub(_paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots")))
        assert outs == sorted(Layout.outs(stage, m)), f"{stage}@{m} outs"


def test_layout_paths_resolve_under_the_root(tmp_path):
    layout = Layout(tmp_path)
    assert layout.model == tmp_path / "data/model" and layout.db("sparsity") == tmp_path / "data/db/sparsity"
    assert layout.stamp(layout.search("depth") / "checkpoint.json").name == "checkpoint.json.params.json"


def test_stage_labels_are_dvc_yaml_stages_in_dvc_stage_list_order():
    """`stage_labels` (the runs a flow creates ahead) expands dvc.yaml as DVC does: file order, `foreach` over
    params.yaml methods in their order."""
    from evopress.layout import stage_labels, stage_order

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    methods = list(yaml.safe_load((REPO / "params.yaml").read_text())["methods"])
    expected = []
    for stage, body in spec.items():
        expected += [f"{stage}@{m}" for m in methods] if "foreach" in body else [stage]
    assert stage_labels(methods) == expected
    assert [stage_order(label, ["a", "b"]) for label in stage_labels(["a", "b"])][:6] == [
        "1",
        "2",
        "3.1",
        "3.2",
        "4.1",
        "4.2",
    ]
