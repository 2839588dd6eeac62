"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, beside perplexity.

The paper reports accuracy on arc_easy, arc_challenge, hellaswag, piqa and winogrande next to perplexity. We do not
score tasks ourselves: the live model (dense, or with a profile applied) is wrapped in lm-eval's `HFLM` and
`simple_evaluate` runs the tasks, so the figures are the ones users get from the harness.

Configure it in params.yaml (off while `tasks` is empty: the standard tasks download their data from a hub):

    evaluate:
      lm_eval:
        tasks: [arc_easy, piqa]     # lm-eval task names, or tasks defined in YAML files under include_path
        limit: 200                  # documents per task (null = all)
        num_fewshot: 0
        include_path: ""            # a folder of task YAMLs, e.g. one over a local JSONL file (no hub needed)

Each evaluated row gains `lm_eval.<task>.<metric>` (e.g. `lm_eval.piqa.acc`, `lm_eval.piqa.acc_norm`).
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from evopress.errors import UserError, require

# Metrics worth a column; lm-eval also reports stderr and per-filter variants, which rows do not need.
REPORTED = ("acc", "acc_norm", "exact_match", "f1", "mcc")


@dataclass
class LmEvalParams:
    tasks: list[str] = field(default_factory=list)  # empty: off
    limit: int | None = None  # documents per task; None = all
    num_fewshot: int = 0
    include_path: str = ""  # folder of extra task YAMLs ("" = lm-eval's own tasks only)
    batch_size: int = 8

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def validate(self) -> LmEvalParams:
        require(
            all(isinstance(t, str) and t for t in self.tasks),
            f"evaluate.lm_eval.tasks: {self.tasks!r}; expected task names like [arc_easy, piqa]",
        )
        require(
            self.limit is None or self.limit >= 1,
            f"evaluate.lm_eval.limit: {self.limit}; expected a number of documents >= 1, or null for all",
        )
        require(self.num_fewshot >= 0, f"evaluate.lm_eval.num_fewshot: {self.num_fewshot}; expected >= 0")
        require(self.batch_size >= 1, f"evaluate.lm_eval.batch_size: {self.batch_size}; expected >= 1")
        if self.include_path:
            require(
                Path(self.include_path).is_dir(),
                f"evaluate.lm_eval.include_path: no folder at {self.include_path!r}",
            )
        return self


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str, defaults: bool):
    """lm-eval's TaskManager; indexing its thousands of built-in task YAMLs takes tens of seconds, so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None, include_defaults=defaults)


def _task_manager(params: LmEvalParams):
    # Tasks that all live under include_path need no index of the built-in ones.
    manager = _indexed(params.include_path, False) if params.include_path else None
    if manager is None or any(t not in manager.all_tasks for t in params.tasks):
        manager = _indexed(params.include_path, True)
    unknown = [t for t in params.tasks if t not in manager.all_tasks]
    require(
        not unknown,
        f"evaluate.lm_eval.tasks: unknown task(s) {', '.join(unknown)}; lm-eval knows "
        f"{len(manager.all_tasks)} (list them with `lm-eval ls tasks`), plus YAMLs under include_path",
    )
    return manager


def check_tasks(params: LmEvalParams) -> None:
    """Fail before any forward pass when a task name is unknown (the harness would say so after the model)."""
    if params.enabled:
        _task_manager(params.validate())


def run_tasks(model, tokenizer, params: LmEvalParams) -> dict[str, float]:
    """{"lm_eval.<task>.<metric>": value} of `model` (a transformers causal LM, live) on the configured tasks."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    params.validate()
    manager = _task_manager(params)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size, device=device)
    logging.getLogger("lm-eval").setLevel(logging.WARNING)  # its per-task INFO lines would bury ours
    try:
        out = simple_evaluate(
            model=lm,
            tasks=list(params.tasks),
            num_fewshot=params.num_fewshot,
            limit=params.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,  # stderr by bootstrap costs minutes on a CPU; the table does not show it
        )
    except (FileNotFoundError, ConnectionError, OSError) as err:  # a hub task on a machine without the hub
        raise UserError(f"lm-eval could not load its task data ({type(err).__name__}: {err})") from err
    return flatten(out["results"])


def flatten(results: dict) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": s, ...}} -> {"lm_eval.task.acc": v, ...}."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric in REPORTED and isinstance(value, int | float):
                suffix = "" if filt in ("", "none") else "_" + re.sub(r"[^A-Za-z0-9]+", "_", filt)
                flat[f"lm_eval.{task}.{metric}{suffix}"] = float(value)
    return flat
