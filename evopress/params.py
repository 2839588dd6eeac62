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

from evopress.errors import UserError, require
from evopress.methods import METHODS, baselines, needs_database

DTYPES = ("auto", "float32", "bfloat16", "float16")
SPLITS = ("calibration", "heldout")


@dataclass
class ModelParams:
    source: str = "embedded:smollm2-135m"  # embedded:<name> | local HF folder | hf:<org>/<name>
    dtype: str = "float32"  # dtype the prepared model is saved in


@dataclass
class DataParams:
    source: str = "builtin:pydoc"
    seq_len: int = 512
    n_calibration: int = 128
    n_heldout: int = 32
    field: str = "text"


@dataclass
class ComputeParams:
    dtype: str = (
        "auto"  # forward passes; auto = bfloat16 where native (GPU, AVX512-BF16/AMX CPU), else float32
    )
    batch_size: int = 8
    topk: int = 512  # dense top-K kept for the KL (0 = full vocabulary)


@dataclass
class SearchParams:
    generations: int = 50
    offspring: int = 16
    survivors: list[int] = field(default_factory=lambda: [4, 1])
    tokens: list[int] = field(default_factory=lambda: [1024, 8192])
    seed: int = 0
    init: str = ""  # "" = the method's default (random for depth, uniform otherwise)
    initially_generated: int = 16
    initial_tokens: int = 2048
    seed_baselines: list[str] = field(
        default_factory=list
    )  # baselines competing for the start (see search.py)
    prefix_reuse: bool = True


@dataclass
class MethodParams:
    target: float = (
        0.0  # depth: blocks (or sublayers of each kind) removed; sparsity: average; quantization: bits
    )
    options: dict[str, typing.Any] = field(default_factory=dict)  # the compressor's options (method-specific)
    database: dict[str, typing.Any] = field(default_factory=dict)  # build-db options (database methods)
    search: SearchParams = field(default_factory=SearchParams)
    baselines: list[str] = field(default_factory=list)
    baseline_tokens: int = 2048
    baseline_seed: int = 0


@dataclass
class EvaluateParams:
    sets: list[str] = field(default_factory=lambda: ["heldout"])
    kl: bool = True


@dataclass
class TrackingParams:
    enabled: bool = True
    uri: str = ""  # "" = sqlite:///<project>/mlflow.db
    artifact_root: str = "mlartifacts"  # relative to the project, made absolute
    experiment: str = "evopress"


@dataclass
class Params:
    model: ModelParams = field(default_factory=ModelParams)
    data: DataParams = field(default_factory=DataParams)
    compute: ComputeParams = field(default_factory=ComputeParams)
    methods: dict[str, MethodParams] = field(default_factory=dict)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


# --- generic conversion: yaml tree -> dataclasses, naming the key of the first problem --------------------------
def _type_name(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def _convert(value, tp, key: str):
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        require(isinstance(value, list), f"{key}: expected a list, got {_type_name(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        require(isinstance(value, dict), f"{key}: expected a mapping, got {_type_name(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        require(ok, f"{key}: expected a number, got {_type_name(value)}")
        return float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, f"{key}: expected {tp.__name__}, got {_type_name(value)}")
    return value


def _build(cls, tree, key: str):
    where = key or "params"
    require(tree is None or isinstance(tree, dict), f"{where}: expected a mapping, got {_type_name(tree)}")
    tree = tree or {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in tree:
        full = f"{key}.{k}" if key else str(k)
        require(k in names, f"unknown key {full!r} in params; allowed here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in tree:
            full = f"{key}.{name}" if key else name
            kwargs[name] = _convert(tree[name], hints[name], full)
    return cls(**kwargs)


# --- semantic checks --------------------------------------------------------------------------------------------
def _check_method(name: str, m: MethodParams) -> None:
    key = f"methods.{name}"
    require(name in METHODS, f"unknown method {key!r}; allowed: {', '.join(METHODS)}")
    s = m.search
    require(s.generations >= 1, f"{key}.search.generations must be >= 1, got {s.generations}")
    require(s.offspring >= 1, f"{key}.search.offspring must be >= 1, got {s.offspring}")
    require(
        len(s.tokens) == len(s.survivors) >= 1,
        f"{key}.search: tokens {s.tokens} and survivors {s.survivors} need the same length (one per step)",
    )
    require(s.init in ("", "uniform", "random"), f"{key}.search.init {s.init!r}; allowed: uniform, random")
    allowed = baselines(name)
    for b in m.baselines:
        require(b in allowed, f"{key}.baselines: unknown {b!r}; allowed: {', '.join(allowed)}")
    if not needs_database(name):
        require(not m.database, f"{key}.database: method {name!r} has no level database; remove the key")


def check(params: Params) -> Params:
    require(bool(params.methods), "methods: name at least one method (depth, sparsity, quantization)")
    for name, m in params.methods.items():
        _check_method(name, m)
    for key, dtype in (("model.dtype", params.model.dtype), ("compute.dtype", params.compute.dtype)):
        require(dtype in DTYPES, f"{key} {dtype!r}; allowed: {', '.join(DTYPES)}")
    d = params.data
    for key in ("seq_len", "n_calibration", "n_heldout"):
        require(getattr(d, key) >= 1, f"data.{key} must be >= 1, got {getattr(d, key)}")
    for s in params.evaluate.sets:
        require(s in SPLITS, f"evaluate.sets: unknown {s!r}; allowed: {', '.join(SPLITS)}")
    require(
        params.compute.batch_size >= 1, f"compute.batch_size must be >= 1, got {params.compute.batch_size}"
    )
    return params


# Keys dvc.yaml lists under `params:`: DVC needs them written out in the file (it does not know our defaults).
DVC_KEYS = ("model", "data", "compute", "methods", "evaluate")
DVC_METHOD_KEYS = ("target", "options", "database", "search", "baselines", "baseline_tokens", "baseline_seed")


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
    params = check(_build(Params, tree, ""))
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
    if isinstance(tree, list):
        return {prefix[:-1]: ",".join(map(str, tree))}
    return {prefix[:-1]: str(tree)}
