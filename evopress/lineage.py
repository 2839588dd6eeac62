"""What a stage run read, from dvc.lock, and how the MLflow UI shows it: short tag names, lineage.json, descriptions.

Pure functions, no mlflow (evopress/tracking.py looks the runs up and records what this computes). A stage's inputs
are the outputs of upstream stages that its dvc.yaml deps name: a dep is one output (`runs/search/depth/profile.json`),
a folder holding several (evaluate reads `runs/search`), or a path inside one. Each such output carries the md5
dvc.lock holds for it and the stage that wrote it; tracking finds the run that wrote it through that run's
`dvc.out.<path>` tag. Paths are relative to the project root, the form dvc.lock uses, so a record reads the same on
every machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from evopress.layout import MODEL, TEXT, Layout

# The MLflow UI's links (a hash router): what a run description may point at.
RUN_LINK = "#/experiments/{exp}/runs/{run}"
MODEL_LINK = "#/experiments/{exp}/models/{model}"


# --- dvc.lock ----------------------------------------------------------------------------------------------------
def read_lock(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """stage -> {"deps": {path: md5}, "outs": {path: md5}} from dvc.lock (empty before the first `dvc repro`)."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    return {
        name: {kind: {e["path"]: e.get("md5", "") for e in s.get(kind, [])} for kind in ("deps", "outs")}
        for name, s in stages.items()
    }


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def consumed(lock: dict, deps: list[str]) -> list[dict]:
    """Every upstream output a stage reads through `deps`: {path, md5, stage, via}, sorted by path.

    Only outputs with an md5 count: an output DVC has not hashed yet cannot name the run that wrote it."""
    found = {}
    for dep in deps:
        for stage, entry in lock.items():
            for path, md5 in entry["outs"].items():
                if md5 and (_within(path, dep) or _within(dep, path)):
                    found[path] = {"path": path, "md5": md5, "stage": stage, "via": dep}
    return [found[p] for p in sorted(found)]


# --- short tag names ---------------------------------------------------------------------------------------------
def _kinds(method: str) -> dict[str, str]:
    """The outputs of a method that are worth a tag of their own, by kind (Layout's relative paths)."""
    rel = Layout(Path(""))
    return {
        rel.db(method).as_posix(): "db",
        (rel.search(method) / "profile.json").as_posix(): "profile",
        rel.baselines(method).as_posix(): "baselines",
        rel.stitched(method).as_posix(): "stitched",
    }


def from_key(stage: str) -> str:
    """The tag naming the run of `stage` whose outputs a run read: `from.search:depth` for search@depth (MLflow
    tag keys allow no `@`; `:` is allowed and reads the same)."""
    return "from." + stage.replace("@", ":")


def short_key(path: str, producer: str, method: str | None) -> str | None:
    """`in.profile` for the profile stitch@depth reads, `in.depth.profile` for the one evaluate reads; None for
    files that only lineage.json lists (checkpoints, histories). Keys stay short: the UI cuts long ones off."""
    m = producer.partition("@")[2]
    kind = _kinds(m).get(path) if m else None
    if kind is None:
        return None
    return f"in.{kind}" if m == method else f"in.{m}.{kind}"


def base_hashes(root: Path) -> dict[str, str]:
    """sha256 of the prepared model and token sets, and their sources, from the manifests their stages wrote."""
    out = {}
    model = Path(root) / MODEL / "evopress_model.json"
    if model.is_file():
        m = json.loads(model.read_text())
        out.update(model=m.get("sha256", ""), model_source=str(m.get("source", "")))
    data = Path(root) / TEXT / "data.json"
    if data.is_file():
        d = json.loads(data.read_text())
        out["data_source"] = str(d.get("source", ""))
        for name, sha in (d.get("sha256") or {}).items():
            out[name.split(".")[0]] = sha  # calibration, heldout
    return out


def input_tags(hashes: dict[str, str], inputs: list[dict], method: str | None) -> dict[str, str]:
    """The short `in.*` tags of a stage run: the base model and token sets it read (their sha256, from their
    manifests), then the upstream outputs worth a name (md5)."""
    read = {i["path"] for i in inputs}
    names = (["model"] if MODEL in read else []) + (["calibration", "heldout"] if TEXT in read else [])
    tags = {f"in.{k}": hashes[k] for k in names if hashes.get(k)}
    for i in inputs:
        key = short_key(i["path"], i["stage"], method)
        if key:
            tags[key] = i["md5"]
    return tags


def rel(path: Path | str, root: Path) -> str:
    """`path` relative to the project root when it lies inside it (else as given): no machine's absolute paths."""
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


# --- the stitched model's facts ----------------------------------------------------------------------------------
def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else ""


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def model_format(folder: Path) -> tuple[str, str]:
    """(storage format, who loads it) of a stitched folder, read from its config files (no weights loaded)."""
    folder = Path(folder)
    config = _read(folder / "config.json")
    packed = _read(folder / "quantization.json")
    quant = config.get("quantization_config") or {}
    arch = (config.get("architectures") or ["?"])[0]
    ours = "evopress.models.load_model"
    if packed.get("format"):
        return str(packed["format"]), ours
    if (quant.get("sparsity_config") or {}).get("format"):
        return f"compressed-tensors {quant['sparsity_config']['format']}", ours
    if quant.get("quant_method"):
        fmt = f"{quant['quant_method']} {quant.get('format', '')}".strip()
        return fmt, f"transformers AutoModelForCausalLM (compressed-tensors) or {ours}"
    if arch.startswith("DeciLM"):
        return "DeciLM block_configs (removed sublayers absent)", f"{ours} (vLLM DeciLM: trust_remote_code)"
    return f"safetensors, dense ({arch})", f"transformers AutoModelForCausalLM or {ours}"


