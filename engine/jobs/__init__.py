"""Running ``icmf`` commands on a Ray cluster through the Ray Jobs API (docs/design.md §7).

``entrypoint`` checks and quotes the command locally (before anything reaches the cluster),
``runtime_env`` builds the job's runtime environment, ``client`` talks to the cluster.
"""

from engine.jobs.client import JobsClient, JobsError, exit_status
from engine.jobs.entrypoint import build_entrypoint
from engine.jobs.runtime_env import build_runtime_env

__all__ = ["JobsClient", "JobsError", "build_entrypoint", "build_runtime_env", "exit_status"]
