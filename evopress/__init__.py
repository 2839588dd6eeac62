"""EvoPress: non-uniform LLM compression by evolutionary search."""

__version__ = "0.1.0"


def load_model(path, dtype: str = "float32"):
    """A stitched model folder (any method, any format evopress writes) as a transformers model, in eval mode.

    Depth folders with removed sublayers load without the removed modules; quantized and sparse folders are
    decompressed to plain weights. `dtype`: float32 | bfloat16 | float16 | auto. The tokenizer:
    `transformers.AutoTokenizer.from_pretrained(path)`."""
    from evopress.models import load_model as load_with_tokenizer

    return load_with_tokenizer(str(path), dtype=dtype)[0]
