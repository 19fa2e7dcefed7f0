"""The service's Prometheus metrics, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    """Counters, gauges and histograms of one service, exposed at `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("arccompress_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.in_flight = Gauge("arccompress_requests_in_flight", "API requests held now: compressing, waiting or "
                               "generating (at most --max-queued-requests)", registry=r)
        self.shed = Counter("arccompress_requests_shed", "API requests refused with 503 because the service held "
                            "--max-queued-requests already", registry=r)
        self.cancelled = Counter("arccompress_requests_cancelled", "API requests stopped before their end: their "
                                 "client left (disconnect), or they ran past --request-timeout (timeout)", ["reason"],
                                 registry=r)
        self.documents = Counter("arccompress_documents", "documents by where their context came from: compressed "
                                 "now, the compression cache, or the store", ["source"], registry=r)
        self.compress_batches = Histogram("arccompress_compress_batch_documents", "documents per encoder call "
                                          "(the micro-batcher gathers concurrent requests' texts)",
                                          buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.store_batches = Histogram("arccompress_store_batch_ids", "ids per store read (one get_many per batch)",
                                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.cache_hits = Counter("arccompress_compression_cache_hits", "texts found compressed in the cache", registry=r)
        self.cache_bytes = Gauge("arccompress_compression_cache_bytes", "bytes the compressed texts kept for reuse "
                                 "take (contexts and their text)", registry=r)
        self.cache_budget = Gauge("arccompress_compression_cache_budget_bytes", "the compression cache's budget "
                                  "(--cache-mib)", registry=r)
        self.cache_entries = Gauge("arccompress_compression_cache_entries", "compressed texts kept for reuse",
                                   registry=r)
        self.prompt_positions = Counter("arccompress_prompt_positions", "decoder positions of the prompts served",
                                        registry=r)
        self.positions_saved = Counter("arccompress_positions_saved", "decoder positions the documents saved against "
                                       "their full text", registry=r)
        self.generated_tokens = Counter("arccompress_generated_tokens", "tokens the engine generated (counted as it "
                                        "makes them, whether or not a client still reads them)", registry=r)
        self.prefix_cached_tokens = Counter("arccompress_prefix_cache_hit_tokens", "prompt positions read from the "
                                            "engine's prefix cache (vLLM)", registry=r)
        self.prefix_prompt_tokens = Counter("arccompress_prefix_cache_query_tokens", "prompt positions looked up in "
                                            "the engine's prefix cache (vLLM)", registry=r)
        self.queue_depth = Gauge("arccompress_queue_depth", "work waiting: documents not yet in an encoder batch, "
                                 "sequences waiting for or in generation", ["stage"], registry=r)
        self.ttft = Histogram("arccompress_time_to_first_token_seconds", "from the request's arrival to its first "
                              "generated token", buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("arccompress_request_latency_seconds", "from arrival to the last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)

        # upstreams (arccompress serve --upstream): where requests went and why, what each holds, whether it is in
        self.upstream_requests = Counter("arccompress_upstream_requests", "requests sent to each upstream, by how it "
                                         "was chosen: affinity (the key's first), spill (the first was over its "
                                         "share of requests in flight), failover (the ones before were out of "
                                         "rotation or failed the request), round-robin", ["upstream", "decision"],
                                         registry=r)
        self.upstream_failures = Counter("arccompress_upstream_failures", "requests or probes an upstream failed "
                                         "(each takes it out of rotation until it passes its checks again)",
                                         ["upstream"], registry=r)
        self.upstream_in_flight = Gauge("arccompress_upstream_in_flight", "requests in flight on each upstream",
                                        ["upstream"], registry=r)
        self.upstream_up = Gauge("arccompress_upstream_up", "1 while the upstream is in rotation, 0 while it is out",
                                 ["upstream"], registry=r)

    def routed(self, upstream: str, decision: str) -> None:
        self.upstream_requests.labels(upstream, decision).inc()

    def upstream_failed(self, upstream: str) -> None:
        self.upstream_failures.labels(upstream).inc()

    def watch_upstreams(self, upstreams: Sequence[Any]) -> None:
        """Gauges read from the upstreams (`.name`, `.in_flight`, `.up`) when /metrics is scraped."""
        for u in upstreams:
            self.upstream_in_flight.labels(u.name).set_function(lambda u=u: u.in_flight)
            self.upstream_up.labels(u.name).set_function(lambda u=u: float(u.up))

    def prefix_cache(self, hits: int, queried: int) -> None:
        """A request's prompt positions read from the engine's prefix cache, of those looked up."""
        self.prefix_cached_tokens.inc(hits)
        self.prefix_prompt_tokens.inc(queried)
