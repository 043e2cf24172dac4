"""Prometheus metrics of the server, in the text format on ``GET /metrics`` (names listed in docs/serving.md).

    metrics = ServingMetrics(manager)
    metrics.observe_request("digits", 1, "success", total_s=0.004, trace=trace)
    metrics.observe_batch("digits", 1, 16)
    body = metrics.render()          # bytes in the Prometheus text exposition format

Each server owns its registry (two servers in one process, e.g. in tests, do not collide). Counters and
histograms are updated as requests finish; gauges (queue size, busy instances, readiness) and the
Triton-compatible ``nv_inference_*`` families are read from the manager when scraped, so they cost nothing
per request. ``process_*`` (resident memory, CPU seconds, open files) come from prometheus-client's process
collector.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deepseek.serve.batching import RequestTrace

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GENERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# outcome label values of ds_inference_requests_total
OUTCOMES = ("success", "invalid", "rejected", "timeout", "cancelled", "unavailable", "error")
disable_created_metrics()  # the *_created series double every family and no dashboard reads them

# Triton's nv_inference_request_failure reasons for our outcomes
_TRITON_REASON = {"rejected": "REJECTED", "cancelled": "CANCELED", "error": "BACKEND", "timeout": "OTHER",
                  "invalid": "OTHER", "unavailable": "OTHER"}


class _ManagerCollector(Collector):
    """Scrape-time view of the manager: gauges and the Triton-compatible counter families."""

    def __init__(self, manager: Any, failures: dict):
        self.manager = manager
        self.failures = failures  # (model, version, reason) -> count

    def collect(self) -> Iterable:
        labels = ["model", "version"]
        queue = GaugeMetricFamily("ds_inference_queue_size", "Requests waiting in the model's queue.", labels=labels)
        busy = GaugeMetricFamily("ds_instances_busy", "Model instances executing a batch now.", labels=labels)
        # queue + running = the requests a replica holds: what an autoscaler scales on (deploy/kubernetes/hpa.yaml)
        running = GaugeMetricFamily("ds_inference_requests_running", "Requests inside a batch executing now.",
                                    labels=labels)
        instances = GaugeMetricFamily("ds_instances", "Model instances (parallel executors).", labels=labels)
        ready = GaugeMetricFamily("ds_model_ready", "1 when the model version is READY.", labels=labels)
        nv = {
            "success": CounterMetricFamily("nv_inference_request_success", "Successful requests (Triton).",
                                           labels=labels),
            "count": CounterMetricFamily("nv_inference_count", "Inferences performed, batch items (Triton).",
                                         labels=labels),
            "exec": CounterMetricFamily("nv_inference_exec_count", "Model executions (Triton).", labels=labels),
            "duration": CounterMetricFamily("nv_inference_request_duration_us",
                                            "Cumulative request duration, µs (Triton).", labels=labels),
            "queue": CounterMetricFamily("nv_inference_queue_duration_us", "Cumulative queue duration, µs (Triton).",
                                         labels=labels),
            "infer": CounterMetricFamily("nv_inference_compute_infer_duration_us",
                                         "Cumulative model execution duration, µs (Triton).", labels=labels),
        }
        pending = GaugeMetricFamily("nv_inference_pending_request_count", "Requests waiting (Triton).",
                                    labels=labels)
        for name, version, mv in self.manager.snapshot():
            lv = [name, "" if version is None else str(version)]
            batcher = mv.batcher
            queue.add_metric(lv, batcher.queue_size if batcher else 0)
            pending.add_metric(lv, batcher.queue_size if batcher else 0)
            busy.add_metric(lv, batcher.busy if batcher else 0)
            running.add_metric(lv, batcher.requests_running if batcher else 0)
            instances.add_metric(lv, batcher.instances if batcher else 0)
            ready.add_metric(lv, 1 if mv.ready else 0)
            st = mv.stats
            nv["success"].add_metric(lv, st.durations["success"].count)
            nv["count"].add_metric(lv, st.inference_count)
            nv["exec"].add_metric(lv, st.execution_count)
            nv["duration"].add_metric(lv, st.durations["success"].ns / 1000)
            nv["queue"].add_metric(lv, st.durations["queue"].ns / 1000)
            nv["infer"].add_metric(lv, st.durations["compute_infer"].ns / 1000)
        failure = CounterMetricFamily("nv_inference_request_failure", "Failed requests by reason (Triton).",
                                      labels=["model", "version", "reason"])
        for (name, version, reason), n in sorted(self.failures.items()):
            failure.add_metric([name, version, reason], n)
        precision = GaugeMetricFamily("ds_model_precision_info", "1 for the precision each model version runs in and "
                                      "why (precision: auto chooses by what this device runs fast).",
                                      labels=[*labels, "precision", "reason"])
        for name, version, mv in self.manager.snapshot():
            choice = getattr(mv.backend, "precision", None) if mv.backend is not None else None
            if choice is not None:
                precision.add_metric([name, "" if version is None else str(version), choice.precision, choice.reason], 1)
        yield from (queue, running, busy, instances, ready, pending, failure, precision, *nv.values())
        yield from self._generation_gauges(labels)

    def _generation_gauges(self, labels: list[str]) -> Iterable:
        """Continuous-batching engines of the language models that have served text so far."""
        gauges = {
            "running": GaugeMetricFamily("ds_generation_running_sequences", "Sequences decoding now.", labels=labels),
            "waiting": GaugeMetricFamily("ds_generation_waiting_sequences", "Requests waiting for a slot.",
                                         labels=labels),
            "max_running": GaugeMetricFamily("ds_generation_max_running_sequences", "Slots for running sequences.",
                                             labels=labels),
            "kv": GaugeMetricFamily("ds_generation_kv_cache_utilization",
                                    "Fraction of the preallocated KV cache holding live tokens.", labels=labels),
        }
        for name, version, mv in self.manager.snapshot():
            engine = getattr(mv.backend, "engine_started", None) if mv.backend is not None else None
            if engine is None:
                continue
            st = engine.stats()
            lv = [name, "" if version is None else str(version)]
            gauges["running"].add_metric(lv, st.running)
            gauges["waiting"].add_metric(lv, st.waiting)
            gauges["max_running"].add_metric(lv, st.max_running)
            gauges["kv"].add_metric(lv, st.kv_cache_utilization)
        yield from gauges.values()


class ServingMetrics:
    """The server's Prometheus registry and the per-request hooks (see module docs)."""

    def __init__(self, manager: Any = None):
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter("ds_inference_requests", "Inference requests by model, version and outcome.",
                                labels + ["outcome"], registry=self.registry)
        self.request_seconds = Histogram("ds_inference_request_duration_seconds",
                                         "Server-side request latency: parsed to answered.", labels,
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram("ds_inference_queue_duration_seconds", "Time waiting in the queue.", labels,
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram("ds_inference_compute_duration_seconds",
                                         "Time computing the request's batch.", labels, buckets=LATENCY_BUCKETS,
                                         registry=self.registry)
        self.batch_size = Histogram("ds_inference_batch_size", "Rows per executed batch.", labels,
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.refused = Counter("ds_inference_refused", "Infer requests refused before reaching a model "
                               "(malformed, unknown model or version, not ready, no key), by status.", ["status"],
                               registry=self.registry)
        self.routed = Counter("ds_routing_requests", "Requests routed by policy, variant and version.",
                              ["model", "policy", "variant", "version"], registry=self.registry)
        self.ttft = Histogram("ds_generation_time_to_first_token_seconds", "Request received to first token out.",
                              labels, buckets=GENERATION_BUCKETS, registry=self.registry)
        self.inter_token = Histogram("ds_generation_inter_token_latency_seconds", "Time between a request's tokens.",
                                     labels, buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ds_generation_e2e_latency_seconds", "Request received to last token out.", labels,
                             buckets=GENERATION_BUCKETS, registry=self.registry)
        self.generations = Counter("ds_generation_requests", "Finished generation requests by finish reason.",
                                   labels + ["finish_reason"], registry=self.registry)
        self.prompt_tokens = Counter("ds_generation_prompt_tokens", "Prompt tokens of finished requests.", labels,
                                     registry=self.registry)
        self.completion_tokens = Counter("ds_generation_completion_tokens", "Generated tokens.", labels,
                                         registry=self.registry)
        # Multi-LoRA: finished generations and their tokens per adapter ("" = the base model), a family of its own
        # so the per-version series above keep their labels.
        adapter_labels = labels + ["adapter"]
        self.adapter_generations = Counter("ds_generation_adapter_requests", "Finished generation requests by LoRA "
                                           "adapter ('' = base) and finish reason.", adapter_labels + ["finish_reason"],
                                           registry=self.registry)
        self.adapter_tokens = Counter("ds_generation_adapter_completion_tokens", "Generated tokens by LoRA adapter "
                                      "('' = base).", adapter_labels, registry=self.registry)
        # POST /v1/embeddings: answered requests, their texts and the tokens embedded (after truncation); the rows
        # per executed batch are ds_inference_batch_size, as for every batched model.
        self.embedding_requests = Counter("ds_embedding_requests", "Answered embedding requests.", labels,
                                          registry=self.registry)
        self.embedding_inputs = Counter("ds_embedding_inputs", "Texts embedded.", labels, registry=self.registry)
        self.embedding_tokens = Counter("ds_embedding_tokens", "Word pieces embedded (after truncation at the "
                                        "model's max_tokens).", labels, registry=self.registry)
        # POST /v1/retrieve: answered requests (by mode), their queries, the whole request's latency and the search
        # part of it (FAISS + BM25, after the queries were embedded); the queries per encode call are
        # ds_inference_batch_size, as for embedding models.
        self.retrieval_requests = Counter("ds_retrieval_requests", "Answered retrieval requests by mode.",
                                          labels + ["mode"], registry=self.registry)
        self.retrieval_queries = Counter("ds_retrieval_queries", "Queries answered by retrieval.", labels,
                                         registry=self.registry)
        self.retrieval_seconds = Histogram("ds_retrieval_request_duration_seconds", "Retrieval request latency: "
                                           "received to answered (embedding and search).", labels,
                                           buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retrieval_search_seconds = Histogram("ds_retrieval_search_duration_seconds", "Time a retrieval request "
                                                  "spent searching FAISS and BM25 after its queries were embedded.",
                                                  labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        ProcessCollector(registry=self.registry)
        self._failures: dict[tuple[str, str, str], int] = {}
        self._children: dict[tuple, tuple] = {}  # (model, version) -> that version's histogram children
        self._counter_children: dict[tuple, Any] = {}  # (family id, labels) -> counter child
        if manager is not None:
            self.registry.register(_ManagerCollector(manager, self._failures))

    def _series(self, model: str, version: Optional[int]) -> tuple:
        key = (model, version)
        series = self._children.get(key)
        if series is None:  # labels() is a dict lookup plus a lock; cache the children per version
            lv = (model, "" if version is None else str(version))
            series = (self.request_seconds.labels(*lv), self.queue_seconds.labels(*lv),
                      self.compute_seconds.labels(*lv), self.batch_size.labels(*lv), lv)
            self._children[key] = series
        return series

    def _count(self, family: Counter, *labels: str) -> None:
        key = (id(family), labels)
        child = self._counter_children.get(key)
        if child is None:
            child = self._counter_children[key] = family.labels(*labels)
        child.inc()

    def observe_request(self, model: str, version: Optional[int], outcome: str, total_s: float,
                        trace: Optional[RequestTrace] = None) -> None:
        total, queue, compute, _, lv = self._series(model, version)
        self._count(self.requests, *lv, outcome)
        if outcome == "success":
            total.observe(total_s)
            if trace is not None:
                queue.observe(trace.queue_ns / 1e9)
                compute.observe((trace.compute_input_ns + trace.compute_infer_ns + trace.compute_output_ns) / 1e9)
        else:
            key = (*lv, _TRITON_REASON.get(outcome, "OTHER"))
            self._failures[key] = self._failures.get(key, 0) + 1

    def observe_refused(self, status: str) -> None:
        self._count(self.refused, status)

    def observe_batch(self, model: str, version: Optional[int], size: int) -> None:
        self._series(model, version)[3].observe(size)

    def observe_route(self, model: str, policy: str, variant: Optional[str], version: int) -> None:
        self._count(self.routed, model, policy, variant or "", str(version))

    def observe_token(self, model: str, version: Optional[int], since_previous_s: Optional[float]) -> None:
        """One generated token; ``since_previous_s`` is None for a request's first token."""
        lv = (model, "" if version is None else str(version))
        self._count(self.completion_tokens, *lv)
        if since_previous_s is not None:
            self.inter_token.labels(*lv).observe(since_previous_s)

    def observe_generation(self, model: str, version: Optional[int], finish_reason: str, prompt_tokens: int,
                           ttft_s: Optional[float], e2e_s: float) -> None:
        lv = (model, "" if version is None else str(version))
        self._count(self.generations, *lv, finish_reason)
        self.prompt_tokens.labels(*lv).inc(prompt_tokens)
        if ttft_s is not None:
            self.ttft.labels(*lv).observe(ttft_s)
        self.e2e.labels(*lv).observe(e2e_s)

    def observe_adapter_generation(self, model: str, version: Optional[int], adapter: Optional[str],
                                   finish_reason: str, completion_tokens: int) -> None:
        """One finished generation of a model served with LoRA adapters (``adapter`` None = the base)."""
        lv = (model, "" if version is None else str(version), adapter or "")
        self._count(self.adapter_generations, *lv, finish_reason)
        self.adapter_tokens.labels(*lv).inc(completion_tokens)

    def observe_embedding(self, model: str, version: Optional[int], inputs: int, tokens: int) -> None:
        """One answered ``/v1/embeddings`` request of ``inputs`` texts and ``tokens`` word pieces."""
        lv = (model, "" if version is None else str(version))
        self._count(self.embedding_requests, *lv)
        self.embedding_inputs.labels(*lv).inc(inputs)
        self.embedding_tokens.labels(*lv).inc(tokens)

    def observe_retrieval(self, model: str, version: Optional[int], mode: str, queries: int, total_s: float,
                          search_s: float) -> None:
        """One answered ``/v1/retrieve`` request of ``queries`` queries."""
        lv = (model, "" if version is None else str(version))
        self._count(self.retrieval_requests, *lv, mode)
        self.retrieval_queries.labels(*lv).inc(queries)
        self.retrieval_seconds.labels(*lv).observe(total_s)
        self.retrieval_search_seconds.labels(*lv).observe(search_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
