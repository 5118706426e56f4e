"""Telemetry for the worker: metrics and traces through one OpenTelemetry SDK setup.

``setup_telemetry`` builds, once per process:

- a ``MeterProvider`` read by a Prometheus reader (served on ``--metrics-port``) and,
  when ``otlp_endpoint`` is set, by a periodic OTLP/HTTP exporter;
- a ``TracerProvider`` exporting to OTLP/HTTP when configured, or to the exporter a
  caller passes (the tests use an in-memory one); ``Telemetry.interceptors()`` gives
  temporalio's ``TracingInterceptor`` on that provider (one trace per workflow run
  also for runs started by a Schedule), for the client, which hands it on to every
  worker created from it;
- a Temporal ``Runtime`` whose SDK/Core metrics go into a ``MetricBuffer`` that
  ``Telemetry.start()`` drains into the same ``MeterProvider``, so the SDK's own
  ``temporal_*`` series are served on the same endpoint as transcend's.

The ``record_*`` functions are what activities call. They do nothing (one global
read) unless ``setup_telemetry`` ran (and ``Telemetry.shutdown`` did not), so the CLI,
the tests and a worker without telemetry pay nothing for them.

Nothing here is installed as the OpenTelemetry *global* provider: globals can be set
once per process, and tests set telemetry up more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Counter, Histogram
from opentelemetry.metrics import _Gauge as Gauge  # the synchronous gauge's public name
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from temporalio import workflow
from temporalio.contrib.opentelemetry import TracingInterceptor, TracingWorkflowInboundInterceptor
from temporalio.runtime import (
    BUFFERED_METRIC_KIND_COUNTER,
    BUFFERED_METRIC_KIND_GAUGE,
    BufferedMetric,
    MetricBuffer,
    MetricBufferDurationFormat,
    Runtime,
    TelemetryConfig,
)
from temporalio.worker import WorkflowInterceptorClassInput

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from temporalio import activity

    from transcend.config import Settings

log = logging.getLogger(__name__)

# Bucket bounds in seconds. A cycle runs from seconds (small incremental) to hours
# (first full copy of a large disk); schedule-to-start lag is normally milliseconds,
# seconds when workers are saturated, minutes when none polls the queue.
CYCLE_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The SDK's buffer must be drained before it fills (Core drops updates and logs an
# error then); one drain per second keeps far below this even on a busy worker.
SDK_METRIC_BUFFER = 100_000


@dataclass
class _Instruments:
    bytes_copied: Counter
    cycle_duration: Histogram
    rpo_achieved: Gauge
    throughput: Gauge
    rto: Gauge
    queue_lag: Histogram
    site_limit: Gauge
    site_in_use: Gauge


def _instruments(provider: MeterProvider) -> _Instruments:
    m = provider.get_meter("transcend")
    # Units are left off where the Prometheus exporter would otherwise append them to
    # the name a second time (``_bytes_copied_bytes_total``); every name says its unit.
    return _Instruments(
        bytes_copied=m.create_counter(
            "transcend_bytes_copied",
            description="Bytes written to the target by successful disk streams"),
        cycle_duration=m.create_histogram(
            "transcend_cycle_duration_seconds", unit="s",
            description="Wall time of finished replication cycles",
            explicit_bucket_boundaries_advisory=CYCLE_BUCKETS),
        rpo_achieved=m.create_gauge(
            "transcend_rpo_achieved_seconds", unit="s",
            description="RPO achieved by the protection's last committed cycle "
                        "(commit time minus the previous point's instant)"),
        throughput=m.create_gauge(
            "transcend_copy_throughput_bytes_per_second", unit="By/s",
            description="Bytes written per second by the last successful stream of a disk"),
        rto=m.create_gauge(
            "transcend_rto_seconds", unit="s",
            description="Recovery time measured by the protection's last test failover"),
        queue_lag=m.create_histogram(
            "transcend_activity_schedule_to_start_seconds", unit="s",
            description="Time an activity attempt waited in its task queue before a worker "
                        "started it", explicit_bucket_boundaries_advisory=LAG_BUCKETS),
        site_limit=m.create_gauge(
            "transcend_site_bandwidth_limit_bytes_per_second", unit="By/s",
            description="The site's bandwidth limit in force (0: unlimited)"),
        site_in_use=m.create_gauge(
            "transcend_site_bandwidth_in_use_bytes_per_second", unit="By/s",
            description="Bytes per second the worker's copies move now (all streams)"),
    )


class _RootedWorkflowTracing(TracingWorkflowInboundInterceptor):
    """A workflow that arrives without a trace context gets one derived from its run id.

    Cycles are started by their Schedule, never by a traced client, and temporalio's
    interceptor would then make each of a cycle's spans (RunWorkflow, every
    StartActivity) the root of a trace of its own. With a context derived from the run
    id all spans of one run share one trace, also when the workflow is replayed on
    another worker after a crash (where a context made at random would change). The
    parent span that context names is never exported: trace views show the run's spans
    under a missing root. A run continued-as-new from such a run gets its own trace
    (the Replication workflow would otherwise grow one trace for ever).

    Runs inside the workflow sandbox; only ``hashlib`` and the workflow's info are used.
    """

    def _load_workflow_context_carrier(self) -> dict[str, Any] | None:
        if self._workflow_context_carrier:
            return self._workflow_context_carrier
        carrier = super()._load_workflow_context_carrier()
        info = workflow.info()
        inherited = carrier is not None and info.continued_run_id is not None and str(
            carrier.get("traceparent", "")).startswith(_traceparent(info.continued_run_id)[:35])
        if carrier is None or inherited:
            carrier = {"traceparent": _traceparent(info.run_id)}
            self._workflow_context_carrier = carrier
        return carrier


def _traceparent(run_id: str) -> str:
    """W3C trace context naming a sampled span of a trace, both derived from ``run_id``."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()
    return f"00-{digest[:32]}-{digest[32:48]}-01"


