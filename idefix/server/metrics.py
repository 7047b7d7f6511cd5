"""Prometheus metrics of one server: its own `CollectorRegistry` (no process-wide state), served at /metrics.

Counters and histograms are fed by the request handlers; the engine gauges (running / waiting sequences, KV slots
in use, image cache hit rate) are read from the engine when scraped. Reading a list's or dict's length from another
thread is safe in CPython; the values are a snapshot between two engine steps at worst one step old.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from idefix.engine.engine import Engine
from idefix.request import Usage

_TIME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "idefix_http_requests", "HTTP answers by route and status", ["route", "status"], registry=registry
        )
        self.ttft = Histogram(
            "idefix_time_to_first_token_seconds", "Arrival to first token", buckets=_TIME_BUCKETS, registry=registry
        )
        self.latency = Histogram(
            "idefix_request_latency_seconds", "Arrival to last token", buckets=_TIME_BUCKETS, registry=registry
        )
        self.prompt_tokens = Counter("idefix_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter("idefix_cached_prompt_tokens", "Prompt tokens from cache", registry=registry)
        self.completion_tokens = Counter("idefix_completion_tokens", "Generated tokens", registry=registry)
        self.aborted = Counter("idefix_requests_aborted", "Requests whose client went away", registry=registry)
        gauges = {
            "idefix_num_requests_running": ("Sequences holding a KV slot", lambda: len(engine.scheduler.running)),
            "idefix_num_requests_waiting": ("Sequences queued for a slot", lambda: len(engine.scheduler.waiting)),
            "idefix_num_requests_unfinished": ("Requests not finished yet", lambda: len(engine.requests)),
            "idefix_kv_slots_in_use": ("KV cache slots used by running sequences", lambda: engine.pool.num_running),
            "idefix_kv_slots_total": ("KV cache slots", lambda: engine.pool.num_slots),
            "idefix_image_cache_hit_rate": ("Encoded-image cache hits / lookups", lambda: _hit_rate(engine)),
            "idefix_image_cache_hits": ("Encoded-image cache hits", lambda: engine.image_cache.hits),
            "idefix_image_cache_misses": ("Encoded-image cache misses", lambda: engine.image_cache.misses),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(read)

    def finished(self, usage: Usage, latency: float) -> None:
        """Record a request that produced its last token."""
        self.ttft.observe(usage.time_to_first_token)
        self.latency.observe(latency)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_prompt_tokens)
        self.completion_tokens.inc(usage.completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _hit_rate(engine: Engine) -> float:
    lookups = engine.image_cache.hits + engine.image_cache.misses
    return engine.image_cache.hits / lookups if lookups else 0.0
