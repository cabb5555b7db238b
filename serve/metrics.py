"""Serving metrics, in Prometheus text format at the application's own ``GET /metrics``.

Why not Ray's exporter: it puts every application metric in a hard-coded ``ray`` namespace, so a
``ray.serve.metrics`` counter registered as ``icmf_x`` is scraped as ``ray_icmf_x_total``, with no
option to turn that off. The application therefore keeps its metrics in ``prometheus_client``
registries and serves them itself, under the names README.md documents (:func:`scraped_names`).

How several replicas add up (one scrape must see the whole application, and Serve gives no
per-replica address to scrape):

- the router (the ingress deployment, deployed as exactly one replica) counts every HTTP response
  itself: ``icmf_requests_total{route, status}``;
- each model replica records its events in its own registry (:class:`ReplicaMetrics`) and every
  :data:`PUSH_PERIOD_S` sends the router what changed since its last acknowledged push
  (:meth:`ReplicaMetrics.changes`): counter and histogram increments, current gauge values;
- the router (:class:`MetricsAggregate`) adds the increments to application totals, which
  therefore never go down while it lives, keep what a replica counted before it died, and start
  from zero when the router itself restarts (a counter reset, which Prometheus's ``rate`` handles);
  gauges are summed over the replicas heard from within :data:`GAUGE_STALE_S`, so a dead replica's
  in-flight requests stop counting. A push that fails is not acknowledged and its increments go
  with the next one.

Every label has a fixed, small set of values: nothing a client chooses (adapter ids, specs, paths)
ever becomes a label value, so the number of series does not grow with traffic.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

LOAD_BUCKETS_S = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
ADAPTER_KINDS = ("base", "stored", "fusion")
PUSH_PERIOD_S = 2.0
GAUGE_STALE_S = 5 * PUSH_PERIOD_S
# The deployment that aggregates and serves the metrics (the ingress; see serve/app.py).
AGGREGATOR_DEPLOYMENT = "Router"
UNMATCHED_ROUTE = "unmatched"  # the route label of a request for a path the app does not serve

# Metric name -> its label keys (the values of each are listed where it is recorded).
TAG_KEYS: dict[str, tuple[str, ...]] = {
    "icmf_adapter_cache_events": ("event",),  # hit miss coalesced negative_hit load load_failure eviction
    "icmf_adapter_load_seconds": ("kind",),  # stored fusion
    "icmf_adapter_in_flight": ("kind",),  # ADAPTER_KINDS
    "icmf_batch_size": (),
    "icmf_icm_inputs_cache_events": ("event",),  # hit miss
    "icmf_requests": ("route", "status"),  # the route template or UNMATCHED_ROUTE; any HTTP status
}
COUNTERS = ("icmf_adapter_cache_events", "icmf_icm_inputs_cache_events", "icmf_requests")


def metric_names() -> list[str]:
    return list(TAG_KEYS)


def scraped_names() -> list[str]:
    """The names Prometheus sees at ``/metrics`` (counters get ``_total``)."""
    return [f"{name}_total" if name in COUNTERS else name for name in TAG_KEYS]


class ReplicaMetrics:
    """A model replica's metrics: recorded as events, pushed to the router as changes."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self._events = Counter(
            "icmf_adapter_cache_events",
            "adapter cache events",
            TAG_KEYS["icmf_adapter_cache_events"],
            registry=self.registry,
        )
        self._load = Histogram(
            "icmf_adapter_load_seconds",
            "time to load a stored adapter or fuse a spec",
            TAG_KEYS["icmf_adapter_load_seconds"],
            buckets=LOAD_BUCKETS_S,
            registry=self.registry,
        )
        self._in_flight = Gauge(
            "icmf_adapter_in_flight",
            "requests in flight on the model replicas by adapter kind",
            TAG_KEYS["icmf_adapter_in_flight"],
            registry=self.registry,
        )
        self._batch = Histogram(
            "icmf_batch_size", "requests per forward batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self._icm = Counter(
            "icmf_icm_inputs_cache_events",
            "icm per-input cache hits and misses",
            TAG_KEYS["icmf_icm_inputs_cache_events"],
            registry=self.registry,
        )
        for kind in ADAPTER_KINDS:  # every kind shows, 0 until used
            self._in_flight.labels(kind).set(0)
        self._icm_seen = {"hit": 0, "miss": 0}
        self._acknowledged: dict[tuple[str, tuple], float] = {}  # cumulative values the router has

    def cache_event(self, event: str, _adapter_id: str, _seconds: float | None) -> None:
        self._events.labels(event).inc()

    def load_seconds(self, kind: str, seconds: float) -> None:
        self._load.labels(kind).observe(seconds)

    def in_flight(self, kind: str, delta: int) -> None:
        """Count a request of ``kind`` (one of :data:`ADAPTER_KINDS`) in (+1) or out (-1)."""
        self._in_flight.labels(kind).inc(delta)

    def batch_size(self, size: int) -> None:
        self._batch.observe(size)

    def icm_inputs(self, hits: int, misses: int) -> None:
        """Export the ``icm`` inputs cache's running totals (counted here as increments)."""
        for event, total in (("hit", hits), ("miss", misses)):
            new = total - self._icm_seen[event]
            if new > 0:
                self._icm.labels(event).inc(new)
            self._icm_seen[event] = total

    def changes(self) -> list[dict[str, Any]]:
        """What changed since the last :meth:`acknowledge`: per metric family its name, type,
        help and samples ``(sample name, labels, value)`` (increments for counters and
        histograms, current values for gauges). Plain data, sent to the router."""
        families = []
        for family in self.registry.collect():
            samples = []
            for sample in family.samples:
                if sample.name.endswith("_created"):  # a per-process timestamp, meaningless summed
                    continue
                value = sample.value
                if family.type != "gauge":
                    value -= self._acknowledged.get(_key(sample.name, sample.labels), 0.0)
                samples.append((sample.name, dict(sample.labels), value))
            families.append(
                {
                    "name": family.name,
                    "type": family.type,
                    "documentation": family.documentation,
                    "samples": samples,
                }
            )
        return families

    def acknowledge(self, families: list[dict[str, Any]]) -> None:
        """The router has added ``families`` (from :meth:`changes`): do not send them again."""
        for family in families:
            if family["type"] == "gauge":
                continue
            for name, labels, value in family["samples"]:
                key = _key(name, labels)
                self._acknowledged[key] = self._acknowledged.get(key, 0.0) + value


