"""EvoPress: non-uniform LLM compression by evolutionary search."""

__version__ = "0.1.0"