class _Tracing(TracingInterceptor):
    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[TracingWorkflowInboundInterceptor]:
        super().workflow_interceptor_class(input)  # registers the span-making extern function
        return _RootedWorkflowTracing


class _SdkMetrics:
    """Drains the Temporal SDK's ``MetricBuffer`` into OpenTelemetry instruments.

    Not temporalio's own ``contrib.opentelemetry.MetricsExporter``: it caches
    instruments and label sets by ``id()`` without keeping the objects alive, so an
    id reused after the object was freed files updates under the wrong series (seen
    in tests as ``temporal_workflow_completed_total{operation="GetSystemInfo"}``).
    Label sets are converted on every update instead; instruments are keyed by name.
    """

    POLL_SECONDS = 1.0

    def __init__(self, buffer: MetricBuffer, provider: MeterProvider) -> None:
        self._buffer = buffer
        self._meter = provider.get_meter("temporalio")
        self._instruments: dict[str, Counter | Histogram | Gauge] = {}
        self._stop = asyncio.Event()

    def _instrument(self, metric: BufferedMetric) -> Counter | Histogram | Gauge:
        inst = self._instruments.get(metric.name)
        if inst is None:
            args = (metric.name, metric.unit or "", metric.description or "")
            if metric.kind == BUFFERED_METRIC_KIND_COUNTER:
                inst = self._meter.create_counter(*args)
            elif metric.kind == BUFFERED_METRIC_KIND_GAUGE:
                inst = self._meter.create_gauge(*args)
            else:
                inst = self._meter.create_histogram(*args)
            self._instruments[metric.name] = inst
        return inst

    def drain(self) -> None:
        for update in self._buffer.retrieve_updates():
            try:
                inst = self._instrument(update.metric)
                attrs = dict(update.attributes)
                if isinstance(inst, Counter):
                    inst.add(update.value, attrs)
                elif isinstance(inst, Histogram):
                    inst.record(update.value, attrs)
                else:
                    inst.set(update.value, attrs)
            except Exception:  # one odd update must not stop the SDK's metrics
                log.exception("cannot record Temporal SDK metric %s", update.metric.name)

    async def run(self) -> None:
        while not self._stop.is_set():
            self.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.POLL_SECONDS)
        self.drain()  # what was recorded just before shutdown

    def stop(self) -> None:
        self._stop.set()


# Set by setup_telemetry, cleared by Telemetry.shutdown; read (without a lock: one
# reference read) by the record functions, which run on activity threads too.
_current: _Instruments | None = None


