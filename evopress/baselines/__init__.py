"""Baselines: each method's module exposes `BASELINES: dict[name, callable]` returning a Profile."""
