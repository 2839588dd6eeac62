"""Typed settings of the library, built and validated the same way from params.yaml, the command line or Python.

Dataclasses are the schema: field names are the allowed keys, annotations the types, defaults the defaults.
`from_tree(cls, tree, key)` turns a yaml/json tree into one, failing in one line that names the key of the
first problem (an unknown key, a wrong type); each config's `validate(key, ...)` holds the rules on values.
Every entry point calls both, so `evopress check-params` rejects what a stage would reject later.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass

from evopress.errors import UserError, require

DTYPES = ("auto", "float32", "bfloat16", "float16")
INITS = ("uniform", "random")
ALL = "all"  # a selection step on every calibration row: parent and children meet on identical rows


# --- generic conversion: tree -> dataclass, naming the key of the first problem ----------------------------------
def _type_name(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def convert(value, tp, key: str):
    """`value` as type `tp` (a dataclass, list/tuple/dict of those, int, float, bool, str, Any)."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_tree(tp, value, key)
    if origin in (
        typing.Union,
        types.UnionType,
    ):  # the first alternative that fits (int | str: 1024 or "all")
        alternatives = typing.get_args(tp)
        for alt in alternatives:
            try:
                return convert(value, alt, key)
            except UserError:
                continue
        names = " or ".join(a.__name__ for a in alternatives)
        require(False, f"{key}: expected {names}, got {_type_name(value)}")
    if origin in (list, tuple):
        require(isinstance(value, list | tuple), f"{key}: expected a list, got {_type_name(value)}")
        item = typing.get_args(tp)[0]
        items = [convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        require(isinstance(value, dict), f"{key}: expected a mapping, got {_type_name(value)}")
        _, item = typing.get_args(tp)
        return {str(k): convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        require(ok, f"{key}: expected a number, got {_type_name(value)}")
        return float(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    require(ok, f"{key}: expected {tp.__name__}, got {_type_name(value)}")
    return value


def from_tree(cls, tree, key: str = "", ignore: tuple[str, ...] = ()):
    """An instance of dataclass `cls` from a mapping; unknown keys and wrong types fail naming the key."""
    where = key or "params"
    require(tree is None or isinstance(tree, dict), f"{where}: expected a mapping, got {_type_name(tree)}")
    tree = {k: v for k, v in (tree or {}).items() if k not in ignore}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in tree:
        full = f"{key}.{k}" if key else str(k)
        require(k in names, f"unknown key {full!r}; allowed here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in tree:
            kwargs[name] = convert(tree[name], hints[name], f"{key}.{name}" if key else name)
    return cls(**kwargs)


def options_from(cls, options: dict | None, what: str, ignore=lambda key: False):
    """A method's options dataclass from a mapping: unknown keys (unless `ignore(key)`) and wrong types fail in one
    line naming the option; values are converted by the dataclass's annotations, like params.yaml's."""
    options = dict(options or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in options if k not in names and not ignore(k))
    require(not unknown, f"unknown {what} options {unknown}; allowed: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: convert(v, hints[k], f"option {k}") for k, v in options.items() if k in names})


def parse_option_pairs(pairs: list[str] | None) -> dict:
    """Command-line `--option key=value` pairs -> {key: value}; values are json when they parse, else text."""
    options = {}
    for pair in pairs or []:
        k, sep, value = pair.partition("=")
        require(sep == "=" and bool(k.strip()), f"bad --option {pair!r}; expected key=value")
        try:
            options[k.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[k.strip()] = value.strip()
    return options


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """'4,1' -> (4, 1), for list settings given on the command line."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        require(False, f"bad {name} {text!r}; expected comma-separated integers like 4,1")
        raise  # unreachable: require raised


def parse_token_steps(text: str, name: str = "--tokens") -> tuple[int | str, ...]:
    """'1024,all' -> (1024, 'all'): tokens per selection step; `all` (the last step only) = every row."""
    steps = [v.strip() for v in text.split(",")]
    try:
        return tuple(ALL if v == ALL else int(v) for v in steps)
    except ValueError:
        require(
            False, f"bad {name} {text!r}; expected comma-separated integers, the last may be 'all': 1024,all"
        )
        raise  # unreachable: require raised


DEVICES = ("auto", "cpu", "cuda", "cuda:<n>")


def check_device(name: str, key: str = "compute.device") -> str:
    """A device setting's form (availability is checked where it is used: `resolve_device`)."""
    ok = name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())
    require(ok, f"{key} {name!r}; allowed: {', '.join(DEVICES)}")
    return name


def _at_least(key: str, value: int, low: int) -> None:
    require(value >= low, f"{key} must be >= {low}, got {value}")


# --- the settings -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComputeConfig:
    """How forward passes run (search, baselines, evaluation)."""

    dtype: str = "auto"  # auto = bfloat16 where native (GPU, AVX512-BF16/AMX CPU), else float32
    batch_size: int = 8
    topk: int = 512  # dense top-K kept for the KL (0 = full vocabulary)
    # Searches score candidates on `workers` Ray actors (evopress/workers.py) when > 1 or when `ray_address`
    # names a cluster ("auto": the one `ray start` made here); each actor uses `threads` torch threads (0 = all
    # of this process's threads split evenly over the workers).
    workers: int = 1
    ray_address: str = ""
    threads: int = 0
    # Where the model runs: auto = the first CUDA device where torch sees one, else the CPU. Database builds run
    # on the CPU in float32 whatever this says.
    device: str = "auto"

    def validate(self, key: str = "compute") -> ComputeConfig:
        require(self.dtype in DTYPES, f"{key}.dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        _at_least(f"{key}.batch_size", self.batch_size, 1)
        _at_least(f"{key}.topk", self.topk, 0)
        _at_least(f"{key}.workers", self.workers, 1)
        _at_least(f"{key}.threads", self.threads, 0)
        check_device(self.device, f"{key}.device")
        return self

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or bool(self.ray_address)

    def threads_per_worker(self) -> int:
        import torch

        return self.threads or max(1, torch.get_num_threads() // self.workers)


@dataclass(frozen=True)
class SearchConfig:
    """The (1 + lambda) search: generations, offspring, and the multi-step selection schedule."""

    generations: int = 50
    offspring: int = 16
    survivors: tuple[int, ...] = (4, 1)  # candidates kept after each selection step (the last keeps 1)
    # Calibration tokens scored in each selection step. The last may be "all" (every calibration row, exact): the
    # parent and its children then meet on identical rows, so the search never accepts a worse profile. The
    # authors' last steps hold 32K-131K tokens, more than our calibration sets: exact is the faithful default.
    tokens: tuple[int | str, ...] = (1024, ALL)
    seed: int = 0
    init: str = ""  # uniform | random; "" = the method's default (random for depth, uniform otherwise)
    initially_generated: int = 16  # random profiles tried for init=random
    initial_tokens: int = 2048  # tokens scoring the initial candidates
    # Baseline profiles that compete with the initial candidates (scored on `initial_tokens`); the search then
    # starts from whichever is fittest. Cheap heuristics give a short search a far better start than random.
    seed_baselines: tuple[str, ...] = ()
    max_mutation_steps: int = 3
    prefix_reuse: bool = True
    # The parent joins the first selection step too, on the same rows as its children (nearly free with prefix
    # reuse: its hidden states are the prefix). Children that do not beat it there are dropped, and a generation
    # where none does ends without the later, costlier steps: ~3x the generations in the same time when most
    # children lose, which is the usual case near a good start.
    screen_with_parent: bool = True

    def validate(self, key: str = "search", calibration_tokens: int | None = None) -> SearchConfig:
        _at_least(f"{key}.generations", self.generations, 0)
        _at_least(f"{key}.offspring", self.offspring, 1)
        require(
            len(self.survivors) == len(self.tokens) >= 1,
            f"{key}: tokens {list(self.tokens)} and survivors {list(self.survivors)} need the same length "
            "(one entry per selection step)",
        )
        require(
            all(s >= 1 for s in self.survivors)
            and list(self.survivors) == sorted(self.survivors, reverse=True),
            f"{key}.survivors {list(self.survivors)} must be >= 1 and non-increasing",
        )
        require(
            self.survivors[0] <= self.offspring,
            f"{key}.survivors {self.survivors[0]} exceed offspring {self.offspring}; allowed: survivors <= offspring",
        )
        last = len(self.tokens) - 1
        for i, t in enumerate(self.tokens):
            require(
                not isinstance(t, str) or (t == ALL and i == last),
                f"{key}.tokens[{i}] {t!r}; allowed: a token count, or 'all' in the last step only",
            )
        counts = [t for t in self.tokens if t != ALL]
        for name, values in (("tokens", counts), ("initial_tokens", (self.initial_tokens,))):
            for t in values:
                _at_least(f"{key}.{name}", t, 1)
                if calibration_tokens is not None:
                    require(
                        t <= calibration_tokens,
                        f"{key}.{name} {t} exceeds the calibration set's {calibration_tokens} tokens",
                    )
        require(
            self.init in ("", *INITS), f"{key}.init {self.init!r}; allowed: {', '.join(INITS)} (or empty)"
        )
        _at_least(f"{key}.initially_generated", self.initially_generated, 1)
        _at_least(f"{key}.max_mutation_steps", self.max_mutation_steps, 1)
        return self

    @property
    def exact_last_step(self) -> bool:
        return self.tokens[-1] == ALL

    def for_method(self, method: str) -> SearchConfig:
        """This config with the method's defaults filled in (the one place `init`'s default is decided)."""
        if self.init:
            return self
        return dataclasses.replace(self, init="random" if method == "depth" else "uniform")

    def fingerprint(self) -> dict:
        """Settings a resumed run must share (the generation count may grow)."""
        d = dataclasses.asdict(self)
        d.pop("generations")
        d.pop("prefix_reuse")  # results are identical with or without it
        if not d["seed_baselines"]:
            d.pop("seed_baselines")  # checkpoints written before the field existed stay resumable
        if not d["screen_with_parent"]:
            d.pop("screen_with_parent")  # likewise: off is how searches ran before it existed
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
