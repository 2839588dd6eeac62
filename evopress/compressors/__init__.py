"""Compression methods: each module exposes `make(adapter, target, *, db, options) -> Compressor`."""
