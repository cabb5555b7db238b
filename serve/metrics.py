"""Serving metrics, exported through Ray's Prometheus endpoint (``ray.serve.metrics``).

Ray's exporter puts every application metric in its ``ray`` namespace (hard-coded in Ray), so a
metric registered here as ``icmf_x`` is scraped as ``ray_icmf_x`` (counters also get ``_total``);
README.md lists the scraped names and a test checks they match :data:`TAG_KEYS`.

Every label has a fixed, small set of values: nothing a client chooses (adapter ids, specs) ever
becomes a label value, so the number of series does not grow with traffic.
"""

from __future__ import annotations

LOAD_BUCKETS_S = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
ADAPTER_KINDS = ("base", "stored", "fusion")

# Metric name -> its label keys (the values of each are listed where it is recorded).
TAG_KEYS: dict[str, tuple[str, ...]] = {
    "icmf_adapter_cache_events": ("event",),  # hit miss coalesced negative_hit load load_failure eviction
    "icmf_adapter_load_seconds": ("kind",),  # stored fusion
    "icmf_adapter_in_flight": ("kind",),  # ADAPTER_KINDS
    "icmf_batch_size": (),
    "icmf_icm_inputs_cache_events": ("event",),  # hit miss
    "icmf_requests": ("route", "status"),  # the route template; any HTTP status
}


def metric_names() -> list[str]:
    return list(TAG_KEYS)


def scraped_names() -> list[str]:
    """The names Prometheus sees (Ray's namespace; ``_total`` on counters)."""
    counters = {"icmf_adapter_cache_events", "icmf_icm_inputs_cache_events", "icmf_requests"}
    return [f"ray_{name}_total" if name in counters else f"ray_{name}" for name in TAG_KEYS]


class ServeMetrics:
    """Thin wrapper so the deployment code reads as events, not metric plumbing."""

    def __init__(self):
        from ray.serve import metrics

        self._events = metrics.Counter(
            "icmf_adapter_cache_events",
            description="adapter cache events",
            tag_keys=TAG_KEYS["icmf_adapter_cache_events"],
        )
        self._load = metrics.Histogram(
            "icmf_adapter_load_seconds",
            description="time to load a stored adapter or fuse a spec",
            boundaries=LOAD_BUCKETS_S,
            tag_keys=TAG_KEYS["icmf_adapter_load_seconds"],
        )
        self._in_flight = metrics.Gauge(
            "icmf_adapter_in_flight",
            description="requests in flight on this replica by adapter kind",
            tag_keys=TAG_KEYS["icmf_adapter_in_flight"],
        )
        self._batch = metrics.Histogram(
            "icmf_batch_size", description="requests per forward batch", boundaries=BATCH_BUCKETS
        )
        self._icm = metrics.Counter(
            "icmf_icm_inputs_cache_events",
            description="icm per-input cache hits and misses",
            tag_keys=TAG_KEYS["icmf_icm_inputs_cache_events"],
        )
        self._in_flight_counts = dict.fromkeys(ADAPTER_KINDS, 0)
        self._icm_seen = {"hit": 0, "miss": 0}

    def cache_event(self, event: str, _adapter_id: str, _seconds: float | None) -> None:
        self._events.inc(tags={"event": event})

    def load_seconds(self, kind: str, seconds: float) -> None:
        self._load.observe(seconds, tags={"kind": kind})

    def in_flight(self, kind: str, delta: int) -> None:
        """Count a request of ``kind`` (one of :data:`ADAPTER_KINDS`) in (+1) or out (-1)."""
        self._in_flight_counts[kind] = max(self._in_flight_counts[kind] + delta, 0)
        self._in_flight.set(self._in_flight_counts[kind], tags={"kind": kind})

    def batch_size(self, size: int) -> None:
        self._batch.observe(size)

    def icm_inputs(self, hits: int, misses: int) -> None:
        """Export the ``icm`` inputs cache's running totals (counted here as increments)."""
        for event, total in (("hit", hits), ("miss", misses)):
            new = total - self._icm_seen[event]
            if new > 0:
                self._icm.inc(new, tags={"event": event})
            self._icm_seen[event] = total


class RequestMetrics:
    """Router-side request counter by route and HTTP status (every status, 5xx included)."""

    def __init__(self):
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "icmf_requests",
            description="requests by route and HTTP status",
            tag_keys=TAG_KEYS["icmf_requests"],
        )

    def count(self, route: str, status: int) -> None:
        self._requests.inc(tags={"route": route, "status": str(status)})
