"""Prefect flows: run the DVC stage graph in order, with retries, progress, schedules."""
