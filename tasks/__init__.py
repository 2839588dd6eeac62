"""Prefect tasks: one per DVC stage (`dvc repro --single-item <stage>`), plus MLflow parent-run bookkeeping."""
