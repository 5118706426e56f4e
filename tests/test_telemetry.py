"""Telemetry: the worker's Prometheus endpoint serves transcend's series and the Temporal
SDK's own, and traces link client, workflow and activity spans into one tree.

- unit: ``setup_telemetry`` on a free port, values recorded by the ``record_*``
  functions read back from ``/metrics``; the functions are no-ops when it is off;
- in process, against a real dev server: a tiny workflow run by a worker on a client
  with the tracing interceptor and the telemetry runtime gives the span tree
  StartWorkflow → RunWorkflow → StartActivity → RunActivity (in-memory exporter) and
  ``temporal_*`` series on the same endpoint;
- end to end (guest): the real worker process started with ``TRANSCEND_METRICS_PORT``
  and ``TRANSCEND_OTLP_ENDPOINT`` (an OTLP/HTTP receiver in this test) serves the
  cycle's metrics after the first point and exports the cycle's span tree.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

from temporalio import activity, workflow
from temporalio.worker import Worker

# The workflow below runs in the sandbox, which re-imports this module: everything it
# need not see (HTTP, the exporters, the harness) is passed through, not re-imported.
with workflow.unsafe.imports_passed_through():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import pytest
    import requests
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    from temporal.devserver import free_port
    from tests.harness.guest import GuestImage
    from tests.harness.protect import (
        add_kvm_platforms,
        booted_guest,
        protection_spec,
        start_protection,
        wait_first_point,
    )
    from tests.harness.stack import Stack
    from transcend import telemetry
    from transcend.client import connect
    from transcend.config import Settings
    from transcend.telemetry import (
        record_cycle,
        record_queue_lag,
        record_rto,
        record_stream,
        setup_telemetry,
    )

# ---------------------------------------------------------------------------- helpers


def scrape(url: str) -> list[Sample]:
    resp = requests.get(url, timeout=10)
    resp.raise_for_status()
    return [s for fam in text_string_to_metric_families(resp.text) for s in fam.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples called ``name`` whose labels include ``labels`` (like
    PromQL's ``sum``), None when there is none."""
    found = [float(s.value) for s in samples
             if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    return sum(found) if found else None


def wait_scrape(url: str, ready: Callable[[list[Sample]], bool], timeout: float) -> list[Sample]:
    deadline = time.monotonic() + timeout
    samples: list[Sample] = []
    while time.monotonic() < deadline:
        try:
            samples = scrape(url)
            if ready(samples):
                return samples
        except requests.RequestException:
            pass
        time.sleep(0.5)
    shown = "\n".join(f"{s.name}{s.labels} {s.value}" for s in samples
                      if not s.name.endswith("_bucket") and not s.name.startswith("process_"))
    raise AssertionError(f"{url} not as expected after {timeout:.0f}s; samples:\n{shown}")


# ---------------------------------------------------------------------------- unit


def test_metrics_endpoint_serves_recorded_series(tmp_path: Path) -> None:
    # Off: the record functions are no-ops (nothing set up, nothing raised).
    assert telemetry._current is None
    record_stream("p", "vda", "full", 1, 1.0)
    record_cycle("p", "committed", 1.0, 1.0)

    port = free_port()
    spans = InMemorySpanExporter()
    tel = setup_telemetry(Settings(home=tmp_path), metrics_port=port, span_exporter=spans)
    try:
        assert tel.metrics_url == f"http://127.0.0.1:{port}/metrics"
        record_stream("p1", "vda", "full", 64 << 20, 4.0)
        record_stream("p1", "vda", "incremental", 1 << 20, 0.5)
        record_stream("p1", "vdb", "full", 8 << 20, 2.0)
        record_cycle("p1", "committed", 12.5, None)  # the first point has no RPO
        record_cycle("p1", "committed", 3.0, 42.0)
        record_cycle("p1", "failed", 7.0, None)
        record_rto("p1", 33.0)
        now = datetime.now(UTC)
        record_queue_lag(SimpleNamespace(  # the fields of activity.Info it reads
            activity_type="stream.disk", task_queue="transcend-local",
            current_attempt_scheduled_time=now - timedelta(seconds=0.25), started_time=now))

        s = scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(s, "transcend_bytes_copied_total", protection="p1", disk="vda", kind="full") == 64 << 20
        assert value(s, "transcend_bytes_copied_total", protection="p1", disk="vda",
                     kind="incremental") == 1 << 20
        assert value(s, "transcend_bytes_copied_total", protection="p1", disk="vdb", kind="full") == 8 << 20
        assert value(s, "transcend_bytes_copied_total", protection="p") is None  # recorded while off
        # The last stream of each disk: 1 MiB / 0.5 s and 8 MiB / 2 s.
        assert value(s, "transcend_copy_throughput_bytes_per_second", protection="p1", disk="vda") == 2 << 20
        assert value(s, "transcend_copy_throughput_bytes_per_second", protection="p1", disk="vdb") == 4 << 20
        assert value(s, "transcend_cycle_duration_seconds_count", protection="p1", status="committed") == 2
        assert value(s, "transcend_cycle_duration_seconds_sum", protection="p1", status="committed") == 15.5
        assert value(s, "transcend_cycle_duration_seconds_count", protection="p1", status="failed") == 1
        assert value(s, "transcend_cycle_duration_seconds_bucket", protection="p1", status="committed",
                     le="5") == 1
        assert value(s, "transcend_rpo_achieved_seconds", protection="p1") == 42.0
        assert value(s, "transcend_rto_seconds", protection="p1") == 33.0
        lag = dict(activity_type="stream.disk", task_queue="transcend-local")
        assert value(s, "transcend_activity_schedule_to_start_seconds_count", **lag) == 1
        assert value(s, "transcend_activity_schedule_to_start_seconds_sum", **lag) == pytest.approx(0.25)
        assert value(s, "process_cpu_seconds_total") is not None
        # No span exporter but the in-memory one: the interceptor is offered.
        assert len(tel.interceptors()) == 1
    finally:
        asyncio.run(tel.shutdown())
    assert telemetry._current is None
    record_stream("p1", "vda", "full", 1, 1.0)  # a no-op again
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_no_tracing_without_an_exporter(tmp_path: Path) -> None:
    tel = setup_telemetry(Settings(home=tmp_path), metrics_port=None)
    try:
        assert tel.metrics_url is None
        assert tel.interceptors() == []
    finally:
        asyncio.run(tel.shutdown())


# ---------------------------------------------------------------------------- in process


@activity.defn(name="telemetry_test.echo")
async def echo(text: str) -> str:
    record_queue_lag(activity.info())
    return text


@workflow.defn(name="TelemetryTest")
class EchoWorkflow:
    @workflow.run
    async def run(self, text: str, again: bool = False) -> str:
        out = await workflow.execute_activity(echo, text, start_to_close_timeout=timedelta(seconds=30))
        if again:  # as the Replication workflow does now and then
            workflow.continue_as_new(args=[text, False])
        return out


@pytest.mark.timeout(180)
def test_span_tree_and_sdk_metrics_in_process(stack: Stack, tmp_path: Path) -> None:
    asyncio.run(_span_tree_in_process(stack, tmp_path))


async def _span_tree_in_process(stack: Stack, tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    tel = setup_telemetry(stack.settings, metrics_port=0, span_exporter=spans)
    assert tel.metrics_url is not None
    try:
        await tel.start()
        # The interceptor on the client only: the worker built from it inherits it.
        client = await connect(stack.settings, runtime=tel.runtime, interceptors=tel.interceptors())
        untraced = await stack.client()  # like a Schedule: starts without a trace context
        queue = f"telemetry-test-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=queue, workflows=[EchoWorkflow], activities=[echo]):
            out = await client.execute_workflow(EchoWorkflow.run, "traced", id=f"{queue}-traced",
                                                task_queue=queue)
            assert out == "traced"
            traced_spans = list(spans.get_finished_spans())
            spans.clear()
            handle = await untraced.start_workflow(EchoWorkflow.run, args=["untraced", True],
                                                   id=f"{queue}-untraced", task_queue=queue)
            assert await handle.result() == "untraced"  # follows the continue-as-new
            runs = [handle.result_run_id, (await handle.describe()).run_id]
            untraced_spans = list(spans.get_finished_spans())

        # Started by a traced client: StartWorkflow is the root; the workflow's spans
        # (zero-length in temporalio's interceptor) hang under it, each activity's run
        # under the StartActivity that scheduled it.
        by_name = {x.name: x for x in traced_spans}
        names = ["StartWorkflow:TelemetryTest", "RunWorkflow:TelemetryTest",
                 "StartActivity:telemetry_test.echo", "RunActivity:telemetry_test.echo",
                 "CompleteWorkflow:TelemetryTest"]
        assert set(names) <= set(by_name), sorted(by_name)
        root = by_name["StartWorkflow:TelemetryTest"]
        assert root.parent is None
        tree = {"RunWorkflow:TelemetryTest": root, "StartActivity:telemetry_test.echo": root,
                "CompleteWorkflow:TelemetryTest": root,
                "RunActivity:telemetry_test.echo": by_name["StartActivity:telemetry_test.echo"]}
        for child, parent in tree.items():
            c = by_name[child]
            assert c.parent is not None and c.parent.span_id == parent.context.span_id, (child, parent.name)
            assert c.context.trace_id == root.context.trace_id

        # Started without a trace context (as a Schedule starts a cycle): one trace per
        # run, derived from the run id, the same tree under a parent that is not
        # exported. The run it continued as new gets a trace of its own.
        assert runs[0] and runs[1] and runs[0] != runs[1]
        for run_id, last in zip(runs, [False, True], strict=True):
            trace = int(hashlib.sha256(run_id.encode()).hexdigest()[:32], 16)
            by_name = {x.name: x for x in untraced_spans if x.context.trace_id == trace}
            # (A run that continues as new does not complete.)
            expected = names[1:] if last else names[1:4]
            assert set(expected) <= set(by_name), (run_id, sorted(x.name for x in untraced_spans))
            run = by_name["RunWorkflow:TelemetryTest"]
            assert run.parent is not None
            for name in (n for n in expected[1:] if not n.startswith("RunActivity")):
                x = by_name[name]
                assert x.parent is not None and x.parent.span_id == run.parent.span_id, name
            act = by_name["RunActivity:telemetry_test.echo"]
            assert act.parent is not None
            assert act.parent.span_id == by_name["StartActivity:telemetry_test.echo"].context.span_id

        # The SDK's metrics reach the same endpoint (drained from its buffer each second),
        # next to the queue lag the activity recorded.
        s = await asyncio.to_thread(
            wait_scrape, tel.metrics_url,
            lambda s: value(s, "temporal_workflow_completed_total", task_queue=queue,
                            workflow_type="TelemetryTest") == 2
            and value(s, "temporal_workflow_continue_as_new_total", task_queue=queue,
                      workflow_type="TelemetryTest") == 1
            and value(s, "transcend_activity_schedule_to_start_seconds_count",
                      activity_type="telemetry_test.echo", task_queue=queue) == 3
            and value(s, "temporal_activity_execution_latency_milliseconds_count",
                      activity_type="telemetry_test.echo", task_queue=queue) == 3,
            30)
        # Every update under its own labels (temporalio's MetricsExporter mixed them up).
        assert not [x for x in s
                    if x.name == "temporal_workflow_completed_total" and x.labels.get("operation")]
    finally:
        await tel.shutdown()


# ---------------------------------------------------------------------------- end to end


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[dict[str, object]]]]:
    """A minimal OTLP/HTTP collector: records the spans posted to /v1/traces (as dicts
    with hex ids), answers every other path (metrics) with 200 too."""
    spans: list[dict[str, object]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            reply = b""
            if self.path == "/v1/traces":
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                with lock:
                    for rs in req.resource_spans:
                        for ss in rs.scope_spans:
                            for sp in ss.spans:
                                spans.append({"name": sp.name, "trace": sp.trace_id.hex(),
                                              "id": sp.span_id.hex(), "parent": sp.parent_span_id.hex()})
                reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", spans
    finally:
        server.shutdown()
        server.server_close()


def _cycle_span_tree(spans: list[dict[str, object]]) -> list[dict[str, object]] | None:
    """A cycle's spans in one trace, if exported: RunWorkflow:Cycle and the
    StartActivity spans of cycle.start and stream.disk under the run's (unexported)
    parent, RunActivity:stream.disk under its StartActivity."""
    by_id = {s["id"]: s for s in spans}
    for run in (s for s in spans if s["name"] == "RunActivity:stream.disk"):
        start = by_id.get(run["parent"])
        if start is None or start["name"] != "StartActivity:stream.disk":
            continue
        same_run = [s for s in spans if s["trace"] == run["trace"] and s["parent"] == start["parent"]]
        names = {s["name"] for s in same_run}
        if {"RunWorkflow:Cycle", "StartActivity:cycle.start"} <= names:
            return [*same_run, run]
    return None


@pytest.mark.guest
@pytest.mark.timeout(600)
def test_worker_metrics_and_traces_after_a_cycle(
    guest_image: GuestImage, stack: Stack, tmp_path: Path
) -> None:
    asyncio.run(_worker_metrics_after_a_cycle(guest_image, stack, tmp_path))


async def _worker_metrics_after_a_cycle(guest_image: GuestImage, stack: Stack, tmp_path: Path) -> None:
    vm = f"transcend-telemetry-{os.getpid()}"
    port = free_port()
    with otlp_receiver() as (otlp, spans):
        stack.kill_workers()
        stack.env["TRANSCEND_METRICS_PORT"] = str(port)
        stack.env["TRANSCEND_OTLP_ENDPOINT"] = otlp
        worker = stack.start_worker()
        url = f"http://127.0.0.1:{port}/metrics"
        cat = stack.catalog()
        src, dst = add_kvm_platforms(cat, tmp_path / "replicas")
        client = await stack.client()
        with booted_guest(guest_image, tmp_path, vm) as (_, disk):
            handle = await start_protection(client, protection_spec("tel", vm, src, dst))
            st = await wait_first_point(handle)
            assert st.cycles_failed == 0, f"first cycle failed: {st.last_error}\n{stack.worker_log_tail()}"
            info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(disk)],
                                             capture_output=True, check=True, text=True).stdout)
            disk_size = int(info["virtual-size"])

        s = await asyncio.to_thread(
            wait_scrape, url,
            lambda s: value(s, "transcend_cycle_duration_seconds_count", protection="tel") is not None
            and any(x.name.startswith("temporal_") for x in s), 30)
        copied = value(s, "transcend_bytes_copied_total", protection="tel", kind="full")
        assert copied is not None and 0 < copied <= disk_size, (copied, disk_size)
        assert (value(s, "transcend_cycle_duration_seconds_count", protection="tel", status="committed")
                or 0) >= 1
        assert (value(s, "transcend_copy_throughput_bytes_per_second", protection="tel") or 0) > 0
        assert (value(s, "transcend_activity_schedule_to_start_seconds_count",
                      activity_type="stream.disk") or 0) >= 1
        assert (value(s, "transcend_activity_schedule_to_start_seconds_count",
                      activity_type="cycle.start") or 0) >= 1
        # The SDK's own series, from the worker's runtime, on the same endpoint.
        assert (value(s, "temporal_activity_execution_latency_milliseconds_count",
                      activity_type="stream.disk") or 0) >= 1, sorted(
            {x.name for x in s if x.name.startswith("temporal_")})

        # Spans are batched (5 s); the cycle's tree arrives at the test's OTLP receiver.
        deadline = time.monotonic() + 30
        tree = None
        while tree is None and time.monotonic() < deadline:
            await asyncio.sleep(1)
            tree = _cycle_span_tree(list(spans))
        assert tree is not None, sorted({str(x["name"]) for x in spans})

        # A graceful stop flushes telemetry (to the receiver still listening) and exits 0.
        stack.kill_workers(signal.SIGTERM)
        assert worker.returncode == 0, stack.worker_log_tail()
