"""Where the pipeline keeps everything: one `Layout` for the stages, the report, tracking, the flow and dvc.yaml.

Paths are relative to the project root (the form dvc.yaml and dvc.lock use); `layout.at(path)` makes them
absolute. `deps`, `outs` and `code` are what each stage of dvc.yaml declares; tests/test_layout.py checks that
dvc.yaml says exactly this, and that `code` covers every library module a stage's entry point imports.

Code dependencies: a stage depends on the library modules that compute its outputs (so a change to gptq.py
rebuilds the quantization database and everything after it), not on the wiring (command line, params schema,
tracking, this file), whose changes do not change results. Method code lives in one package per method
(`evopress/compressors/<method>/`), so dvc.yaml can name it with `${key}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("prepare_model", "prepare_data", "build_db", "baselines", "search", "stitch", "evaluate", "report")
PER_METHOD = ("build_db", "baselines", "search", "stitch")


def stage_labels(methods) -> list[str]:
    """Every stage of dvc.yaml for these methods (params.yaml order), in `dvc stage list` order: STAGES with each
    per-method stage expanded (`search@depth`, `search@quantization`), as DVC expands `foreach`."""
    return [
        f"{s}@{m}" if s in PER_METHOD else s for s in STAGES for m in (methods if s in PER_METHOD else [""])
    ]


def stage_order(label: str, methods) -> str:
    """A stage's place in dvc.yaml ("4.2": fourth stage, second method), the `evopress.order` tag."""
    name, _, m = label.partition("@")
    order = str(STAGES.index(name) + 1)
    return f"{order}.{list(methods).index(m) + 1}" if m else order


MODEL = "data/model"
TEXT = "data/text"
METRICS = "runs/metrics.json"
RESULTS = "runs/results.md"

# What every stage's library code imports (evopress/stages.py and the modules it imports at its top).
_COMMON = [
    "evopress/adapter.py",
    "evopress/config.py",
    "evopress/ct_format.py",
    "evopress/data.py",
    "evopress/database.py",
    "evopress/level_codecs.py",
    "evopress/depth_format.py",
    "evopress/errors.py",
    "evopress/io.py",
    "evopress/methods.py",
    "evopress/models.py",
    "evopress/packing.py",
    "evopress/sparse_format.py",
    "evopress/stages.py",
]
# What every compressor imports.
_COMPRESSOR = [
    "evopress/compressors/__init__.py",
    "evopress/compressors/base.py",
    "evopress/compressors/linears.py",
    "evopress/build_pool.py",  # linears.build_by_block runs on its pools
    "evopress/ray_cluster.py",
    "evopress/hessians.py",
    "evopress/mutation.py",
    "evopress/profile.py",
    "evopress/progress.py",
]
_SCORING = ["evopress/fitness.py", "evopress/scoring.py"]


def _method_code(m: str) -> list[str]:
    return [f"evopress/compressors/{m}"]


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def at(self, path: str) -> Path:
        return Path(self.root) / path

    # --- outputs -------------------------------------------------------------------------------------------------
    @property
    def model(self) -> Path:
        return self.at(MODEL)

    @property
    def text(self) -> Path:
        return self.at(TEXT)

    @property
    def metrics(self) -> Path:
        return self.at(METRICS)

    @property
    def results(self) -> Path:
        return self.at(RESULTS)

    def db(self, m: str) -> Path:
        return self.at(f"data/db/{m}")

    def search(self, m: str) -> Path:
        return self.at(f"runs/search/{m}")

    def baselines(self, m: str) -> Path:
        return self.at(f"runs/baselines/{m}")

    def stitched(self, m: str) -> Path:
        return self.at(f"models/{m}")

    def stamp(self, out: Path) -> Path:
        """The settings (and code hash) a persisted output was made with, beside it."""
        return out.with_name(out.name + ".params.json")

    # --- the stage graph (relative paths, as in dvc.yaml) ----------------------------------------------------------
    @staticmethod
    def deps(stage: str, m: str | None = None) -> list[str]:
        """Data inputs of a stage."""
        return {
            "prepare_model": [],
            "prepare_data": [MODEL],
            "build_db": [MODEL, TEXT],
            "search": [MODEL, TEXT, f"data/db/{m}", f"runs/baselines/{m}"],  # seeds: baselines' profiles
            "baselines": [MODEL, TEXT, f"data/db/{m}"],
            "stitch": [MODEL, f"data/db/{m}", f"runs/search/{m}/profile.json"],
            "evaluate": [MODEL, TEXT, "runs/search", "runs/baselines", "models"],
            "report": [METRICS],
        }[stage]

    @staticmethod
    def code(stage: str, m: str | None = None) -> list[str]:
        """Library modules (files, or a method's package folder) whose code computes the stage's outputs."""
        method = _method_code(m) if m else []
        return {
            "prepare_model": _COMMON,
            "prepare_data": _COMMON,
            "build_db": [*_COMMON, *_COMPRESSOR, *method],
            "search": [
                *_COMMON,
                *_COMPRESSOR,
                *_SCORING,
                "evopress/device.py",
                "evopress/fitness_rows.py",
                "evopress/search.py",
                "evopress/workers.py",
                f"evopress/baselines/{m}.py",
                *method,
            ],
            "baselines": [
                *_COMMON,
                *_COMPRESSOR,
                *_SCORING,
                "evopress/device.py",
                "evopress/fitness_rows.py",
                f"evopress/baselines/{m}.py",
                *method,
            ],
            "stitch": [*_COMMON, *_COMPRESSOR, *method],
            "evaluate": [
                *_COMMON,
                *_COMPRESSOR[1:],
                *_SCORING,
                "evopress/artifact.py",
                "evopress/device.py",
                "evopress/evaluate.py",
                "evopress/fitness_rows.py",
                "evopress/search.py",  # evopress.stages imports it (evaluate stitches baselines with stages.stitch)
                "evopress/workers.py",
                "evopress/zero_shot.py",
                "evopress/compressors",
            ],
            "report": ["evopress/errors.py", "evopress/io.py", "evopress/report.py"],
        }[stage]

    @staticmethod
    def persisted(stage: str, m: str | None = None) -> list[str]:
        """Outputs dvc.yaml marks `persist: true`: DVC leaves them in place when the stage re-runs, so a stage
        that rejects its params has cost nothing, and resumable work (databases, checkpoints) resumes.

        Baselines and the metrics are cheap to remake and stay unpersisted (DVC deletes, the stage rewrites)."""
        return {
            "prepare_model": [MODEL],
            "prepare_data": [TEXT],
            "build_db": [f"data/db/{m}"],
            "search": Layout.outs("search", m),
            "stitch": [f"models/{m}"],
        }.get(stage, [])

    @staticmethod
    def outs(stage: str, m: str | None = None) -> list[str]:
        """Everything the stage writes that dvc.yaml declares (outs, metrics and plots)."""
        return {
            "prepare_model": [MODEL],
            "prepare_data": [TEXT],
            "build_db": [f"data/db/{m}"],
            "search": [
                f"runs/search/{m}/{name}"
                for name in ("profile.json", "checkpoint.json", "search.json", "history.csv", "layers.csv")
            ],
            "baselines": [f"runs/baselines/{m}"],
            "stitch": [f"models/{m}"],
            "evaluate": [METRICS],
            "report": [RESULTS],
        }[stage]
