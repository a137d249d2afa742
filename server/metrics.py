"""Prometheus metrics of the API server, in a registry of its own (``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class Metrics:
    """Request counts, latencies, token counts and in-flight gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "steer_http_requests", "HTTP requests by route and status code.",
            ["route", "status"], registry=r)
        self.ttft = Histogram(
            "steer_time_to_first_token_seconds", "Arrival to first generated token.",
            ["steered"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "steer_inter_token_latency_seconds", "Time between consecutive generated tokens.",
            ["steered"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            "steer_e2e_request_latency_seconds", "Arrival to last generated token.",
            ["steered"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "steer_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter(
            "steer_generation_tokens", "Generated tokens.", registry=r)
        self.running = Gauge(
            "steer_requests_running", "Requests generating in the engine (holding a slot).",
            registry=r)
        self.waiting = Gauge(
            "steer_requests_waiting", "Requests waiting for a steering slot.", registry=r)
        # Read at scrape time from the live slot gate (bind); both 0 with --no-steering.
        self.slots_busy = Gauge(
            "steer_steering_slots_busy", "Steering slots held: distinct steering configurations "
            "admitted by the API server and not yet finished.", registry=r)
        self.slots_total = Gauge(
            "steer_steering_slots", "Steering slots of this server (--max-steering-slots).",
            registry=r)
        self.engine_unfinished = Gauge(
            "steer_engine_unfinished_requests", "Requests the engine has not finished (incl. n>1 children).",
            registry=r)
        self.steering_rejected = Counter(
            "steer_steering_rejected", "Steered requests refused with 429 before they started, by "
            "reason: queue_full, timeout (slots), readout_budget.", ["reason"], registry=r)
        self.readout_bytes = Gauge(
            "steer_readout_bytes_in_flight", "Activation-readout bytes reserved by requests in "
            "flight (return_activations, inspect).", registry=r)
        # Keys and policies (server/auth.py): bounded labels, never a key's name.
        self.connections_closed = Counter(
            "steer_http_connections_closed", "Connections a limit closed (server/connections.py), "
            "by reason: header_timeout, body_timeout, max_connections.", ["reason"], registry=r)
        self.policy_denials = Counter(
            "steer_policy_denials", "Requests refused by a key's role or policy, by reason.",
            ["reason"], registry=r)
        self.rate_limited = Counter(
            "steer_rate_limited", "Requests refused by a key's rate limit (requests or tokens).",
            ["kind"], registry=r)
        # Monitors (steering.monitors): the feature label is a pack feature's name, or "other" for
        # SAE latents ("pack/L12:123"), so the label set stays that of the loaded packs' features.
        self.monitor_triggers = Counter(
            "steer_monitor_triggers", "Monitors that fired, by feature and action (flag, stop).",
            ["feature", "action"], registry=r)
        # The feature workshop (server/workshop/): finished jobs by status, and their durations.
        self.workshop_jobs = Counter(
            "steer_workshop_jobs", "Feature-workshop jobs finished, by status (done, failed, "
            "cancelled).", ["status"], registry=r)
        self.workshop_seconds = Histogram(
            "steer_workshop_job_duration_seconds", "Feature-workshop jobs, start to finish.",
            ["status"], buckets=(10, 30, 60, 120, 300, 600, 1200, 2400), registry=r)
        self.auth_failures = Counter(
            "steer_auth_failures", "Requests without a valid API key, by error code.",
            ["code"], registry=r)


    def connections_closed_by(self, reason: str) -> None:
        """Count one connection a limit closed (server/connections.py calls it)."""
        self.connections_closed.labels(reason).inc()

    def monitor_triggered(self, feature: str, action: str) -> None:
        """Count one monitor that fired (bounded labels: see ``monitor_triggers``)."""
        self.monitor_triggers.labels(feature if ":" not in feature else "other", action).inc()

    def bind(self, waiting: Callable[[], float], engine_unfinished: Callable[[], float],
             slots_busy: Callable[[], float] | None = None,
             slots_total: Callable[[], float] | None = None) -> None:
        """Read the waiting, engine and slot gauges from live objects at scrape time (a slot
        gauge not given stays 0)."""
        self.waiting.set_function(waiting)
        self.engine_unfinished.set_function(engine_unfinished)
        if slots_busy is not None:
            self.slots_busy.set_function(slots_busy)
        if slots_total is not None:
            self.slots_total.set_function(slots_total)

    def exposition(self) -> bytes:
        """Our metrics followed by vLLM's own (registered in the default registry)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)
