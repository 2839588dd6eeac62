"""The schema of params.yaml: every setting of every pipeline stage, checked before any stage starts.

A wrong file fails in one line that names the key: an unknown key (`methods.depth.serch`), a wrong type
(`methods.depth.search.generations: expected int, got str 'ten'`), a value outside what is allowed.
Dataclasses are the schema: field names are the allowed keys, annotations the types, defaults the defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evopress.config import DTYPES, ComputeConfig, SearchConfig, from_tree
from evopress.data import DataSpec, validate_spec
from evopress.errors import UserError, require
from evopress.fitness_rows import UNSEEN, row_span
from evopress.methods import METHODS, baselines, check_settings, check_stitch_options
from evopress.zero_shot import LmEvalParams

SPLITS = ("calibration", "heldout")


@dataclass
class ModelParams:
    source: str = "embedded:smollm2-135m"  # embedded:<name> | HF folder | .gguf file | hf:<org>/<name>
    dtype: str = "float32"  # dtype the prepared model is saved in


@dataclass
class MethodParams:
    target: float = 0.0  # depth: blocks (or sublayers of each kind) removed; sparsity: average; quant: bits
    options: dict[str, typing.Any] = field(default_factory=dict)  # the compressor's options (method-specific)
    database: dict[str, typing.Any] = field(default_factory=dict)  # build-db options (database methods)
    search: SearchConfig = field(default_factory=SearchConfig)
    baselines: list[str] = field(default_factory=list)
    baseline_tokens: int = 2048
    baseline_seed: int = 0
    # Calibration rows the search and the baselines score: all | unseen (after the database's n_samples) | N
    # (the first N); evopress/fitness_rows.py says why unseen.
    fitness_rows: int | str = "all"
    stitch: dict[str, typing.Any] = field(
        default_factory=dict
    )  # the stitched folder's format (stitch options)


@dataclass
class EvaluateParams:
    sets: list[str] = field(default_factory=lambda: ["heldout"])
    kl: bool = True
    lm_eval: LmEvalParams = field(default_factory=LmEvalParams)  # zero-shot tasks; off while tasks is empty


@dataclass
class TrackingParams:
    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<project>/mlflow.db
    artifact_root: str = "mlartifacts"  # relative to the project, made absolute
    experiment: str = "evopress"


@dataclass
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataSpec = field(default_factory=DataSpec)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    methods: dict[str, MethodParams] = field(default_factory=dict)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)

    @property
    def calibration_tokens(self) -> int:
        return self.data.n_calibration * self.data.seq_len


# --- rules on values (the same ones the stages apply: check-params rejects what a stage would) --------------------
def _in_key(key: str, check, *args) -> None:
    """Run a library check, prefixing its one-line error with the params key it is about; returns its result."""
    try:
        return check(*args)
    except UserError as err:
        raise UserError(f"{key}: {err}") from err


def check_method(name: str, m: MethodParams, data: DataSpec) -> None:
    key = f"methods.{name}"
    require(name in METHODS, f"unknown method {key!r}; allowed: {', '.join(METHODS)}")
    calibration_tokens = _fitness_rows(key, name, m, data) * data.seq_len
    m.search.validate(f"{key}.search", calibration_tokens)
    allowed = baselines(name)
    for b in m.search.seed_baselines:
        require(b in allowed, f"{key}.search.seed_baselines: unknown {b!r}; allowed: {', '.join(allowed)}")
    for b in m.baselines:
        require(b in allowed, f"{key}.baselines: unknown {b!r}; allowed: {', '.join(allowed)}")
    require(
        1 <= m.baseline_tokens <= calibration_tokens,
        f"{key}.baseline_tokens {m.baseline_tokens} is outside 1..{calibration_tokens} (the tokens of the "
        "calibration rows it scores)",
    )
    if name == "depth":
        require(not m.database, f"{key}.database: method {name!r} has no level database; remove the key")
    _in_key(key, check_settings, name, m.target, m.options, m.database)
    _in_key(f"{key}.stitch", check_stitch_options, name, m.stitch)


def _fitness_rows(key: str, name: str, m: MethodParams, data: DataSpec) -> int:
    """How many calibration rows the method's search and baselines score (`fitness_rows`), checked as far as the
    params tell (unseen with the database's default n_samples: the stage checks it against the built database)."""
    n_database = None if name == "depth" else m.database.get("n_samples")
    if m.fitness_rows == UNSEEN and n_database is None and name != "depth":
        return data.n_calibration
    first, end = _in_key(f"{key}.fitness_rows", row_span, m.fitness_rows, data.n_calibration, n_database)
    return end - first


def check(params: Params) -> Params:
    require(bool(params.methods), "methods: name at least one method (depth, sparsity, quantization)")
    validate_spec(params.data)
    for name, m in params.methods.items():
        check_method(name, m, params.data)
    require(
        params.model.dtype in DTYPES and params.model.dtype != "auto",
        f"model.dtype {params.model.dtype!r}; allowed: {', '.join(t for t in DTYPES if t != 'auto')}",
    )
    params.compute.validate("compute")
    for s in params.evaluate.sets:
        require(s in SPLITS, f"evaluate.sets: unknown {s!r}; allowed: {', '.join(SPLITS)}")
    params.evaluate.lm_eval.validate()
    return params


# Keys dvc.yaml lists under `params:`: DVC needs them written out in the file (it does not know our defaults).
DVC_KEYS = ("model", "data", "compute", "methods", "evaluate")
DVC_METHOD_KEYS = (
    "target",
    "options",
    "database",
    "search",
    "baselines",
    "baseline_tokens",
    "baseline_seed",
    "fitness_rows",
    "stitch",
)


def _check_dvc_keys(tree) -> None:
    for k in DVC_KEYS:
        require(k in tree, f"missing key {k!r} in params (dvc.yaml tracks it; write it out, even if empty)")
    for name, m in (tree.get("methods") or {}).items():
        for k in DVC_METHOD_KEYS:
            require(
                isinstance(m, dict) and k in m,
                f"missing key 'methods.{name}.{k}' in params (dvc.yaml tracks it; write it out, even if empty: {{}} or [])",
            )


def parse(tree) -> Params:
    params = check(from_tree(Params, tree))
    _check_dvc_keys(tree)
    return params


def load(path: Path | str = "params.yaml") -> Params:
    path = Path(path)
    require(path.is_file(), f"no params file at {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        line = str(err).replace("\n", " ")
        raise UserError(f"{path} is not valid yaml: {line}") from err
    try:
        return parse(tree)
    except UserError as err:
        raise UserError(f"{path}: {err}") from err


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def flatten(tree, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: the form MLflow params take."""
    if isinstance(tree, dict) and tree:
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, list | tuple):
        return {prefix[:-1]: ",".join(map(str, tree))}
    return {prefix[:-1]: str(tree)}