def _key(name: str, labels: dict[str, str]) -> tuple[str, tuple]:
    return name, tuple(sorted(labels.items()))


def _sample_order(key: tuple[str, tuple]) -> tuple:
    """Histogram samples grouped by series, buckets ascending, then ``_count`` and ``_sum``."""
    name, labels = key
    rest = tuple(item for item in labels if item[0] != "le")
    le = dict(labels).get("le")
    suffix = 1 if name.endswith("_count") else 2 if name.endswith("_sum") else 0
    return rest, suffix, float(le) if le is not None else 0.0, name


class MetricsAggregate:
    """The router's view of every model replica's metrics (a ``prometheus_client`` collector)."""

    def __init__(self, stale_s: float = GAUGE_STALE_S, clock=time.monotonic):
        self._stale_s = stale_s
        self._clock = clock
        self._families: dict[str, tuple[str, str]] = {}  # name -> (type, documentation)
        self._totals: dict[str, dict[tuple[str, tuple], float]] = {}  # counters and histograms
        self._gauges: dict[str, tuple[float, dict[str, dict[tuple[str, tuple], float]]]] = {}

    def add(self, replica: str, families: list[dict[str, Any]]) -> None:
        """Fold one replica's :meth:`ReplicaMetrics.changes` in."""
        gauges: dict[str, dict[tuple[str, tuple], float]] = {}
        for family in families:
            name = family["name"]
            self._families.setdefault(name, (family["type"], family["documentation"]))
            if family["type"] == "gauge":
                gauges[name] = {_key(s, labels): value for s, labels, value in family["samples"]}
                continue
            totals = self._totals.setdefault(name, {})
            for sample, labels, value in family["samples"]:
                key = _key(sample, labels)
                totals[key] = totals.get(key, 0.0) + value
        self._gauges[replica] = (self._clock(), gauges)

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        for replica in [r for r, (seen, _) in self._gauges.items() if now - seen > self._stale_s]:
            del self._gauges[replica]  # gone (or stuck): its gauges no longer describe anything
        for name, (kind, documentation) in self._families.items():
            values = dict(self._totals.get(name, {}))
            if kind == "gauge":
                for _, gauges in self._gauges.values():
                    for key, value in gauges.get(name, {}).items():
                        values[key] = values.get(key, 0.0) + value
            metric = Metric(name, documentation, kind)
            for (sample, labels), value in sorted(values.items(), key=lambda kv: _sample_order(kv[0])):
                metric.add_sample(sample, dict(labels), value)
            yield metric


class RequestMetrics:
    """The router's registry: its own request counter plus the model replicas' aggregate."""

    def __init__(self, replicas: MetricsAggregate | None = None):
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "icmf_requests",
            "HTTP responses by route and status",
            TAG_KEYS["icmf_requests"],
            registry=self.registry,
        )
        self.replicas = replicas or MetricsAggregate()
        self.registry.register(self.replicas)

    def count(self, route: str, status: int) -> None:
        self._requests.labels(route, str(status)).inc()

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


_process_metrics: RequestMetrics | None = None


def router_metrics() -> RequestMetrics:
    """This process's router metrics (one per process, like Prometheus's default registry).

    A function of an importable module on purpose: Serve pickles the router class by value, and
    a module-level object it named directly would arrive in the replica as a private copy."""
    global _process_metrics
    if _process_metrics is None:
        _process_metrics = RequestMetrics()
    return _process_metrics
