"""Progress of a long loop: a bar on a terminal, else one plain line per step (DVC and Prefect stream those)."""

import sys
import time


def progress(iterable, total: int, desc: str):
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc)
    return _lines(iterable, total, desc)


def _lines(iterable, total: int, desc: str):
    start = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        print(f"{desc}: {i}/{total} ({time.perf_counter() - start:.0f} s)", flush=True)