def bytes_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- markdown the UI renders (run descriptions) ------------------------------------------------------------------
def run_link(exp: str, run_id: str, text: str) -> str:
    return f"[{text}]({RUN_LINK.format(exp=exp, run=run_id)})"


def model_link(exp: str, model_id: str, text: str) -> str:
    return f"[{text}]({MODEL_LINK.format(exp=exp, model=model_id)})"


def stage_description(record: dict, extra: list[str] = ()) -> str:
    """A stage run's description: where it belongs, its git commit, and each input with the run that wrote it."""
    exp, parent = record["experiment_id"], record["pipeline_run"]
    belongs = "standalone run" if parent == "standalone" else run_link(exp, parent, "pipeline run")
    git = record["git"]
    lines = [
        f"**{record['stage']}**: {belongs}, git `{git['commit'][:12]}`{' (uncommitted changes)' * (git['dirty'] == 'true')}",
        "",
    ]
    hashes = record["base"]
    if hashes.get("model"):
        lines.append(f"Base model sha256 `{hashes['model'][:16]}`, source `{hashes.get('model_source', '')}`")
    # The inputs an auditor follows; the rest (checkpoints, histories) only in lineage.json.
    shown = [
        i
        for i in record["inputs"]
        if i["path"] in (MODEL, TEXT) or short_key(i["path"], i["stage"], record["method"])
    ]
    if shown:
        lines += ["", "| input (dvc.lock) | md5 | written by |", "| --- | --- | --- |"]
        for i in shown:
            by = run_link(exp, i["run_id"], i["stage"]) if i.get("run_id") else f"{i['stage']} (no run found)"
            lines.append(f"| `{i['path']}` | `{i['md5'][:12]}` | {by} |")
    more = len(record["inputs"]) - len(shown)
    listed = f"every input ({more} more files), md5, run id" if more else "every input, md5, run id"
    lines += ["", *extra, "", f"Full lineage ({listed}): artifact `lineage.json`."]
    return "\n".join(lines).strip() + "\n"


def planned_description(exp: str, parent: str, stage: str) -> str:
    """A stage run the flow created ahead (status SCHEDULED) until its stage runs or the flow closes it."""
    return f"**{stage}**: scheduled in this {run_link(exp, parent, 'pipeline run')}; not started yet.\n"


def skipped_description(exp: str, parent: str, stage: str, outs: list[dict]) -> str:
    """A stage DVC found up to date in a pipeline run: nothing ran; its current outputs and the runs that wrote
    them (`outs`: {path, md5, run_id})."""
    lines = [
        f"**{stage}**: up to date, not run in this {run_link(exp, parent, 'pipeline run')}: DVC found its deps, "
        "params and outputs unchanged, so the outputs below (dvc.lock md5) are those of an earlier run.",
        "",
    ]
    if outs:
        lines += ["| output (dvc.lock) | md5 | written by |", "| --- | --- | --- |"]
        for o in outs:
            by = run_link(exp, o["run_id"], o["run_id"][:8]) if o.get("run_id") else "no tracked run found"
            lines.append(f"| `{o['path']}` | `{o['md5'][:12]}` | {by} |")
    else:
        lines.append("dvc.lock records no outputs of this stage.")
    return "\n".join(lines).strip() + "\n"


def not_run_description(exp: str, parent: str, stage: str, status: str) -> str:
    """A stage whose run the pipeline run closed unused: never reached (an earlier stage failed), or stopped
    before it opened its run."""
    where = run_link(exp, parent, "pipeline run")
    return (
        f"**{stage}**: not run: the {where} ended ({status}) before this stage ran (an earlier stage failed, "
        "or this one stopped before it opened its run: see the flow's log).\n"
    )


def pipeline_description(exp: str, rows: list[dict], table_md: str | None, git: dict) -> str:
    """The parent run's description: each stage in pipeline order (ran here, or up to date and whose run made
    its outputs), then the results table."""
    lines = [f"**EvoPress pipeline run** at git `{git['commit'][:12]}`", "", "| # | stage | run | status |"]
    lines.append("| --- | --- | --- | --- |")
    for n, r in enumerate(rows, start=1):
        link = run_link(exp, r["run_id"], r["run_id"][:8]) if r.get("run_id") else "-"
        lines.append(f"| {n} | {r['stage']} | {link} | {r['status']} |")
    if table_md:
        lines += [
            "",
            "**Held-out results** (target = the method's knob; KL to dense, lower is better)",
            "",
            table_md,
        ]
    return "\n".join(lines).strip() + "\n"


def summary_metrics(rows: dict[str, dict]) -> dict[str, float]:
    """The parent run's headline numbers from the evaluate stage's rows: per row held-out perplexity, KL, size."""
    out = {}
    for label, row in rows.items():
        for key, value in row.items():
            if key.endswith(("_perplexity", "_kl")) or key == "size":
                if isinstance(value, int | float) and not key.startswith("stitched"):
                    out[f"{label}.{key}"] = float(value)
    return out