@dataclass
class Telemetry:
    """What ``setup_telemetry`` built; ``start()`` in the event loop, ``shutdown()`` at exit."""

    meter_provider: MeterProvider
    tracer_provider: TracerProvider
    runtime: Runtime
    """Pass to ``Client.connect`` (``transcend.client.connect(runtime=...)``) so the
    SDK's metrics reach ``meter_provider``; a client on another runtime is not measured."""
    metrics_url: str | None = None
    tracing: bool = False
    _buffer: MetricBuffer | None = None
    _sdk_metrics: _SdkMetrics | None = None
    _sdk_task: asyncio.Task[None] | None = None
    _server: tuple[WSGIServer, threading.Thread] | None = None
    _interceptors: list[TracingInterceptor] = field(default_factory=list)

    def interceptors(self) -> list[TracingInterceptor]:
        """temporalio's tracing interceptor for ``Client.connect(interceptors=...)``, or
        nothing when no span exporter is configured (spans nobody receives are not made).

        It belongs on the client only: workers built from that client inherit it (a
        second copy on the workers would record every span twice). Workflows started
        without a trace context (cycles, by their Schedule) get one per run
        (``_RootedWorkflowTracing``).
        """
        if not self.tracing:
            return []
        if not self._interceptors:
            self._interceptors = [_Tracing(self.tracer_provider.get_tracer("transcend"))]
        return self._interceptors

    async def start(self) -> None:
        """Start draining the SDK's metric buffer (needs the running event loop)."""
        if self._buffer is not None and self._sdk_task is None:
            self._sdk_metrics = _SdkMetrics(self._buffer, self.meter_provider)
            self._sdk_task = asyncio.create_task(self._sdk_metrics.run())

    async def shutdown(self) -> None:
        """Final SDK drain, flush spans and metrics, stop the HTTP server, turn the
        record functions back into no-ops."""
        global _current
        if self._sdk_metrics is not None and self._sdk_task is not None:
            self._sdk_metrics.stop()
            await self._sdk_task
            self._sdk_task = None
        _current = None
        if self._server is not None:
            server, thread = self._server
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._server = None
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    settings: Settings,
    *,
    metrics_port: int | None,
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Build the providers, the SDK runtime and (``metrics_port`` given) the Prometheus
    endpoint on ``settings.metrics_address``; makes the ``record_*`` functions live.

    ``metrics_port=0`` binds a free port (``Telemetry.metrics_url`` says which).
    OTLP/HTTP is used for metrics and traces when ``settings.otlp_endpoint`` is set
    (the collector's base URL, e.g. ``http://collector:4318``); ``span_exporter``
    receives spans synchronously in addition.
    """
    global _current
    resource = Resource.create({"service.name": "transcend-worker", "transcend.site": settings.site})
    readers: list[MetricReader] = []
    server: tuple[WSGIServer, threading.Thread] | None = None
    url: str | None = None
    otlp = settings.otlp_endpoint.rstrip("/")
    if metrics_port is not None:
        # A private registry, so a second setup in one process (tests) does not see
        # the first one's series; the process collector adds CPU, memory and fds.
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
        server = start_http_server(metrics_port, addr=settings.metrics_address, registry=registry)
        host = settings.metrics_address
        url = f"http://{'[' + host + ']' if ':' in host else host}:{server[0].server_port}/metrics"
        log.info("metrics on %s", url)
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{otlp}/v1/metrics"), export_interval_millis=15_000))
    meter_provider = MeterProvider(metric_readers=readers, resource=resource)

    tracer_provider = TracerProvider(resource=resource)
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # Batched: exporting must never hold up a workflow task or an activity.
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{otlp}/v1/traces")))
    if span_exporter is not None:
        tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))

    # Durations in milliseconds: the SDK's histograms then fall into the OTel default
    # buckets (0 … 10 000), which are meant for milliseconds.
    buffer = MetricBuffer(SDK_METRIC_BUFFER, MetricBufferDurationFormat.MILLISECONDS)
    runtime = Runtime(telemetry=TelemetryConfig(metrics=buffer))
    _current = _instruments(meter_provider)
    return Telemetry(
        meter_provider=meter_provider, tracer_provider=tracer_provider, runtime=runtime,
        metrics_url=url, tracing=bool(otlp) or span_exporter is not None,
        _buffer=buffer, _server=server,
    )


# ---------------------------------------------------------------------------- recording


def record_stream(protection: str, disk: str, kind: str, bytes: int, seconds: float) -> None:
    """A disk stream finished: ``bytes`` written to the target in ``seconds``."""
    inst = _current
    if inst is None:
        return
    inst.bytes_copied.add(bytes, {"protection": protection, "disk": disk, "kind": str(kind)})
    if seconds > 0:
        inst.throughput.set(bytes / seconds, {"protection": protection, "disk": disk})


def record_cycle(protection: str, status: str, seconds: float, rpo: float | None) -> None:
    """A cycle finished (``status`` committed or failed); ``rpo`` is the RPO the commit
    achieved (None for a failed cycle or the first point)."""
    inst = _current
    if inst is None:
        return
    inst.cycle_duration.record(max(0.0, seconds), {"protection": protection, "status": status})
    if rpo is not None:
        inst.rpo_achieved.set(rpo, {"protection": protection})


def record_site_bandwidth(limit: int | None, in_use: float) -> None:
    """The site bandwidth allocator's view, every period (transcend/bandwidth.py)."""
    inst = _current
    if inst is None:
        return
    inst.site_limit.set(limit or 0)
    inst.site_in_use.set(in_use)


def record_rto(protection: str, seconds: float) -> None:
    """A test failover or failover measured this RTO (activity ``metrics.rto``, called by
    the workflows that measure it)."""
    inst = _current
    if inst is None:
        return
    inst.rto.set(seconds, {"protection": protection})


def record_queue_lag(info: activity.Info) -> None:
    """Schedule-to-start of this activity attempt: how long it waited for a worker."""
    inst = _current
    if inst is None:
        return
    # Not ``scheduled_time``: for a retry that includes the earlier attempts and the backoff.
    lag = (info.started_time - info.current_attempt_scheduled_time).total_seconds()
    inst.queue_lag.record(max(0.0, lag), {"activity_type": info.activity_type,
                                          "task_queue": info.task_queue})


__all__ = [
    "Telemetry", "record_cycle", "record_queue_lag", "record_rto", "record_stream", "setup_telemetry",
]
