"""What an experiment records: one exposure per response that reached the engine (with its
outcome: ok, failed, aborted or excluded), and its Prometheus counters.

The counters are labelled by experiment and variant. Labels are bounded: the first
:data:`MAX_LABELLED_EXPERIMENTS` experiments that record get their own, the rest count under
``_other``; deleting an experiment frees its labels. An exposure that could not be stored is
never dropped silently: ``steer_experiment_exposures_lost_total{reason}`` counts it, ``reason``
one of :data:`LOST_REASONS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from server.experiments.routing import Routing
from server.experiments.store import OUTCOMES, Exposure

if TYPE_CHECKING:
    from server.runner import Job

MAX_LABELLED_EXPERIMENTS = 32
OTHER = "_other"
LOST_REASONS = ("queue_full", "store_error", "experiment_deleted", "shutdown")
"""Why an exposure was not stored: the writer's queue was full; the store failed on every try;
its experiment was deleted (or replaced by a new one of the same name) before it was written;
the server stopped before it was written."""


def exposure(routing: Routing, job: Job, prompt_tokens: int, outcome: str = "ok") -> Exposure:
    """The exposure of the response ``job`` produced, as routed by ``routing``; now ended."""
    now_wall, now = time.time(), time.monotonic()
    latency = now - job.arrival
    return Exposure(
        response_id=job.request_id, experiment=routing.experiment or "", variant=routing.variant or "",
        unit_hash=routing.unit_hash or "", unit_kind=routing.unit_kind or "random",
        started=now_wall - latency, finished=now_wall, prompt_tokens=prompt_tokens,
        generated_tokens=int(getattr(job, "generated_tokens", 0)), latency_s=latency,
        finish_reason=getattr(job, "finish_reason", None), experiment_id=routing.experiment_id,
        outcome=outcome)


class ExperimentMetrics:
    """The experiment counters of one server. ``exists(name)``: is ``name`` a live experiment
    (only those may take a label)."""

    def __init__(self, registry: CollectorRegistry, exists: Callable[[str], bool]) -> None:
        self._exists = exists
        self._labelled: set[str] = set()
        self.requests = Counter("steer_experiment_requests", "Recorded experiment exposures.",
                                ["experiment", "variant"], registry=registry)
        self.tokens = Counter("steer_experiment_generated_tokens",
                              "Generated tokens of recorded experiment exposures.",
                              ["experiment", "variant"], registry=registry)
        self.feedback = Counter("steer_experiment_feedback", "Feedback received per variant.",
                                ["experiment", "variant"], registry=registry)
        self.unsuccessful = Counter("steer_experiment_unsuccessful_requests",
                                    "Experiment exposures that failed, were aborted or were excluded"
                                    " (not counted in steer_experiment_requests).",
                                    ["experiment", "variant", "outcome"], registry=registry)
        self.lost = Counter("steer_experiment_exposures_lost",
                            "Experiment exposures that were not stored, by reason.",
                            ["reason"], registry=registry)
        for reason in LOST_REASONS:
            self.lost.labels(reason)
        self.store_errors = Counter("steer_experiment_store_errors",
                                    "Failed experiment-store operations (requests were still served).",
                                    ["op"], registry=registry)

    def labels(self, experiment: str, variant: str) -> tuple[str, str]:
        """The label values of ``experiment``/``variant`` (``_other`` once the cap is reached)."""
        if experiment in self._labelled:
            return experiment, variant
        if self._exists(experiment) and len(self._labelled) < MAX_LABELLED_EXPERIMENTS:
            self._labelled.add(experiment)
            return experiment, variant
        return OTHER, OTHER

    def exposed(self, e: Exposure) -> None:
        labels = self.labels(e.experiment, e.variant)
        if e.outcome != "ok":
            self.unsuccessful.labels(*labels, e.outcome).inc()
            return
        self.requests.labels(*labels).inc()
        self.tokens.labels(*labels).inc(e.generated_tokens)

    def exposure_lost(self, reason: str, n: int = 1) -> None:
        self.lost.labels(reason).inc(n)

    def feedback_received(self, experiment: str, variant: str) -> None:
        self.feedback.labels(*self.labels(experiment, variant)).inc()

    def store_failed(self, op: str) -> None:
        self.store_errors.labels(op).inc()

    def forget(self, experiment: str, variants: Iterable[str]) -> None:
        """Drop the series of a deleted experiment and free its label."""
        if experiment not in self._labelled:
            return
        self._labelled.discard(experiment)
        names = list(variants)
        series = [(c, (experiment, v)) for c in (self.requests, self.tokens, self.feedback) for v in names]
        series += [(self.unsuccessful, (experiment, v, o)) for v in names for o in OUTCOMES[1:]]
        for counter, labels in series:
            try:
                counter.remove(*labels)
            except KeyError:
                pass
