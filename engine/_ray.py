"""Ray start-up shared by the CLI and the demo (Ray appears only at the edges)."""

from __future__ import annotations

import logging
import os

# Whether workers' stdout/stderr are echoed on the driver. The CLI turns it off unless
# ``--verbose`` (the output is in Ray's session logs, linked from the command's log folder).
_worker_logs_to_driver = True


def set_worker_logs_to_driver(enabled: bool) -> None:
    """Echo Ray workers' output on the driver (Ray's default) or keep it in Ray's log files only.

    Takes effect for the next :func:`ensure_ray` that starts or connects to Ray.
    """
    global _worker_logs_to_driver
    _worker_logs_to_driver = enabled


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
    runtime_env = None
    if not _worker_logs_to_driver:
        # Library progress bars inside workers (``datasets``, ``transformers``) write nowhere useful.
        runtime_env = {"env_vars": {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}}
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        log_to_driver=_worker_logs_to_driver,
        runtime_env=runtime_env,
        **kwargs,
    )
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ray.data.DataContext.get_current().enable_progress_bars = False


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster; before Ray is started, this machine's (what an
    embedded Ray, e.g. one ``ray.data`` starts on first use, will have)."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def session_log_dir() -> str | None:
    """The log folder of the connected Ray session on this node, or ``None``."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.worker import global_worker

        return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # a private API: losing the link to Ray's logs must not fail a command
        return None
