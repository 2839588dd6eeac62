"""A progress bar on a terminal, nothing otherwise (DVC and Prefect logs are not terminals)."""

import sys


def progress(iterable, total: int, desc: str):
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc)
