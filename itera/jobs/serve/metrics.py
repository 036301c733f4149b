"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own so that two servers
in one process (tests) never share counters.

- ``itera_http_requests_total{endpoint, status}``: every answered request;
- ``itera_stream_errors_total``: streams that failed after their 200 status was sent;
- ``itera_request_duration_seconds{endpoint}``: from the request to the last byte (a stream's end);
- ``itera_time_to_first_token_seconds{endpoint}``: from the request to the first generated token;
- ``itera_generated_tokens_total``, ``itera_prompt_tokens_total``;
- ``itera_queue_depth`` (waiting for a slot), ``itera_requests_in_flight`` (generating);
- ``itera_model_info{model, version, sha256}`` (1 for the model now served),
  ``itera_model_swaps_total{result}``; ``itera_feedback_events_total{type}``.
"""

from __future__ import annotations

# Latency buckets from 5 ms to 2 minutes: small models answer in milliseconds, long generations in minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/feedback", "/v1/models", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    """The path when it is one of the server's, else ``other`` (a label per unknown path would let
    any client grow the metrics without bound)."""
    return path if path in ENDPOINTS else "other"


class Metrics:
    def __init__(self, admission=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("itera_http_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("itera_request_duration_seconds", "Time from request to the last byte of the answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("itera_time_to_first_token_seconds", "Time from request to the first generated token",
                              ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.generated = Counter("itera_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("itera_prompt_tokens", "Prompt tokens processed", registry=r)
        self.queue_depth = Gauge("itera_queue_depth", "Requests waiting for a generation slot", registry=r)
        self.in_flight = Gauge("itera_requests_in_flight", "Requests generating now", registry=r)
        self.model_info = Gauge("itera_model_info", "The model served now (value 1)", ["model", "version", "sha256"],
                                registry=r)
        self.swaps = Counter("itera_model_swaps", "Registry versions swapped in or refused", ["result"], registry=r)
        self.feedback = Counter("itera_feedback_events", "Feedback events stored", ["type"], registry=r)
        self.stream_errors = Counter("itera_stream_errors", "Streams that failed after their 200 was sent",
                                     registry=r)
        if admission is not None:
            self.queue_depth.set_function(lambda: admission.queued)
            self.in_flight.set_function(lambda: admission.running)

    def serving(self, name: str, version, sha256: str) -> None:
        self.model_info.clear()
        self.model_info.labels(name, "" if version is None else str(version), sha256).set(1)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
