"""Ray start-up shared by the CLI and the demo (Ray appears only at the edges)."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None, object_store_bytes: int | None = None) -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` (e.g. inside a Ray job), else start an
    embedded local Ray (``object_store_bytes``: its object store size; default Ray's, 30 % of
    memory). Quiets Ray Data's per-operator progress logs for CLI use."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"num_cpus": num_cpus, "include_dashboard": False}
    if object_store_bytes and not address:
        kwargs["object_store_memory"] = object_store_bytes
    ray.init(address=address, logging_level=logging.WARNING, **kwargs)
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False
