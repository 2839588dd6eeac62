"""Connecting to Ray: the one place that starts a local cluster or joins an existing one (searches and builds)."""

from __future__ import annotations


def start_ray(workers: int, threads: int, address: str = ""):
    """The `ray` module, connected: to the cluster at `address`, else to a local one sized for the workers."""
    try:
        import ray
    except ImportError as err:  # an optional dependency: say how to get it
        raise ImportError("compute.workers > 1 needs Ray: pip install 'evopress[scale-out]'") from err
    if not ray.is_initialized():
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(num_cpus=workers * threads, include_dashboard=False, log_to_driver=False)
    return ray
