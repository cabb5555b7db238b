"""Serving metrics, exported through Ray's Prometheus endpoint (``ray.serve.metrics``).

Names: ``icmf_adapter_cache_events_total{event}`` (hit, miss, coalesced, negative_hit, load,
load_failure, eviction), ``icmf_adapter_load_seconds{kind}`` (stored load or on-the-fly fusion),
``icmf_adapter_in_flight{adapter}``, ``icmf_batch_size`` and ``icmf_requests_total{status}``.
"""

from __future__ import annotations

LOAD_BUCKETS_S = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


class ServeMetrics:
    """Thin wrapper so the deployment code reads as events, not metric plumbing."""

    def __init__(self):
        from ray.serve import metrics

        self._events = metrics.Counter(
            "icmf_adapter_cache_events", description="adapter cache events", tag_keys=("event",)
        )
        self._load = metrics.Histogram(
            "icmf_adapter_load_seconds",
            description="time to load a stored adapter or fuse a spec",
            boundaries=LOAD_BUCKETS_S,
            tag_keys=("kind",),
        )
        self._in_flight = metrics.Gauge(
            "icmf_adapter_in_flight", description="requests in flight per adapter", tag_keys=("adapter",)
        )
        self._batch = metrics.Histogram(
            "icmf_batch_size", description="requests per forward batch", boundaries=BATCH_BUCKETS
        )

    def cache_event(self, event: str, _adapter_id: str, _seconds: float | None) -> None:
        # Per-adapter tags would give one time series per adapter id: unbounded cardinality.
        self._events.inc(tags={"event": event})

    def load_seconds(self, kind: str, seconds: float) -> None:
        self._load.observe(seconds, tags={"kind": kind})

    def in_flight(self, adapter_id: str, count: int) -> None:
        self._in_flight.set(max(count, 0), tags={"adapter": adapter_id})

    def batch_size(self, size: int) -> None:
        self._batch.observe(size)


class RequestMetrics:
    """Router-side request counter by HTTP status."""

    def __init__(self):
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "icmf_requests", description="completion requests by HTTP status", tag_keys=("status",)
        )

    def count(self, status: int) -> None:
        self._requests.inc(tags={"status": str(status)})
